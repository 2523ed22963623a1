//! The hook's behaviour, one claim of the README per test, on a fake clock: each test
//! drives the machine with what a browser would report and checks what it is told to do.

use super::*;

/// A machine on a fake clock that keeps its timers and fires them as time passes.
struct Rig {
    machine: Machine,
    now: f64,
    /// The running timers and when they fire.
    due: Vec<(Timer, f64)>,
}

impl Rig {
    fn new(options: UseSseOptions) -> Self {
        Self::with(options, true, 0.5)
    }

    /// `tabs`: Web Locks and BroadcastChannel exist; `jitter`: every reconnect's random.
    fn with(options: UseSseOptions, tabs: bool, jitter: f64) -> Self {
        let machine = Machine::new(
            options,
            "https://app.example".into(),
            tabs,
            Box::new(move || jitter),
        );
        Self {
            machine,
            now: 0.0,
            due: Vec::new(),
        }
    }

    fn step(&mut self, input: Input) -> Vec<Action> {
        let actions = self.machine.step(self.now, input);
        for action in &actions {
            match action {
                Action::SetTimer(timer, ms) => {
                    self.due.retain(|(t, _)| t != timer);
                    self.due.push((*timer, self.now + *ms as f64));
                }
                Action::ClearTimer(timer) => self.due.retain(|(t, _)| t != timer),
                _ => {}
            }
        }
        actions
    }

    /// Lets `ms` pass, firing the timers that fall due, in order.
    fn advance(&mut self, ms: u64) -> Vec<Action> {
        let end = self.now + ms as f64;
        let mut actions = Vec::new();
        while let Some(&(timer, at)) = self
            .due
            .iter()
            .filter(|(_, at)| *at <= end)
            .min_by(|a, b| a.1.total_cmp(&b.1))
        {
            self.due.retain(|(t, _)| *t != timer);
            self.now = at;
            actions.extend(self.step(Input::TimerFired(timer)));
        }
        self.now = end;
        actions
    }

    /// Lets `ms` pass on a stream that beats every 30 s.
    fn beating(&mut self, ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        for _ in 0..ms / 30_000 {
            actions.extend(self.advance(30_000));
            actions.extend(self.step(Input::Message(msg("", names::HEARTBEAT, "{}"))));
        }
        actions.extend(self.advance(ms % 30_000));
        actions
    }

    /// How long until `timer` fires, if it runs.
    fn remaining(&self, timer: Timer) -> Option<u64> {
        self.due
            .iter()
            .find(|(t, _)| *t == timer)
            .map(|(_, at)| (at - self.now) as u64)
    }

    fn view(&self) -> &View {
        self.machine.view()
    }

    /// Starts a tab alone (no tabs to share with) and opens its SSE stream.
    fn started_alone(options: UseSseOptions) -> Self {
        let mut rig = Self::with(options.share_across_tabs(false), true, 0.5);
        let actions = rig.step(Input::Start);
        assert!(stream_url(&actions).is_some(), "opens at once: {actions:?}");
        rig
    }

    /// The stream opens and its `ready` comes.
    fn flowing(&mut self, tag: &str) -> Vec<Action> {
        let mut actions = self.step(Input::StreamOpened);
        actions.extend(self.step(Input::Message(ready("0", tag, 30_000))));
        actions
    }
}

fn msg(id: &str, event: &str, data: &str) -> SseMessage {
    SseMessage {
        id: id.into(),
        event: event.into(),
        data: data.into(),
        replayed: false,
    }
}

fn ready(id: &str, tag: &str, heartbeat_ms: u64) -> SseMessage {
    let data = format!(r#"{{"heartbeatMs":{heartbeat_ms},"tag":"{tag}","timestamp":1}}"#);
    msg(id, names::READY, &data)
}

fn note(id: &str) -> SseMessage {
    msg(id, names::NOTIFICATION, r#"{"title":"t"}"#)
}

/// `message` as it comes before the stream's `ready`: missed while away.
fn missed(mut message: SseMessage) -> SseMessage {
    message.replayed = true;
    message
}

/// The URL of the stream the actions open, either transport.
fn stream_url(actions: &[Action]) -> Option<&str> {
    actions.iter().find_map(|a| match a {
        Action::OpenSse { url, .. } | Action::OpenWebSocket { url } => Some(url.as_str()),
        _ => None,
    })
}

fn websocket_url(actions: &[Action]) -> Option<&str> {
    actions.iter().find_map(|a| match a {
        Action::OpenWebSocket { url } => Some(url.as_str()),
        _ => None,
    })
}

fn delivered(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(m) => Some(m.id.clone()),
            _ => None,
        })
        .collect()
}

