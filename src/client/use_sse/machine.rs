//! Every decision of the hook's connection, without I/O: a state machine that takes what
//! happened ([`Input`]: the stream opened, a frame came, a timer fired, this tab now leads,
//! a token was fetched...) and says what to do ([`Action`]: open SSE at this URL, set a
//! timer, post to the other tabs, deliver an event...), the way protocol libraries such as
//! quinn-proto and rustls are built. `browser.rs` maps web-sys to inputs and performs the
//! actions; everything here runs in `cargo test` on the host, on a fake clock.
//!
//! What the signals show is [`View`], a projection of the state the adapter copies to the
//! signals after every step.
#![cfg_attr(feature = "ssr", allow(dead_code))]

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{
    parse_frames, ConnectionReadyState, SseMessage, StreamParams, Transport, TransportMode, UseSseError,
    UseSseOptions,
};
use crate::{api, backoff::backoff_delay, events::names};

/// How many recent ids are remembered to drop duplicates.
const SEEN_IDS: usize = 512;
/// Reconnect delays never grow past this.
pub(super) const MAX_RECONNECT_DELAY_MS: u64 = 30_000;
/// Fresh tokens fetched in a row without the stream opening, before giving up on them.
const MAX_TOKEN_REFRESHES: u32 = 2;
/// Added to a resume age for the time a request takes to reach the server.
const RESUME_MARGIN_MS: u64 = 1_000;
/// SSE failures to open in a row, while the server answers, before WebSocket is tried.
pub(super) const SSE_FAILURES_BEFORE_FALLBACK: u32 = 3;
/// Times in a row a tab moves to the tabs of another identity tag before it stops
/// sharing: more means the tags keep changing (instances that do not share
/// `SSE_JWT_SECRET`).
const MAX_IDENTITY_SWITCHES: u32 = 2;
/// A token from `token_url` is replaced this long before it expires (or a fifth of its
/// life, for a shorter one), so the stream moves to a fresh one before the server ends it.
pub(super) const TOKEN_REFRESH_AHEAD_MS: u64 = 60_000;
/// The stall window before a stream's `ready` said how often heartbeats come.
pub(super) const DEFAULT_STALL_MS: u64 = 65_000;
/// Added to two heartbeat intervals for the stall window: a heartbeat may be late by a
/// busy server or network, never by a whole interval more.
pub(super) const STALL_MARGIN_MS: u64 = 5_000;

/// What tabs tell each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(super) enum TabMessage {
    /// Leader to all: an event its stream received, in order.
    Event(SseMessage),
    /// Leader to all: the id its stream stands at (the stream's opening id before any
    /// event), so whichever tab leads next resumes from there and loses nothing.
    Position { id: String },
    /// Leader to all: where the shared stream is.
    State {
        state: String,
        error: Option<(String, String)>,
        /// `sse` or `websocket`.
        #[serde(default)]
        transport: String,
    },
    /// A new tab to the leader: please send your state.
    Hello,
    /// A follower to the leader: `open` was called here; reopen if closed.
    Revive,
}

/// The timers the connection keeps; at most one of each runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// Reopen after a failure (backoff).
    Reconnect,
    /// Nothing came for the stall window.
    Stall,
    /// An SSE response opened and its `ready` did not follow.
    Buffering,
    /// On WebSocket: time to see whether SSE gets through again.
    SseRetry,
    /// The SSE probe's `ready` did not come in time.
    Probe,
    /// The stream's token from `token_url` is about to expire.
    TokenRefresh,
}

const TIMERS: usize = 6;

impl Timer {
    fn slot(self) -> usize {
        self as usize
    }
}

/// Why the session is probed (`HEAD` on the stream URL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProbeFor {
    /// To learn the identity whose tabs to join.
    Joining,
    /// A stream failed before it opened: refused, or not getting through?
    Failure,
}

/// What `HEAD` on the stream URL said about this tab's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SessionProbe {
    /// It would be let in, as the identity of this tag (`None` from a server that names
    /// none).
    Accepted(Option<String>),
    /// A clear 401.
    Refused,
    /// 503: the server cannot check the session now (its session store is down): not a
    /// sign-out, and nothing to do with SSE getting through.
    Unavailable,
    /// No answer (offline, server down): nothing is known.
    Unanswered,
}

/// What `token_url` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fetched {
    Token(String),
    /// 401 or 403: not signed in.
    Refused,
    /// Unreachable, another status, no answer in time, or no token in the body.
    Failed,
}

/// What happened, as the adapter reports it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Input {
    /// Start holding or sharing the stream (at once, or when a user signed in).
    Start,
    /// The signed-in user changed: forget the old stream's position, start again if
    /// someone is signed in.
    UserChanged {
        signed_in: bool,
    },
    /// The owner called `open()`.
    Open,
    /// The owner called `close()`, or the hook went away.
    Close,
    /// The browser came back online or the tab became visible (`visible` now or not).
    Wake {
        visible: bool,
    },
    SessionProbed {
        purpose: ProbeFor,
        generation: u64,
        outcome: SessionProbe,
    },
    TokenFetched {
        generation: u64,
        outcome: Fetched,
    },
    /// The tabs' election could not be joined (no lock or channel after all).
    JoinFailed,
    /// This tab got the lock of its election.
    BecameLeader {
        generation: u64,
    },
    /// Another tab of the election said something.
    Heard(TabMessage),
    /// The stream (either transport) opened.
    StreamOpened,
    /// The stream failed to open, errored or closed.
    StreamFailed,
    /// An event from the `EventSource`.
    Message(SseMessage),
    /// A text message from the WebSocket: SSE frames.
    SocketText(String),
    /// The SSE probe's `ready` came.
    ProbeReady,
    /// The SSE probe could not be opened.
    ProbeFailed,
    TimerFired(Timer),
}

/// The owner's callbacks.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Notice {
    Open,
    Close,
    Error(UseSseError),
}

/// What the adapter is to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Action {
    OpenSse {
        url: String,
        credentials: bool,
    },
    OpenWebSocket {
        url: String,
    },
    /// Close the stream, whichever transport, and forget its listeners.
    CloseStream,
    /// Open the SSE probe (only its `ready` is listened for).
    OpenProbe {
        url: String,
        credentials: bool,
    },
    CloseProbe,
    /// (Re)start `Timer` to fire in `ms`, replacing a running one.
    SetTimer(Timer, u64),
    ClearTimer(Timer),
    /// `HEAD` the stream URL; answer with [`Input::SessionProbed`].
    ProbeSession {
        url: String,
        credentials: bool,
        purpose: ProbeFor,
        generation: u64,
    },
    /// `GET token_url`; answer with [`Input::TokenFetched`].
    FetchToken {
        url: String,
        credentials: bool,
        generation: u64,
    },
    /// Join the election of the tabs of identity `tag`; [`Input::BecameLeader`] with
    /// `generation` once this tab holds the lock, [`Input::JoinFailed`] if it cannot join.
    JoinTabs {
        tag: String,
        generation: u64,
    },
    LeaveTabs,
    PostToTabs(TabMessage),
    /// Show the event (`last_event`) and call `on_message`.
    Deliver(SseMessage),
    Notify(Notice),
    Warn(String),
}

/// What the hook's signals show.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct View {
    pub ready_state: ConnectionReadyState,
    pub error: Option<UseSseError>,
    pub last_event_id: Option<String>,
    pub is_leader: bool,
    pub identity_tag: Option<String>,
    pub transport: Transport,
}

/// Who holds the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// This tab alone (tabs do not share, or cannot, or the server named no identity).
    Alone,
    /// Another tab leads; this one hears its events through the relay. Also while the
    /// tab asks the server who it is, before it joins the tabs of that identity.
    Follower,
    Leader,
}

/// The connection: its state, and the rules that move it.
pub(super) struct Machine {
    options: UseSseOptions,
    /// The page's origin (`https://host`), for a relative WebSocket URL.
    origin: String,
    /// Web Locks and BroadcastChannel exist here.
    tabs_supported: bool,
    /// A number in `0.0..1.0` for each reconnect's jitter.
    random: Box<dyn FnMut() -> f64>,
    view: View,
    role: Role,
    /// The identity tag of the tabs' election this tab is in.
    election: Option<String>,
    /// The transport of the stream open now.
    stream: Option<Transport>,
    transport: Transport,
    /// Why the stream is on WebSocket (`buffered`, `failed`), told to the server.
    fallback: Option<&'static str>,
    /// SSE failed to open this many times in a row while the server answered.
    sse_failures: u32,
    /// The `ready` event came on the current stream.
    ready: bool,
    /// Events of the current stream that came before its `ready`: a leader relays them
    /// only once `ready` confirmed that the stream is for its tabs' identity.
    unconfirmed: Vec<SseMessage>,
    /// Moves to the tabs of another identity tag in a row, without a stream confirming
    /// the tag it joined with in between.
    identity_switches: u32,
    /// The SSE probe is open (while on WebSocket).
    probing: bool,
    seen: VecDeque<String>,
    last_id: Option<String>,
    /// The id the last WebSocket frame set (what `EventSource.lastEventId` would be).
    socket_last_id: Option<String>,
    /// When the first stream without an id was asked for: a later one that still has no
    /// id resumes from then, so nothing published while an earlier stream was held back
    /// is lost.
    started_at: Option<f64>,
    /// The token sent as `?token=`: the configured one, or the last fresh one.
    token: Option<String>,
    /// The generation whose first token is being fetched (`token_first`).
    fetching_token: Option<u64>,
    /// A token is being fetched ahead of the current one's expiry, while the stream flows.
    refreshing_early: bool,
    /// How often the server said heartbeats come (its `ready`).
    heartbeat_ms: Option<u64>,
    attempts: u32,
    refreshes: u32,
    /// The current stream opened.
    opened: bool,
    /// No reconnect by itself: closed, replaced, unauthorized, or gave up.
    stopped: bool,
    /// Bumped on every (re)start, so a late answer (probe, token, lock) of an earlier
    /// one is ignored.
    generation: u64,
    armed: [bool; TIMERS],
    /// What the step being taken is to do.
    actions: Vec<Action>,
    /// The time of the step being taken (ms on any monotonic clock).
    now: f64,
}