fn posted(actions: &[Action]) -> Vec<TabMessage> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::PostToTabs(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn errors(actions: &[Action]) -> Vec<UseSseError> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Notify(Notice::Error(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

/// The session probe the actions ask for, as (purpose, generation).
fn session_probe(actions: &[Action]) -> Option<(ProbeFor, u64)> {
    actions.iter().find_map(|a| match a {
        Action::ProbeSession {
            purpose, generation, ..
        } => Some((*purpose, *generation)),
        _ => None,
    })
}

/// A stream that failed before it opened, and the server's answer to the probe that follows.
fn failed_before_open(rig: &mut Rig, answer: SessionProbe) -> Vec<Action> {
    let actions = rig.step(Input::StreamFailed);
    let (purpose, generation) = session_probe(&actions).expect("a failure before opening probes the session");
    assert_eq!(purpose, ProbeFor::Failure);
    rig.step(Input::SessionProbed {
        purpose,
        generation,
        outcome: answer,
    })
}

#[test]
fn reconnects_back_off_exponentially_with_jitter_in_the_upper_half_up_to_30_s() {
    for (jitter, expected) in [
        (0.0, [500, 1_000, 2_000, 4_000, 8_000, 15_000, 15_000]),
        (1.0, [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]),
    ] {
        let options = UseSseOptions::default()
            .share_across_tabs(false)
            .max_reconnect_attempts(None);
        let mut rig = Rig::with(options, false, jitter);
        rig.step(Input::Start);
        let mut delays = Vec::new();
        for _ in expected {
            failed_before_open(&mut rig, SessionProbe::Unanswered);
            assert_eq!(rig.view().ready_state, ConnectionReadyState::Connecting);
            let delay = rig.remaining(Timer::Reconnect).expect("a reconnect is due");
            delays.push(delay);
            assert!(
                stream_url(&rig.advance(delay)).is_some(),
                "and reopens when it is"
            );
        }
        assert_eq!(delays, expected, "jitter {jitter}");
    }
}

#[test]
fn the_backoff_starts_over_once_a_stream_opens() {
    let options = UseSseOptions::default()
        .share_across_tabs(false)
        .reconnect_interval(1_000u64);
    let mut rig = Rig::with(options, false, 1.0);
    rig.step(Input::Start);
    for _ in 0..4 {
        failed_before_open(&mut rig, SessionProbe::Unanswered);
        rig.advance(rig.remaining(Timer::Reconnect).unwrap());
    }
    failed_before_open(&mut rig, SessionProbe::Unanswered);
    assert_eq!(rig.remaining(Timer::Reconnect), Some(16_000));
    rig.advance(16_000);
    rig.step(Input::StreamOpened);
    rig.step(Input::StreamFailed);
    assert_eq!(
        rig.remaining(Timer::Reconnect),
        Some(1_000),
        "an open stream resets the backoff"
    );
}

#[test]
fn gives_up_after_max_attempts_and_tries_again_when_online_and_visible() {
    let options = UseSseOptions::default().max_reconnect_attempts(Some(2));
    let mut rig = Rig::started_alone(options);
    for _ in 0..2 {
        failed_before_open(&mut rig, SessionProbe::Unanswered);
        rig.advance(rig.remaining(Timer::Reconnect).unwrap());
    }
    let actions = failed_before_open(&mut rig, SessionProbe::Unanswered);
    assert_eq!(errors(&actions), [UseSseError::GaveUp(2)]);
    assert_eq!(rig.view().ready_state, ConnectionReadyState::Closed);
    assert_eq!(rig.view().error, Some(UseSseError::GaveUp(2)));
    assert_eq!(
        rig.remaining(Timer::Reconnect),
        None,
        "no reconnect after giving up"
    );
    assert!(stream_url(&rig.advance(600_000)).is_none());

    let hidden = rig.step(Input::Wake { visible: false });
    assert!(
        stream_url(&hidden).is_none(),
        "a hidden tab waits until it is looked at"
    );
    let back = rig.step(Input::Wake { visible: true });
    assert!(
        stream_url(&back).is_some(),
        "online and visible again: retries at once"
    );
    failed_before_open(&mut rig, SessionProbe::Unanswered);
    assert!(
        rig.remaining(Timer::Reconnect).is_some(),
        "with a fresh count of attempts"
    );
}

#[test]
fn waking_does_nothing_unless_the_hook_gave_up() {
    let mut rig = Rig::started_alone(UseSseOptions::default());
    rig.flowing("");
    assert!(rig.step(Input::Wake { visible: true }).is_empty());
    rig.step(Input::Close);
    assert!(
        rig.step(Input::Wake { visible: true }).is_empty(),
        "closed by its owner: stays closed"
    );
}

#[test]
fn a_stall_is_judged_by_the_servers_heartbeat_interval() {
    let mut rig = Rig::started_alone(UseSseOptions::default());
    assert_eq!(
        rig.remaining(Timer::Stall),
        Some(DEFAULT_STALL_MS),
        "before the server said"
    );
    rig.step(Input::StreamOpened);
    rig.step(Input::Message(ready("0", "", 10_000)));
    assert_eq!(rig.remaining(Timer::Stall), Some(2 * 10_000 + STALL_MARGIN_MS));
    rig.advance(20_000);
    rig.step(Input::Message(msg("0", names::HEARTBEAT, "{}")));
    assert_eq!(
        rig.remaining(Timer::Stall),
        Some(25_000),
        "every frame restarts the watch"
    );
    let actions = rig.advance(25_000);
    assert_eq!(errors(&actions)[0], UseSseError::Stalled(25_000));
    assert!(actions.contains(&Action::CloseStream));
    assert!(rig.remaining(Timer::Reconnect).is_some(), "and reopens");

    // A server with a slow heartbeat is not taken for a stalled one.
    let mut rig = Rig::started_alone(UseSseOptions::default());
    rig.step(Input::StreamOpened);
    rig.step(Input::Message(ready("0", "", 60_000)));
    assert!(errors(&rig.advance(100_000)).is_empty());

    // The owner's setting wins.
    let mut rig = Rig::started_alone(UseSseOptions::default().stall_timeout(1_500));
    rig.step(Input::StreamOpened);
    rig.step(Input::Message(ready("0", "", 60_000)));
    assert_eq!(errors(&rig.advance(1_500)), [UseSseError::Stalled(1_500)]);
}

#[test]
fn a_buffered_stream_falls_back_to_websocket_and_probes_its_way_back_to_sse() {
    let mut rig = Rig::started_alone(UseSseOptions::default());
    rig.step(Input::StreamOpened);
    // Something in between holds the stream back: no `ready` within 5 s.
    let actions = rig.advance(5_000);
    assert_eq!(errors(&actions), [UseSseError::Buffered(5_000)]);
    let url = websocket_url(&actions).expect("goes on over WebSocket");
    assert!(url.starts_with("wss://app.example/api/ws?"), "{url}");
    assert!(url.contains("fallback=buffered"), "the server counts why: {url}");
    assert_eq!(rig.view().transport, Transport::WebSocket);

    rig.step(Input::StreamOpened);
    rig.step(Input::SocketText(
        "id: 3\n\nevent: ready\ndata: {\"heartbeatMs\":30000,\"tag\":\"\",\"timestamp\":1}\n\nid: 4\nevent: notification\ndata: {}\n\n"
            .into(),
    ));
    assert_eq!(rig.view().last_event_id.as_deref(), Some("4"));

    // A minute later SSE is tried again, by a probe beside the WebSocket.
    let actions = rig.advance(60_000);
    let probe = actions
        .iter()
        .find_map(|a| match a {
            Action::OpenProbe { url, .. } => Some(url.clone()),
            _ => None,
        })
        .expect("a probe");
    assert!(probe.contains("probe=1"), "{probe}");
    assert!(stream_url(&actions).is_none(), "the WebSocket goes on meanwhile");

    // Still buffered: the probe's ready does not come; try again a minute later.
    let actions = rig.advance(5_000);
    assert!(actions.contains(&Action::CloseProbe));
    assert_eq!(rig.remaining(Timer::SseRetry), Some(60_000));
    rig.step(Input::SocketText(
        "id: 5\nevent: notification\ndata: {}\n\n".into(),
    ));

    // Now it gets through: back on SSE, resuming after the last WebSocket event.
    rig.advance(60_000);
    let actions = rig.step(Input::ProbeReady);
    let url = stream_url(&actions).expect("reopens on SSE");
    assert!(url.starts_with("/api/sse?lastEventId=5"), "{url}");
    assert!(!url.contains("fallback"), "{url}");
    assert_eq!(rig.view().transport, Transport::Sse);
}

#[test]
fn three_failures_to_open_while_the_server_answers_move_to_websocket() {
    let mut rig = Rig::started_alone(UseSseOptions::default());
    for _ in 0..2 {
        let actions = failed_before_open(&mut rig, SessionProbe::Accepted(None));
        assert!(stream_url(&actions).is_none());
        rig.advance(rig.remaining(Timer::Reconnect).unwrap());
    }
    // Failures while the server does not answer at all prove nothing about SSE.
    failed_before_open(&mut rig, SessionProbe::Unanswered);
    rig.advance(rig.remaining(Timer::Reconnect).unwrap());
    let actions = failed_before_open(&mut rig, SessionProbe::Accepted(None));
    let url = websocket_url(&actions).expect("the third failure while answered moves on");
    assert!(url.contains("fallback=failed"), "{url}");

    // With SSE only, never.
    let mut rig = Rig::started_alone(UseSseOptions::default().transport(TransportMode::Sse));
    for _ in 0..5 {
        let actions = failed_before_open(&mut rig, SessionProbe::Accepted(None));
        assert!(websocket_url(&actions).is_none());
        let reopened = rig.advance(rig.remaining(Timer::Reconnect).unwrap());
        assert!(stream_url(&reopened).unwrap().starts_with("/api/sse"));
    }
}

#[test]
fn a_session_that_cannot_be_checked_now_is_retried_over_sse_not_a_sign_out() {
    // The host's session store is down: the probe answers 503. Not signed out (the hook
    // keeps trying), and not a network that stops SSE (no move to WebSocket).
    let mut rig = Rig::started_alone(UseSseOptions::default());
    for _ in 0..5 {
        let actions = failed_before_open(&mut rig, SessionProbe::Unavailable);
        assert!(errors(&actions).iter().all(|e| *e != UseSseError::Unauthorized));
        assert!(websocket_url(&actions).is_none());
        let reopened = rig.advance(rig.remaining(Timer::Reconnect).expect("retried"));
        assert!(stream_url(&reopened).unwrap().starts_with("/api/sse"));
    }
    rig.step(Input::StreamOpened);
    assert_eq!(rig.view().ready_state, ConnectionReadyState::Open);
}

#[test]
fn signing_out_clears_the_refusal_it_caused() {
    let mut rig = Rig::started_alone(UseSseOptions::default());
    failed_before_open(&mut rig, SessionProbe::Refused);
    assert_eq!(rig.view().error, Some(UseSseError::Unauthorized));
    rig.step(Input::UserChanged { signed_in: false });
    assert_eq!(rig.view().ready_state, ConnectionReadyState::Closed);
    assert_eq!(rig.view().error, None, "an ordinary sign-out is no error");
}

#[test]
fn a_refused_session_stops_or_fetches_a_fresh_token() {
    let mut rig = Rig::started_alone(UseSseOptions::default());
    let actions = failed_before_open(&mut rig, SessionProbe::Refused);
    assert_eq!(errors(&actions), [UseSseError::Unauthorized]);
    assert_eq!(rig.remaining(Timer::Reconnect), None, "stays closed");

    let options = UseSseOptions::default().token_url(Some("/auth/token".into()));
    let mut rig = Rig::started_alone(options);
    let actions = failed_before_open(&mut rig, SessionProbe::Refused);
    let generation = actions
        .iter()
        .find_map(|a| match a {
            Action::FetchToken { url, generation, .. } if url == "/auth/token" => Some(*generation),
            _ => None,
        })
        .expect("fetches a fresh token");
    let actions = rig.step(Input::TokenFetched {
        generation,
        outcome: Fetched::Token("fresh".into()),
    });
    assert_eq!(
        stream_url(&actions),
        Some("/api/sse?resumeAgoMs=1000&token=fresh")
    );
}

#[test]
fn an_expired_session_refreshes_its_token_and_resumes_a_logged_out_one_stays_closed() {
    let options = UseSseOptions::default().token_url(Some("/auth/token".into()));
    let mut rig = Rig::started_alone(options.clone());
    rig.flowing("");
    rig.step(Input::Message(note("8")));
    let actions = rig.step(Input::Message(msg(
        "",
        names::SESSION_ENDED,
        r#"{"reason":"expired"}"#,
    )));
    assert_eq!(errors(&actions), [UseSseError::Unauthorized]);
    assert!(actions.contains(&Action::Notify(Notice::Close)));
    let generation = actions
        .iter()
        .find_map(|a| match a {
            Action::FetchToken { generation, .. } => Some(*generation),
            _ => None,
        })
        .expect("an expired session fetches a fresh token");
    let actions = rig.step(Input::TokenFetched {
        generation,
        outcome: Fetched::Token("t2".into()),
    });
    assert_eq!(stream_url(&actions), Some("/api/sse?lastEventId=8&token=t2"));

    // At most two fresh tokens in a row that do not get a stream open.
    for fetches in [true, false] {
        let actions = failed_before_open(&mut rig, SessionProbe::Refused);
        let fetch = actions.iter().find_map(|a| match a {
            Action::FetchToken { generation, .. } => Some(*generation),
            _ => None,
        });
        assert_eq!(fetch.is_some(), fetches);
        if let Some(generation) = fetch {
            rig.step(Input::TokenFetched {
                generation,
                outcome: Fetched::Token("t3".into()),
            });
        }
    }

    let mut rig = Rig::started_alone(options);
    rig.flowing("");
    let actions = rig.step(Input::Message(msg(
        "",
        names::SESSION_ENDED,
        r#"{"reason":"disconnected"}"#,
    )));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::FetchToken { .. })),
        "logged out: no fresh token"
    );
    assert_eq!(rig.view().error, Some(UseSseError::Unauthorized));
    let actions = rig.step(Input::Open);
    assert!(stream_url(&actions).is_some(), "until the owner opens again");
}