impl Machine {
    /// A connection that does nothing until [`Input::Start`] (or `Open`).
    pub(super) fn new(
        options: UseSseOptions,
        origin: String,
        tabs_supported: bool,
        random: Box<dyn FnMut() -> f64>,
    ) -> Self {
        Self {
            token: options.token.clone(),
            options,
            origin,
            tabs_supported,
            random,
            view: View {
                ready_state: ConnectionReadyState::Closed,
                error: None,
                last_event_id: None,
                is_leader: true,
                identity_tag: None,
                transport: Transport::Sse,
            },
            role: Role::Alone,
            election: None,
            stream: None,
            transport: Transport::Sse,
            fallback: None,
            sse_failures: 0,
            ready: false,
            unconfirmed: Vec::new(),
            identity_switches: 0,
            probing: false,
            seen: VecDeque::new(),
            last_id: None,
            socket_last_id: None,
            started_at: None,
            fetching_token: None,
            refreshing_early: false,
            heartbeat_ms: None,
            attempts: 0,
            refreshes: 0,
            opened: false,
            stopped: false,
            generation: 0,
            armed: [false; TIMERS],
            actions: Vec::new(),
            now: 0.0,
        }
    }

    /// What the signals show now.
    pub(super) fn view(&self) -> &View {
        &self.view
    }

    /// Takes in what happened at `now` (ms) and says what to do about it.
    pub(super) fn step(&mut self, now: f64, input: Input) -> Vec<Action> {
        self.now = now;
        match input {
            Input::Start => self.begin(),
            Input::UserChanged { signed_in } => {
                self.close();
                // A sign-out is ordinary: the refusal or the end of session it caused is
                // no error to show any more.
                self.set_state(ConnectionReadyState::Closed, Some(None));
                self.last_id = None;
                self.started_at = None;
                self.seen.clear();
                self.view.last_event_id = None;
                self.view.identity_tag = None;
                if signed_in {
                    self.begin();
                }
            }
            Input::Open => self.revive(),
            Input::Close => self.close(),
            Input::Wake { visible } => {
                if visible && matches!(self.view.error, Some(UseSseError::GaveUp(_))) {
                    self.revive();
                }
            }
            Input::SessionProbed {
                purpose,
                generation,
                outcome,
            } => {
                if generation == self.generation && !self.stopped {
                    match purpose {
                        ProbeFor::Joining => self.probed_for_joining(outcome),
                        ProbeFor::Failure => self.probed_after_failure(outcome),
                    }
                }
            }
            Input::TokenFetched { generation, outcome } => self.token_fetched(generation, outcome),
            Input::JoinFailed => {
                self.election = None;
                self.open_alone();
            }
            Input::BecameLeader { generation } => self.became_leader(generation),
            Input::Heard(message) => self.heard(message),
            Input::StreamOpened => self.opened(),
            Input::StreamFailed => self.fail(UseSseError::Connection),
            Input::Message(msg) => self.received(msg),
            Input::SocketText(text) => self.socket_text(&text),
            Input::ProbeReady => {
                self.close_probe();
                if self.transport == Transport::WebSocket && !self.stopped {
                    self.transport = Transport::Sse;
                    self.fallback = None;
                    self.open();
                }
            }
            Input::ProbeFailed => {
                self.close_probe();
                self.schedule_sse_retry();
            }
            Input::TimerFired(timer) => {
                if std::mem::take(&mut self.armed[timer.slot()]) {
                    self.timer_fired(timer);
                }
            }
        }
        std::mem::take(&mut self.actions)
    }

    fn timer_fired(&mut self, timer: Timer) {
        match timer {
            Timer::Reconnect => self.open(),
            Timer::Stall => self.fail(UseSseError::Stalled(self.stall_window())),
            Timer::Buffering => self.buffered(),
            Timer::SseRetry => self.retry_sse(),
            Timer::Probe => {
                self.close_probe();
                self.schedule_sse_retry();
            }
            Timer::TokenRefresh => {
                if let (Some(url), false) = (self.options.token_url.clone(), self.stopped) {
                    self.refreshing_early = true;
                    self.act(Action::FetchToken {
                        url,
                        credentials: self.options.credentials(),
                        generation: self.generation,
                    });
                }
            }
        }
    }

    fn act(&mut self, action: Action) {
        self.actions.push(action);
    }

    fn set_timer(&mut self, timer: Timer, ms: u64) {
        self.armed[timer.slot()] = true;
        self.act(Action::SetTimer(timer, ms));
    }

    fn clear_timer(&mut self, timer: Timer) {
        if std::mem::take(&mut self.armed[timer.slot()]) {
            self.act(Action::ClearTimer(timer));
        }
    }

    fn notify(&mut self, notice: Notice) {
        self.act(Action::Notify(notice));
    }

    /// How long the stream may be silent: the owner's `stall_timeout`, else two of the
    /// server's heartbeat intervals and a margin, else 65 s until the server said.
    pub(super) fn stall_window(&self) -> u64 {
        self.options.stall_timeout.unwrap_or_else(|| {
            self.heartbeat_ms.map_or(DEFAULT_STALL_MS, |hb| {
                hb.saturating_mul(2).saturating_add(STALL_MARGIN_MS)
            })
        })
    }

    fn may_share(&self) -> bool {
        self.options.share_across_tabs && self.tabs_supported
    }

    /// Starts holding or sharing the stream: asks the server who this tab is (`HEAD`) and
    /// joins the election of that identity's tabs, or opens alone.
    fn begin(&mut self) {
        self.generation += 1;
        self.stopped = false;
        self.attempts = 0;
        self.refreshes = 0;
        self.identity_switches = 0;
        // A token fetched for an earlier user must never open this one's stream.
        self.token = self.options.token.clone();
        if !self.may_share() {
            self.open_alone();
            return;
        }
        self.role = Role::Follower;
        self.view.is_leader = false;
        self.view.ready_state = ConnectionReadyState::Connecting;
        let url = self.session_probe_url();
        self.act(Action::ProbeSession {
            url,
            credentials: self.options.credentials(),
            purpose: ProbeFor::Joining,
            generation: self.generation,
        });
    }

    fn probed_for_joining(&mut self, outcome: SessionProbe) {
        match outcome {
            SessionProbe::Accepted(Some(tag)) => self.join(tag),
            // Nobody to share with yet: open alone; the stream's `ready` names the
            // identity, and the tab joins its tabs then.
            _ => self.open_alone(),
        }
    }

    /// Joins the election of the tabs of identity `tag`: follows their leader (resuming
    /// from where it stands if this tab ever leads), or leads when the lock comes.
    fn join(&mut self, tag: String) {
        self.act(Action::JoinTabs {
            tag: tag.clone(),
            generation: self.generation,
        });
        self.election = Some(tag.clone());
        self.view.identity_tag = Some(tag);
        self.role = Role::Follower;
        self.view.is_leader = false;
        self.view.ready_state = ConnectionReadyState::Connecting;
        // Should this tab lead before the leader told it where the stream stands, it
        // resumes from when it joined.
        if self.started_at.is_none() {
            self.started_at = Some(self.now);
        }
    }

    /// Holds a stream of its own, shared with no other tab.
    fn open_alone(&mut self) {
        self.role = Role::Alone;
        self.view.is_leader = true;
        if !self.stopped {
            self.open();
        }
    }

    /// This tab's stream is for identity `tag` (its `ready` said so), not the one of the
    /// tabs it shares with, or it shares with none yet: leave them, before relaying
    /// anything, for the tabs of `tag`, resuming from the last id. A session that changed
    /// under a leader (another user signed in in this browser) thus never reaches the
    /// first user's tabs.
    fn switch_identity(&mut self, tag: Option<String>) {
        self.identity_switches += 1;
        self.generation += 1;
        self.unconfirmed.clear();
        self.opened = false;
        self.close_stream();
        if self.election.take().is_some() {
            self.act(Action::LeaveTabs);
        }
        if self.identity_switches > MAX_IDENTITY_SWITCHES {
            self.act(Action::Warn(
                "sse-notify: the identity tag keeps changing (do all instances share SSE_JWT_SECRET?); this tab stops sharing its stream".into(),
            ));
        }
        match tag.filter(|_| self.identity_switches <= MAX_IDENTITY_SWITCHES) {
            Some(tag) => self.join(tag),
            None => self.open_alone(),
        }
    }

    /// The lock came: this tab holds the stream now, resuming from the last id any tab
    /// saw (a leader that crashed hands the lock on just as one that closed).
    fn became_leader(&mut self, generation: u64) {
        if generation != self.generation || self.role != Role::Follower {
            return;
        }
        self.role = Role::Leader;
        self.view.is_leader = true;
        if !self.stopped {
            self.open();
        }
    }