#[test]
fn the_first_token_comes_from_token_url_before_any_stream() {
    let options = UseSseOptions::default()
        .token_url(Some("/auth/token".into()))
        .token_first(true);
    let mut rig = Rig::with(options.share_across_tabs(false), false, 0.5);
    let actions = rig.step(Input::Start);
    assert!(stream_url(&actions).is_none());
    let Some(Action::FetchToken { generation, .. }) =
        actions.iter().find(|a| matches!(a, Action::FetchToken { .. }))
    else {
        panic!("fetches first: {actions:?}")
    };
    let generation = *generation;
    assert!(
        !rig.step(Input::Open)
            .iter()
            .any(|a| matches!(a, Action::FetchToken { .. })),
        "one fetch at a time"
    );
    // It fails: retried with the backoff.
    let actions = rig.step(Input::TokenFetched {
        generation,
        outcome: Fetched::Failed,
    });
    assert_eq!(errors(&actions), [UseSseError::Connection]);
    let actions = rig.advance(rig.remaining(Timer::Reconnect).unwrap());
    let Some(Action::FetchToken { generation, .. }) =
        actions.iter().find(|a| matches!(a, Action::FetchToken { .. }))
    else {
        panic!("fetches again: {actions:?}")
    };
    let generation = *generation;
    // Refused: not signed in.
    let actions = rig.step(Input::TokenFetched {
        generation,
        outcome: Fetched::Refused,
    });
    assert_eq!(errors(&actions), [UseSseError::Unauthorized]);
    assert_eq!(rig.remaining(Timer::Reconnect), None);
}