    /// What another tab said.
    fn heard(&mut self, message: TabMessage) {
        match (self.role, message) {
            (Role::Follower, TabMessage::Event(msg)) => self.deliver(msg),
            (Role::Follower, TabMessage::Position { id }) => {
                self.last_id = Some(id.clone());
                self.view.last_event_id = Some(id);
            }
            (
                Role::Follower,
                TabMessage::State {
                    state,
                    error,
                    transport,
                },
            ) => {
                self.view.ready_state = ConnectionReadyState::parse(&state);
                self.view.transport = Transport::parse(&transport).unwrap_or_default();
                self.view.error = error.and_then(|(code, detail)| UseSseError::from_code(&code, &detail));
            }
            (Role::Leader, TabMessage::Hello) => {
                self.publish_state();
                self.publish_position();
            }
            (Role::Leader, TabMessage::Revive) => self.revive(),
            _ => {}
        }
    }

    /// Tells the other tabs where the shared stream is.
    fn publish_state(&mut self) {
        if self.role == Role::Leader && self.election.is_some() {
            let message = TabMessage::State {
                state: self.view.ready_state.as_str().to_string(),
                error: self
                    .view
                    .error
                    .as_ref()
                    .map(|e| (e.code().to_string(), e.detail())),
                transport: self.transport.as_str().to_string(),
            };
            self.act(Action::PostToTabs(message));
        }
    }

    /// Tells the other tabs where the shared stream stands, once its `ready` confirmed it
    /// is theirs.
    fn publish_position(&mut self) {
        if let (Role::Leader, Some(_), true, Some(id)) =
            (self.role, &self.election, self.ready, &self.last_id)
        {
            let message = TabMessage::Position { id: id.clone() };
            self.act(Action::PostToTabs(message));
        }
    }

    /// Shows `state` (and `error`, when given) and tells the other tabs.
    fn set_state(&mut self, state: ConnectionReadyState, error: Option<Option<UseSseError>>) {
        self.view.ready_state = state;
        if let Some(error) = error {
            self.view.error = error;
        }
        self.publish_state();
    }

    /// Closes the stream and its timers, without touching the view.
    fn close_stream(&mut self) {
        if self.stream.take().is_some() {
            self.act(Action::CloseStream);
        }
        for timer in [
            Timer::Stall,
            Timer::Reconnect,
            Timer::Buffering,
            Timer::TokenRefresh,
        ] {
            self.clear_timer(timer);
        }
    }

    /// `close()`: this tab stops; a tab that shares the stream hands it on.
    fn close(&mut self) {
        self.stopped = true;
        self.generation += 1;
        let was_open = std::mem::take(&mut self.opened);
        self.close_stream();
        self.clear_timer(Timer::SseRetry);
        self.close_probe();
        self.set_state(ConnectionReadyState::Closed, None);
        if self.election.take().is_some() {
            self.act(Action::LeaveTabs);
        }
        self.role = Role::Alone;
        if was_open {
            self.notify(Notice::Close);
        }
    }

    /// `open()`: starts again after a close, a give-up, a replacement or an ended session.
    fn revive(&mut self) {
        self.stopped = false;
        self.attempts = 0;
        self.refreshes = 0;
        match self.role {
            Role::Follower => {
                if self.election.is_some() {
                    self.act(Action::PostToTabs(TabMessage::Revive));
                }
            }
            Role::Leader => self.open(),
            Role::Alone if self.election.is_some() || !self.options.share_across_tabs => self.open(),
            Role::Alone => self.begin(),
        }
    }

    /// Opens the stream over the current transport, resuming after the last id. With a
    /// `token_url` and no token yet, the first token is fetched from there.
    fn open(&mut self) {
        if let (None, Some(url), true) = (&self.token, &self.options.token_url, self.options.token_first) {
            let url = url.clone();
            self.set_state(ConnectionReadyState::Connecting, None);
            // One fetch at a time: it opens the stream when it returns.
            if self.fetching_token != Some(self.generation) {
                self.fetching_token = Some(self.generation);
                self.act(Action::FetchToken {
                    url,
                    credentials: self.options.credentials(),
                    generation: self.generation,
                });
            }
            return;
        }
        self.transport = match self.options.transport {
            TransportMode::Sse => Transport::Sse,
            TransportMode::WebSocket => Transport::WebSocket,
            TransportMode::Auto => self.transport,
        };
        self.view.transport = self.transport;
        self.close_stream();
        self.opened = false;
        self.ready = false;
        self.unconfirmed.clear();
        let url = self.next_stream_url(self.transport);
        match self.transport {
            Transport::Sse => self.act(Action::OpenSse {
                url,
                credentials: self.options.credentials(),
            }),
            Transport::WebSocket => {
                self.socket_last_id = self.last_id.clone();
                self.act(Action::OpenWebSocket { url });
            }
        }
        self.stream = Some(self.transport);
        self.set_state(ConnectionReadyState::Connecting, None);
        self.arm_stall_timer();
    }