#[test]
fn a_late_answer_for_an_earlier_start_is_ignored() {
    let options = UseSseOptions::default()
        .token_url(Some("/auth/token".into()))
        .token_first(true);
    let mut rig = Rig::with(options, false, 0.5);
    let actions = rig.step(Input::Start);
    let Some(Action::FetchToken { generation, .. }) =
        actions.iter().find(|a| matches!(a, Action::FetchToken { .. }))
    else {
        panic!("{actions:?}")
    };
    let generation = *generation;
    rig.step(Input::UserChanged { signed_in: true });
    let actions = rig.step(Input::TokenFetched {
        generation,
        outcome: Fetched::Token("for the previous user".into()),
    });
    assert!(stream_url(&actions).is_none(), "{actions:?}");

    let mut rig = Rig::new(UseSseOptions::default());
    let (_, generation) = session_probe(&rig.step(Input::Start)).unwrap();
    rig.step(Input::Close);
    let actions = rig.step(Input::SessionProbed {
        purpose: ProbeFor::Joining,
        generation,
        outcome: SessionProbe::Accepted(Some("A".into())),
    });
    assert!(actions.is_empty(), "closed meanwhile: {actions:?}");
}

#[test]
fn replaced_stays_closed_until_opened() {
    let mut rig = Rig::started_alone(UseSseOptions::default());
    rig.flowing("");
    let actions = rig.step(Input::Message(msg("", names::CONNECTION_REPLACED, "{}")));
    assert_eq!(errors(&actions), [UseSseError::Replaced]);
    assert_eq!(rig.remaining(Timer::Reconnect), None);
    assert!(stream_url(&rig.advance(600_000)).is_none());
    assert!(stream_url(&rig.step(Input::Open)).is_some());
}

#[test]
fn duplicates_are_dropped_and_events_without_ids_pass() {
    let mut rig = Rig::started_alone(UseSseOptions::default());
    rig.flowing("");
    let mut seen = Vec::new();
    for m in [note("1"), note("2"), note("1"), note("2"), note("3")] {
        seen.extend(delivered(&rig.step(Input::Message(m))));
    }
    assert_eq!(seen, ["1", "2", "3"], "each id once, even out of order");
    // EventSource repeats the last id on an event sent without one.
    let actions = rig.step(Input::Message(msg("3", names::RESYNC, r#"{"reason":"gone"}"#)));
    assert_eq!(delivered(&actions), ["3"]);
    assert_eq!(
        errors(&actions),
        [UseSseError::Resync(r#"{"reason":"gone"}"#.into())]
    );
    assert_eq!(rig.view().last_event_id.as_deref(), Some("3"));
}

#[test]
fn a_stream_without_an_id_resumes_from_when_the_first_was_asked_for() {
    let mut rig = Rig::started_alone(UseSseOptions::default());
    rig.advance(4_000);
    // 4 s, the reconnect's 750 ms and 1 s for the request on its way.
    let actions = failed_before_open(&mut rig, SessionProbe::Unanswered);
    assert!(stream_url(&actions).is_none());
    let actions = rig.advance(rig.remaining(Timer::Reconnect).unwrap());
    assert_eq!(stream_url(&actions), Some("/api/sse?resumeAgoMs=5750"));
    // The opening id or a heartbeat's is adopted before any event.
    rig.step(Input::StreamOpened);
    rig.step(Input::Message(msg("41", names::HEARTBEAT, "{}")));
    rig.step(Input::StreamFailed);
    let actions = rig.advance(rig.remaining(Timer::Reconnect).unwrap());
    assert_eq!(stream_url(&actions), Some("/api/sse?lastEventId=41"));
}

/// A tab that probes its session, learns tag `tag` and joins its tabs' election.
fn joined(options: UseSseOptions, tag: &str) -> (Rig, u64) {
    let mut rig = Rig::new(options);
    let (purpose, generation) = session_probe(&rig.step(Input::Start)).expect("asks who it is");
    assert_eq!(purpose, ProbeFor::Joining);
    assert!(!rig.view().is_leader);
    let actions = rig.step(Input::SessionProbed {
        purpose,
        generation,
        outcome: SessionProbe::Accepted(Some(tag.into())),
    });
    assert_eq!(
        actions,
        [Action::JoinTabs {
            tag: tag.into(),
            generation
        }],
        "joins without opening a stream of its own"
    );
    assert_eq!(rig.view().identity_tag.as_deref(), Some(tag));
    (rig, generation)
}

#[test]
fn a_follower_shows_what_the_leader_relays() {
    let (mut rig, _) = joined(UseSseOptions::default(), "A");
    rig.step(Input::Heard(TabMessage::State {
        state: "open".into(),
        error: None,
        transport: "websocket".into(),
    }));
    assert_eq!(rig.view().ready_state, ConnectionReadyState::Open);
    assert_eq!(rig.view().transport, Transport::WebSocket);
    let actions = rig.step(Input::Heard(TabMessage::Event(note("5"))));
    assert_eq!(delivered(&actions), ["5"]);
    assert_eq!(rig.view().last_event_id.as_deref(), Some("5"));
    // `open()` in a follower asks the leader.
    assert_eq!(posted(&rig.step(Input::Open)), [TabMessage::Revive]);
}

#[test]
fn a_follower_takes_over_from_a_leader_that_crashed_resuming_from_the_last_id() {
    let (mut rig, generation) = joined(UseSseOptions::default(), "A");
    rig.step(Input::Heard(TabMessage::Position { id: "4".into() }));
    rig.step(Input::Heard(TabMessage::Event(note("5"))));
    rig.step(Input::Heard(TabMessage::Event(note("6"))));
    // No `closed` state came: the leader's tab crashed, and the browser handed the lock on.
    let actions = rig.step(Input::BecameLeader { generation });
    assert!(rig.view().is_leader);
    assert_eq!(stream_url(&actions), Some("/api/sse?lastEventId=6"));
    rig.step(Input::StreamOpened);
    rig.step(Input::Message(ready("6", "A", 30_000)));
    // The replay repeats nothing delivered before, and what is new goes to the others too.
    assert!(delivered(&rig.step(Input::Message(note("5")))).is_empty());
    let actions = rig.step(Input::Message(note("7")));
    assert_eq!(delivered(&actions), ["7"]);
    assert_eq!(posted(&actions), [TabMessage::Event(note("7"))]);
}

#[test]
fn a_follower_that_never_heard_a_position_resumes_from_when_it_joined() {
    let (mut rig, generation) = joined(UseSseOptions::default(), "A");
    rig.advance(3_000);
    let actions = rig.step(Input::BecameLeader { generation });
    assert_eq!(stream_url(&actions), Some("/api/sse?resumeAgoMs=4000"));
    // A lock granted for an earlier start is not this one's.
    let (mut rig, generation) = joined(UseSseOptions::default(), "A");
    rig.step(Input::Close);
    assert!(rig.step(Input::BecameLeader { generation }).is_empty());
}

#[test]
fn a_leader_relays_only_once_ready_confirms_the_identity() {
    let (mut rig, generation) = joined(UseSseOptions::default(), "A");
    rig.step(Input::BecameLeader { generation });
    rig.step(Input::StreamOpened);
    let early = rig.step(Input::Message(note("1")));
    assert_eq!(delivered(&early), ["1"], "the leader's own tab sees it at once");
    assert!(posted(&early).iter().all(|m| !matches!(m, TabMessage::Event(_))));
    let actions = rig.step(Input::Message(ready("1", "A", 30_000)));
    assert_eq!(
        posted(&actions),
        [
            TabMessage::Event(missed(note("1"))),
            TabMessage::Position { id: "1".into() }
        ]
    );
    // A new tab says hello: it hears where the stream is.
    let hello = posted(&rig.step(Input::Heard(TabMessage::Hello)));
    assert!(matches!(&hello[0], TabMessage::State { state, .. } if state == "open"));
    assert_eq!(hello[1], TabMessage::Position { id: "1".into() });
}

/// The messages delivered to the owner.
fn delivered_messages(actions: &[Action]) -> Vec<SseMessage> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn what_comes_before_ready_is_marked_missed_for_this_tab_and_the_others() {
    let (mut rig, generation) = joined(UseSseOptions::default(), "A");
    rig.step(Input::BecameLeader { generation });
    rig.step(Input::StreamOpened);
    let replay = rig.step(Input::Message(note("1")));
    assert_eq!(delivered_messages(&replay), [missed(note("1"))]);
    let actions = rig.step(Input::Message(ready("1", "A", 30_000)));
    assert_eq!(posted(&actions)[0], TabMessage::Event(missed(note("1"))));
    let live = rig.step(Input::Message(note("2")));
    assert_eq!(delivered_messages(&live), [note("2")]);
    assert_eq!(posted(&live), [TabMessage::Event(note("2"))]);
    // The next stream's prelude is a replay again.
    rig.step(Input::StreamFailed);
    rig.advance(rig.remaining(Timer::Reconnect).unwrap());
    rig.step(Input::StreamOpened);
    let replay = rig.step(Input::Message(note("3")));
    assert_eq!(delivered_messages(&replay), [missed(note("3"))]);
}

#[test]
fn a_leader_whose_stream_is_another_identity_moves_before_relaying_anything() {
    let (mut rig, generation) = joined(UseSseOptions::default(), "A");
    rig.step(Input::BecameLeader { generation });
    rig.step(Input::StreamOpened);
    let before = rig.step(Input::Message(note("1")));
    // Another user signed in in this browser meanwhile: the stream is B's.
    let actions = rig.step(Input::Message(ready("1", "B", 30_000)));
    let relayed: Vec<_> = posted(&before).into_iter().chain(posted(&actions)).collect();
    assert!(
        relayed
            .iter()
            .all(|m| !matches!(m, TabMessage::Event(_) | TabMessage::Position { .. })),
        "nothing of B's reaches A's tabs: {relayed:?}"
    );
    let leave = actions
        .iter()
        .position(|a| *a == Action::LeaveTabs)
        .expect("leaves A's tabs");
    let join = actions
        .iter()
        .position(|a| matches!(a, Action::JoinTabs { tag, .. } if tag == "B"))
        .expect("joins B's");
    assert!(leave < join);
    assert!(actions.contains(&Action::CloseStream));
    assert_eq!(rig.view().identity_tag.as_deref(), Some("B"));
}

#[test]
fn a_tab_whose_tags_keep_changing_stops_sharing() {
    let (mut rig, mut generation) = joined(UseSseOptions::default(), "A");
    let mut warned = false;
    for tag in ["B", "C", "D"] {
        rig.step(Input::BecameLeader { generation });
        rig.step(Input::StreamOpened);
        let actions = rig.step(Input::Message(ready("1", tag, 30_000)));
        warned |= actions.iter().any(|a| matches!(a, Action::Warn(_)));
        match actions.iter().find_map(|a| match a {
            Action::JoinTabs { generation, .. } => Some(*generation),
            _ => None,
        }) {
            Some(next) => generation = next,
            None => {
                assert!(stream_url(&actions).is_some(), "opens alone");
                assert!(rig.view().is_leader);
            }
        }
    }
    assert!(warned, "says why (instances that do not share SSE_JWT_SECRET)");
}

#[test]
fn a_tab_alone_joins_its_identitys_tabs_once_its_stream_names_it() {
    let mut rig = Rig::new(UseSseOptions::default());
    let (purpose, generation) = session_probe(&rig.step(Input::Start)).unwrap();
    // The server named no identity yet (or did not answer): open alone.
    let actions = rig.step(Input::SessionProbed {
        purpose,
        generation,
        outcome: SessionProbe::Unanswered,
    });
    assert!(stream_url(&actions).is_some());
    rig.step(Input::StreamOpened);
    let actions = rig.step(Input::Message(ready("9", "A", 30_000)));
    assert!(actions.contains(&Action::CloseStream));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::JoinTabs { tag, .. } if tag == "A")));
    // The join fails after all: alone again, resuming after the opening id.
    let actions = rig.step(Input::JoinFailed);
    assert_eq!(stream_url(&actions), Some("/api/sse?lastEventId=9"));
}

#[test]
fn without_web_locks_each_tab_holds_its_own_stream() {
    let mut rig = Rig::with(UseSseOptions::default(), false, 0.5);
    let actions = rig.step(Input::Start);
    assert!(session_probe(&actions).is_none(), "no election to join");
    assert_eq!(stream_url(&actions), Some("/api/sse"));
    assert!(rig.view().is_leader);
    let actions = rig.flowing("A");
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            Action::JoinTabs { .. } | Action::PostToTabs(_) | Action::CloseStream
        )),
        "{actions:?}"
    );
    assert_eq!(rig.view().identity_tag.as_deref(), Some("A"));
    assert_eq!(delivered(&rig.step(Input::Message(note("1")))), ["1"]);
}