    /// The URL of the next stream over `transport`. The first stream without an id starts
    /// now; a later one still without an id resumes from when the first was asked for.
    fn next_stream_url(&mut self, transport: Transport) -> String {
        let resume_ago_ms = match (&self.last_id, self.started_at) {
            (Some(_), _) => None,
            (None, Some(started)) => Some((self.now - started).max(0.0) as u64 + RESUME_MARGIN_MS),
            (None, None) => {
                self.started_at = Some(self.now);
                None
            }
        };
        let params = StreamParams {
            last_event_id: self.last_id.as_deref(),
            resume_ago_ms,
            token: self.token.as_deref(),
            fallback: self.fallback.filter(|_| transport == Transport::WebSocket),
            probe: false,
        };
        match transport {
            Transport::Sse => self.options.stream_url(&params),
            Transport::WebSocket => self.options.websocket_url(&self.origin, &params),
        }
    }

    /// The URL a `HEAD` probe of this tab's session goes to.
    fn session_probe_url(&self) -> String {
        self.options.stream_url(&StreamParams {
            token: self.token.as_deref(),
            ..Default::default()
        })
    }

    fn opened(&mut self) {
        self.attempts = 0;
        self.refreshes = 0;
        self.opened = true;
        self.set_state(ConnectionReadyState::Open, Some(None));
        if self.transport == Transport::Sse {
            // The `ready` event must follow at once; if it does not, something holds the
            // stream back.
            self.set_timer(Timer::Buffering, self.options.buffering_timeout);
        }
        self.arm_stall_timer();
        self.notify(Notice::Open);
    }

    /// The SSE response opened but nothing came through: report it, and with `Auto` go
    /// on over WebSocket (the server counts why), trying SSE again later.
    fn buffered(&mut self) {
        if self.ready || self.transport != Transport::Sse {
            return;
        }
        let err = UseSseError::Buffered(self.options.buffering_timeout);
        self.set_state(self.view.ready_state, Some(Some(err.clone())));
        self.notify(Notice::Error(err));
        if self.options.transport == TransportMode::Auto {
            self.fall_back_to_websocket("buffered");
        }
    }

    fn fall_back_to_websocket(&mut self, why: &'static str) {
        self.transport = Transport::WebSocket;
        self.fallback = Some(why);
        self.sse_failures = 0;
        self.schedule_sse_retry();
        self.open();
    }

    /// On WebSocket for a while: see whether SSE gets through now, with a probe
    /// (`probe=1`: the `ready` event alone, no second stream) while the WebSocket goes
    /// on. If `ready` comes within `buffering_timeout`, move back to SSE (resuming by last
    /// id); if not, try again after `sse_retry_interval`.
    fn retry_sse(&mut self) {
        if self.transport != Transport::WebSocket
            || self.options.transport != TransportMode::Auto
            || self.stopped
        {
            return;
        }
        self.close_probe();
        let url = self.options.stream_url(&StreamParams {
            token: self.token.as_deref(),
            probe: true,
            ..Default::default()
        });
        self.act(Action::OpenProbe {
            url,
            credentials: self.options.credentials(),
        });
        self.probing = true;
        self.set_timer(Timer::Probe, self.options.buffering_timeout);
    }

    fn schedule_sse_retry(&mut self) {
        self.set_timer(Timer::SseRetry, self.options.sse_retry_interval);
    }

    fn close_probe(&mut self) {
        if std::mem::take(&mut self.probing) {
            self.act(Action::CloseProbe);
        }
        self.clear_timer(Timer::Probe);
    }

    /// A WebSocket message: its frames, read as `EventSource` would.
    fn socket_text(&mut self, text: &str) {
        let listened = self.options.listened_names();
        for frame in parse_frames(text) {
            if let Some(id) = frame.id {
                self.socket_last_id = Some(id);
            }
            let Some(data) = frame.data else { continue };
            let event = frame.event.unwrap_or_else(|| "message".into());
            // As `EventSource`: only the names listened for are heard.
            if !listened.contains(&event) {
                continue;
            }
            let id = self.socket_last_id.clone().unwrap_or_default();
            self.received(SseMessage {
                id,
                event,
                data,
                replayed: false,
            });
        }
    }