#[test]
fn a_new_user_starts_from_now_not_from_the_last_users_position() {
    let mut rig = Rig::started_alone(UseSseOptions::default());
    rig.flowing("A");
    rig.step(Input::Message(note("12")));
    let actions = rig.step(Input::UserChanged { signed_in: true });
    assert!(actions.contains(&Action::CloseStream));
    assert!(actions.contains(&Action::Notify(Notice::Close)));
    assert_eq!(stream_url(&actions), Some("/api/sse"));
    assert_eq!(rig.view().last_event_id, None);
    assert_eq!(rig.view().identity_tag, None);
    let actions = rig.step(Input::UserChanged { signed_in: false });
    assert!(stream_url(&actions).is_none(), "signed out: no stream");
    assert_eq!(rig.view().ready_state, ConnectionReadyState::Closed);
}

#[test]
fn close_stops_everything_and_hands_the_lead_on() {
    let (mut rig, generation) = joined(UseSseOptions::default(), "A");
    rig.step(Input::BecameLeader { generation });
    rig.flowing("A");
    let actions = rig.step(Input::Close);
    assert!(actions.contains(&Action::CloseStream));
    assert!(actions.contains(&Action::LeaveTabs));
    assert!(actions.contains(&Action::Notify(Notice::Close)));
    assert!(
        posted(&actions)
            .iter()
            .any(|m| matches!(m, TabMessage::State { state, .. } if state == "closed")),
        "the others hear it closed before the lock passes"
    );
    assert!(rig.due.is_empty(), "no timer left: {:?}", rig.due);
    assert!(rig.advance(600_000).is_empty());
}