    /// A message from this tab's own stream (either transport).
    fn received(&mut self, mut msg: SseMessage) {
        self.arm_stall_timer();
        // The prelude holds what was missed; `ready` ends it.
        msg.replayed = !self.ready;
        match msg.event.as_str() {
            names::READY => return self.ready_received(msg),
            names::HEARTBEAT => {
                // The stream opens with an id-only frame (where it starts); heartbeats
                // repeat that id. Adopt it so a tab that drops before its first event still
                // resumes from there.
                if self.last_id.is_none() && !msg.id.is_empty() {
                    self.last_id = Some(msg.id.clone());
                    self.view.last_event_id = Some(msg.id);
                }
                return;
            }
            names::CONNECTION_REPLACED => return self.stop_with(UseSseError::Replaced),
            names::SESSION_ENDED => {
                // Logged out: stay closed. Expired: a fresh token may carry on.
                let expired = !msg.data.contains(r#""reason":"disconnected""#);
                return self.session_refused(expired);
            }
            _ => {}
        }
        if self.role == Role::Leader && msg.event != names::RESYNC {
            if !self.ready {
                self.unconfirmed.push(msg.clone());
            } else if self.election.is_some() {
                self.act(Action::PostToTabs(TabMessage::Event(msg.clone())));
            }
        }
        self.deliver(msg);
    }

    /// The stream flows (nothing in between holds it back), starts after its id, says how
    /// often heartbeats come, and is for the identity its tag names. A leader whose tabs
    /// share that identity relays what came before it and where the stream stands; one
    /// whose tabs do not, or a tab alone that could share, moves to the tabs of that
    /// identity.
    fn ready_received(&mut self, msg: SseMessage) {
        let ready = serde_json::from_str::<api::Ready>(&msg.data).ok();
        if let Some(hb) = ready.as_ref().map(|r| r.heartbeat_ms).filter(|&hb| hb > 0) {
            self.heartbeat_ms = Some(hb);
            self.arm_stall_timer();
        }
        if let Some(ready) = &ready {
            self.schedule_token_refresh(ready.timestamp);
        }
        let tag = ready.map(|ready| ready.tag).filter(|tag| !tag.is_empty());
        self.ready = true;
        self.sse_failures = 0;
        self.clear_timer(Timer::Buffering);
        if self.last_id.is_none() && !msg.id.is_empty() {
            self.last_id = Some(msg.id.clone());
            self.view.last_event_id = Some(msg.id);
        }
        if tag.is_some() {
            self.view.identity_tag = tag.clone();
        }
        let may_share = self.may_share() && self.identity_switches < MAX_IDENTITY_SWITCHES;
        let switch = match self.role {
            Role::Leader => self.election != tag,
            Role::Alone => self.election.is_none() && may_share && tag.is_some(),
            Role::Follower => false,
        };
        if switch {
            return self.switch_identity(tag);
        }
        if self.role == Role::Leader {
            // Confirmed: only changes in a row count towards giving up on sharing.
            self.identity_switches = 0;
            if self.election.is_some() {
                for msg in std::mem::take(&mut self.unconfirmed) {
                    self.act(Action::PostToTabs(TabMessage::Event(msg)));
                }
            }
        }
        self.unconfirmed.clear();
        // The other tabs hear only events: without this, a tab that takes over before the
        // first event opens "now" and misses what was published during the hand-over.
        self.publish_position();
    }

    /// An event for this tab (from its own stream, or relayed): drop a duplicate, update
    /// the view, deliver it.
    fn deliver(&mut self, msg: SseMessage) {
        // Every payload event has an id; control events (`resync`) come without one, and
        // EventSource repeats the last id on them: only payload events' ids count.
        if !msg.id.is_empty() && msg.event != names::RESYNC {
            if self.seen.contains(&msg.id) {
                return;
            }
            if self.seen.len() >= SEEN_IDS {
                self.seen.pop_front();
            }
            self.seen.push_back(msg.id.clone());
            self.last_id = Some(msg.id.clone());
            self.view.last_event_id = Some(msg.id.clone());
        }
        if msg.event == names::RESYNC {
            let err = UseSseError::Resync(msg.data.clone());
            self.set_state(self.view.ready_state, Some(Some(err.clone())));
            self.notify(Notice::Error(err));
        }
        self.act(Action::Deliver(msg));
    }

    /// Stops (no reconnect by itself) with `err`, keeping the lead of a shared stream, so
    /// no other tab of this browser opens one that would fight the reason it stopped.
    fn stop_with(&mut self, err: UseSseError) {
        self.stopped = true;
        self.close_with_error(err);
    }

    /// Closes the current stream, if any, shows `err` and tells the owner. Returns whether
    /// the stream had opened.
    fn close_with_error(&mut self, err: UseSseError) -> bool {
        let was_open = std::mem::take(&mut self.opened);
        self.close_stream();
        self.set_state(ConnectionReadyState::Closed, Some(Some(err.clone())));
        self.notify(Notice::Error(err));
        if was_open {
            self.notify(Notice::Close);
        }
        was_open
    }

    /// The server refused the session or ended it. With `token_url` (and `refresh`),
    /// fetch a fresh token and open again; otherwise stop with `Unauthorized`.
    fn session_refused(&mut self, refresh: bool) {
        self.stop_with(UseSseError::Unauthorized);
        if let Some(url) = self.options.token_url.clone() {
            if refresh && self.refreshes < MAX_TOKEN_REFRESHES {
                self.refreshes += 1;
                self.act(Action::FetchToken {
                    url,
                    credentials: self.options.credentials(),
                    generation: self.generation,
                });
            }
        }
    }

    /// A token came (or did not) from `token_url`: open with it, unless the hook was
    /// restarted meanwhile. Refused: stop with `Unauthorized`. Any other failure: retry
    /// with the reconnect backoff (a first token), or stay stopped (a fresh one, after the
    /// session ended).
    fn token_fetched(&mut self, generation: u64, outcome: Fetched) {
        if self.fetching_token == Some(generation) {
            self.fetching_token = None;
        }
        if generation != self.generation {
            return;
        }
        if std::mem::take(&mut self.refreshing_early) && !matches!(outcome, Fetched::Token(_)) {
            // The stream still flows on the old token; if the server ends it at expiry,
            // the session-ended path fetches again.
            let url = self.options.token_url.clone().unwrap_or_default();
            return self.act(Action::Warn(format!(
                "sse-notify: no fresh token from {url} before expiry"
            )));
        }
        match outcome {
            Fetched::Token(token) => {
                self.token = Some(token);
                self.stopped = false;
                self.open();
            }
            Fetched::Refused if !self.stopped => self.stop_with(UseSseError::Unauthorized),
            Fetched::Failed if !self.stopped => {
                self.close_with_error(UseSseError::Connection);
                self.schedule_reconnect();
            }
            Fetched::Refused | Fetched::Failed => {
                let url = self.options.token_url.clone().unwrap_or_default();
                self.act(Action::Warn(format!("sse-notify: no fresh token from {url}")));
            }
        }
    }

    /// With `token_url`, and a token that says when it expires (a JWT's `exp`): fetch a
    /// fresh one ahead of that, measured on the server's clock (`now_ms`, from `ready`).
    fn schedule_token_refresh(&mut self, now_ms: u64) {
        if self.options.token_url.is_none() {
            return;
        }
        let Some(expires_at_ms) = self
            .token
            .as_deref()
            .and_then(token_expiry)
            .map(|s| s.saturating_mul(1_000))
        else {
            return;
        };
        let life = expires_at_ms.saturating_sub(now_ms);
        let ahead = TOKEN_REFRESH_AHEAD_MS.min(life / 5);
        self.set_timer(Timer::TokenRefresh, life - ahead);
    }

    fn fail(&mut self, err: UseSseError) {
        let was_open = self.close_with_error(err.clone());
        if was_open || err != UseSseError::Connection {
            return self.schedule_reconnect();
        }
        // A stream that never opened may have been refused: find out why before retrying.
        let url = self.session_probe_url();
        self.act(Action::ProbeSession {
            url,
            credentials: self.options.credentials(),
            purpose: ProbeFor::Failure,
            generation: self.generation,
        });
    }

    fn probed_after_failure(&mut self, outcome: SessionProbe) {
        if outcome == SessionProbe::Refused {
            return self.session_refused(true);
        }
        // The server answers, yet SSE does not open: after a few tries, WebSocket. (No
        // answer at all, or a session that cannot be checked now, says nothing about SSE.)
        let answered = matches!(outcome, SessionProbe::Accepted(_));
        if answered && self.transport == Transport::Sse && self.options.transport == TransportMode::Auto {
            self.sse_failures += 1;
            if self.sse_failures >= SSE_FAILURES_BEFORE_FALLBACK {
                return self.fall_back_to_websocket("failed");
            }
        }
        self.schedule_reconnect();
    }

    fn schedule_reconnect(&mut self) {
        if self.stopped || !self.options.auto_reconnect {
            return;
        }
        if self
            .options
            .max_reconnect_attempts
            .is_some_and(|max| self.attempts >= max)
        {
            let err = UseSseError::GaveUp(self.attempts);
            self.stopped = true;
            self.set_state(ConnectionReadyState::Closed, Some(Some(err.clone())));
            self.notify(Notice::Error(err));
            return;
        }
        let jitter = (self.random)();
        let delay = backoff_delay(
            self.options.reconnect_interval,
            MAX_RECONNECT_DELAY_MS,
            self.attempts,
            jitter,
        );
        self.attempts += 1;
        self.set_state(ConnectionReadyState::Connecting, None);
        self.set_timer(Timer::Reconnect, delay);
    }

    fn arm_stall_timer(&mut self) {
        self.set_timer(Timer::Stall, self.stall_window());
    }
}

/// The `exp` claim (seconds since the epoch) of a JWT, read without checking it: only to
/// know when to fetch the next one. `None` for any other kind of token.
fn token_expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    #[derive(Deserialize)]
    struct Expiry {
        exp: u64,
    }
    let json = base64url_decode(payload)?;
    serde_json::from_slice::<Expiry>(&json)
        .ok()
        .map(|claims| claims.exp)
}

/// Decodes unpadded base64url (RFC 4648 section 5), as JWTs use it.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut bits, mut held) = (0u32, 0u32);
    for byte in text.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(value);
        held += 6;
        if held >= 8 {
            held -= 8;
            out.push((bits >> held) as u8);
            bits &= (1 << held) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