#[test]
fn a_token_from_token_url_is_replaced_before_it_expires() {
    // A JWT whose payload is {"sub": "alice", "exp": 1900}, and a server clock at 1,000 s.
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiAiYWxpY2UiLCAiZXhwIjogMTkwMH0.sig";
    assert_eq!(token_expiry(jwt), Some(1_900));
    assert_eq!(token_expiry("opaque-token"), None);
    let ready_at = |id: &str| {
        msg(
            id,
            names::READY,
            r#"{"heartbeatMs":30000,"tag":"","timestamp":1000000}"#,
        )
    };
    let options = UseSseOptions::default()
        .token(Some(jwt.into()))
        .token_url(Some("/auth/token".into()));
    let mut rig = Rig::started_alone(options.clone());
    rig.step(Input::StreamOpened);
    rig.step(Input::Message(ready_at("3")));
    assert_eq!(
        rig.remaining(Timer::TokenRefresh),
        Some(900_000 - TOKEN_REFRESH_AHEAD_MS),
        "a minute before it expires"
    );
    let actions = rig.beating(840_000);
    let generation = actions
        .iter()
        .find_map(|a| match a {
            Action::FetchToken { generation, .. } => Some(*generation),
            _ => None,
        })
        .expect("fetches a fresh token ahead of time");
    assert!(
        !actions.contains(&Action::CloseStream),
        "the stream flows meanwhile"
    );
    let actions = rig.step(Input::TokenFetched {
        generation,
        outcome: Fetched::Token("fresh".into()),
    });
    assert_eq!(
        stream_url(&actions),
        Some("/api/sse?lastEventId=3&token=fresh"),
        "moves to the fresh token, resuming where it was"
    );

    // A failed early fetch leaves the stream alone.
    let mut rig = Rig::started_alone(options.clone());
    rig.step(Input::StreamOpened);
    rig.step(Input::Message(ready_at("3")));
    let actions = rig.beating(840_000);
    let Some(Action::FetchToken { generation, .. }) =
        actions.iter().find(|a| matches!(a, Action::FetchToken { .. }))
    else {
        panic!("{actions:?}")
    };
    let actions = rig.step(Input::TokenFetched {
        generation: *generation,
        outcome: Fetched::Failed,
    });
    assert!(
        errors(&actions).is_empty() && !actions.contains(&Action::CloseStream),
        "{actions:?}"
    );
    assert_eq!(rig.view().ready_state, ConnectionReadyState::Open);

    // Without token_url there is nothing to refresh from.
    let mut rig = Rig::started_alone(UseSseOptions::default().token(Some(jwt.into())));
    rig.step(Input::StreamOpened);
    rig.step(Input::Message(ready_at("3")));
    assert_eq!(rig.remaining(Timer::TokenRefresh), None);
}
