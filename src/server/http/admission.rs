//! Stream admission, shared by both transports (`/api/sse` and `/api/ws`): the origin
//! rule, the query (`events=`, the resume point), the session and the connection rates,
//! checked in that order before any stream opens.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use axum::{
    extract::{ConnectInfo, Query},
    http::{request::Parts, HeaderMap, Method, StatusCode},
};
use serde::Deserialize;

use super::{origin, ApiError};
use crate::{
    events::validate_event_name,
    server::{
        auth::{AuthError, Identity},
        clock,
        core::service::{OpenError, Resume, SseService, MAX_RESUME_AGO},
        event::Cursor,
        metrics as m,
    },
};

/// Most distinct names one `events=` filter may list.
pub const MAX_FILTER_NAMES: usize = 32;

/// Query parameters of `GET /api/sse`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamQuery {
    /// Comma-separated event names; only these are sent (heartbeats always are).
    pub events: Option<String>,
    /// Resume after this id, for clients that cannot set the `Last-Event-ID` header.
    #[serde(rename = "lastEventId")]
    pub last_event_id: Option<String>,
    /// No id yet: start this many ms back (at most 60 000), for a client whose earlier
    /// stream opened but whose events may not have reached it (see [`Resume::Ago`]).
    #[serde(rename = "resumeAgoMs")]
    pub resume_ago_ms: Option<String>,
    /// A session token, for clients that can send neither cookie nor header (read by the
    /// default [`Auth`](crate::server::auth::Auth)).
    pub token: Option<String>,
    /// `probe=1`: no stream, only its `ready` event, held open for [`PROBE_HOLD`](super::stream::PROBE_HOLD) and then
    /// ended. A client on WebSocket opens one now and then to see whether SSE gets through
    /// again, without a second stream.
    pub probe: Option<String>,
    /// Why a client came over another transport: `buffered` when it found the stream held
    /// back by something in between (counted in `sse_buffered_clients_total`).
    pub fallback: Option<String>,
}

/// A stream request that may open: who it is for, where it resumes, what it wants.
pub(crate) struct Admitted {
    pub(crate) identity: Identity,
    pub(crate) resume: Resume,
    pub(crate) filter: Option<Arc<[String]>>,
    /// Only a transport probe (`probe=1`).
    pub(crate) probe: bool,
}

/// Which transport a stream request came for: the origin rule differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// `GET /api/sse`: a foreign page is refused when the session comes from a cookie.
    Sse,
    /// `GET /api/ws`: browsers apply no CORS to the handshake, so a foreign page is
    /// always refused.
    WebSocket,
}

/// What every stream transport checks first: the page it came from (see
/// [`origin`](super::origin)), the query (`events=`, `lastEventId=`), the session (the
/// service's `Authenticate` hook), and the connection rates. Counters move only for
/// requests that got past the session check.
pub(crate) async fn admit(
    service: &SseService,
    parts: Parts,
    transport: Transport,
) -> Result<Admitted, ApiError> {
    if service.is_shutting_down() {
        return Err(OpenError::ShuttingDown.into());
    }
    match transport {
        Transport::WebSocket => origin::check(&parts, &service.config().allowed_origins)?,
        Transport::Sse => check_cookie_origin(service, &parts)?,
    }
    let Query(query) = Query::<StreamQuery>::try_from_uri(&parts.uri)
        .map_err(|e| ApiError::bad_request(e.body_text()).field("query"))?;
    let filter = parse_filter(query.events.as_deref())?;
    let resume = match parse_last_event_id(&parts.headers, query.last_event_id.as_deref())? {
        Some(after) => Resume::After(after),
        None => parse_resume_ago(query.resume_ago_ms.as_deref())?.map_or(Resume::Now, Resume::Ago),
    };
    // Behind a trusted proxy, the client it forwards for.
    let ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| {
            service
                .config()
                .trusted_proxies
                .client_ip(addr.ip(), &parts.headers)
        });
    let probe = parts.method == Method::HEAD;
    let identity = identify(service, parts).await?;
    if !probe {
        if query.fallback.as_deref() == Some("buffered") {
            m::buffered_client();
        }
        let user: Arc<str> = identity.user_id.as_str().into();
        service.admit(ip, &user).map_err(|limited| {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, limited.to_string())
                .retry_after(limited.retry_after.as_secs())
        })?;
    }
    Ok(Admitted {
        identity,
        resume,
        filter,
        probe: query.probe.as_deref() == Some("1"),
    })
}

/// The origin rule of a request that rides the user's session: with a cookie session, a
/// page on another site is refused (see [`origin`](super::origin)).
pub(super) fn check_cookie_origin(service: &SseService, parts: &Parts) -> Result<(), ApiError> {
    if origin::cookie_session(parts, service.uses_default_auth()) {
        origin::check(parts, &service.config().allowed_origins)?;
    }
    Ok(())
}

/// Who the request is from, by the service's `Authenticate` hook: 401 naming `token`, or
/// 503 when the hook cannot tell now (the client retries, it is not signed out).
pub(super) async fn identify(service: &SseService, parts: Parts) -> Result<Identity, ApiError> {
    service.authenticate(parts).await.map_err(|e| match e {
        AuthError::Unavailable(_) => {
            m::connection_refused("auth_unavailable");
            warn_auth_unavailable(&e);
            ApiError::unavailable(e.to_string())
        }
        _ => {
            m::connection_refused("unauthorized");
            ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()).field("token")
        }
    })
}

/// Logs that the `Authenticate` hook cannot tell who requests are from, at most once a
/// second: during a session-store outage every client's retry would log it.
fn warn_auth_unavailable(e: &AuthError) {
    static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
    let second = clock::now_ms() / 1000;
    if LAST_SECOND.swap(second, Ordering::Relaxed) != second {
        tracing::warn!(error = %e, "streams refused with 503: the identity cannot be checked");
    }
}

impl From<OpenError> for ApiError {
    fn from(e: OpenError) -> Self {
        if let OpenError::Broker(cause) = &e {
            tracing::warn!(error = %cause, "broker unavailable for a new stream");
        }
        // Nothing is lost: the client retries later with the same id.
        ApiError::unavailable(e.to_string())
    }
}

/// Parses `events=a,b`: each name checked, duplicates dropped, at most
/// [`MAX_FILTER_NAMES`] of them.
pub(crate) fn parse_filter(events: Option<&str>) -> Result<Option<Arc<[String]>>, ApiError> {
    let Some(events) = events.filter(|e| !e.trim().is_empty()) else {
        return Ok(None);
    };
    let mut names: Vec<String> = Vec::new();
    for name in events.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        validate_event_name(name).map_err(|e| ApiError::bad_request(e.message).field("events"))?;
        if names.iter().any(|n| n == name) {
            continue;
        }
        if names.len() == MAX_FILTER_NAMES {
            return Err(ApiError::bad_request(format!(
                "lists more than {MAX_FILTER_NAMES} different event names"
            ))
            .field("events"));
        }
        names.push(name.to_string());
    }
    // The inbox's changes reach every stream of the user, whatever it filters.
    let inbox = crate::events::names::INBOX;
    if !names.iter().any(|n| n == inbox) {
        names.push(inbox.to_string());
    }
    Ok(Some(names.into()))
}

/// The resume point: the `Last-Event-ID` header, else the `lastEventId` query parameter.
pub(crate) fn parse_last_event_id(
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Option<Cursor>, ApiError> {
    let (field, raw) = match headers.get("last-event-id") {
        Some(v) => ("Last-Event-ID", v.to_str().unwrap_or("\u{fffd}")),
        None => ("lastEventId", query.unwrap_or_default()),
    };
    if raw.trim().is_empty() {
        return Ok(None);
    }
    raw.parse::<Cursor>().map(Some).map_err(|_| {
        ApiError::bad_request(format!("{raw:?} is not an event id this server issued")).field(field)
    })
}

/// Parses `resumeAgoMs=`: milliseconds, at most [`MAX_RESUME_AGO`].
pub(crate) fn parse_resume_ago(raw: Option<&str>) -> Result<Option<std::time::Duration>, ApiError> {
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        return Ok(None);
    };
    let max = MAX_RESUME_AGO.as_millis() as u64;
    match raw.trim().parse::<u64>() {
        Ok(ms) if ms <= max => Ok(Some(std::time::Duration::from_millis(ms))),
        _ => Err(
            ApiError::bad_request(format!("must be a number of milliseconds from 0 to {max}"))
                .field("resumeAgoMs"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::event::EventId;
    use axum::http::HeaderValue;

    #[test]
    fn filter_names_are_validated_deduplicated_and_capped() {
        assert!(parse_filter(None).unwrap().is_none());
        assert_eq!(
            &*parse_filter(Some("a, b,a")).unwrap().unwrap(),
            ["a", "b", "inbox"]
        );
        assert_eq!(
            parse_filter(Some("ok,Bad Name")).unwrap_err().field.as_deref(),
            Some("events")
        );
        let names = |n: usize| (0..n).map(|i| format!("e{i}")).collect::<Vec<_>>().join(",");
        assert_eq!(
            parse_filter(Some(&names(32))).unwrap().unwrap().len(),
            33,
            "and `inbox`"
        );
        let many = format!("{},{}", names(32), names(32));
        assert_eq!(
            parse_filter(Some(&many)).unwrap().unwrap().len(),
            33,
            "duplicates do not count"
        );
        assert_eq!(
            parse_filter(Some(&names(33))).unwrap_err().field.as_deref(),
            Some("events")
        );
        assert!(parse_filter(Some(&names(10_000))).is_err());
    }

    proptest::proptest! {
        /// Any `events=`: no panic; what is accepted is at most 32 distinct valid names (and `inbox`).
        #[test]
        fn any_filter_is_parsed_safely(events in ".{0,400}") {
            if let Ok(Some(names)) = parse_filter(Some(&events)) {
                proptest::prop_assert!(names.len() <= MAX_FILTER_NAMES + 1, "the names and `inbox`");
                for (i, name) in names.iter().enumerate() {
                    proptest::prop_assert!(validate_event_name(name).is_ok());
                    proptest::prop_assert!(!names[..i].contains(name));
                }
            }
        }

        /// Any `Last-Event-ID` (header or query): no panic, and an accepted id is a number,
        /// or two (a cursor in two lanes).
        #[test]
        fn any_last_event_id_is_parsed_safely(raw in ".{0,40}") {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&raw) {
                headers.insert("last-event-id", value);
            }
            for parsed in [parse_last_event_id(&headers, None), parse_last_event_id(&HeaderMap::new(), Some(&raw))] {
                if let Ok(Some(cursor)) = parsed {
                    let numbers: Option<Vec<u64>> = raw.trim().split('.').map(|n| n.parse().ok()).collect();
                    let expected = match numbers.as_deref() {
                        Some(&[id]) => Some(Cursor::One(EventId(id))),
                        Some(&[user, broadcast]) => Some(Cursor::Lanes { user: EventId(user), broadcast: EventId(broadcast) }),
                        _ => None,
                    };
                    proptest::prop_assert_eq!(expected, Some(cursor));
                }
            }
        }
    }

    #[test]
    fn a_cursor_in_two_lanes_reads_and_writes_as_two_ids() {
        let cursor = parse_last_event_id(&HeaderMap::new(), Some("17.9"))
            .unwrap()
            .unwrap();
        assert_eq!(
            cursor,
            Cursor::Lanes {
                user: EventId(17),
                broadcast: EventId(9)
            }
        );
        assert_eq!(cursor.to_string(), "17.9");
        for bad in ["1.2.3", "1.", ".1", "1.x"] {
            assert!(
                parse_last_event_id(&HeaderMap::new(), Some(bad)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn resume_ago_is_bounded_milliseconds() {
        assert_eq!(parse_resume_ago(None).unwrap(), None);
        assert_eq!(
            parse_resume_ago(Some("5200")).unwrap(),
            Some(std::time::Duration::from_millis(5200))
        );
        for bad in ["60001", "-1", "5s", "1e3"] {
            assert_eq!(
                parse_resume_ago(Some(bad)).unwrap_err().field.as_deref(),
                Some("resumeAgoMs"),
                "{bad}"
            );
        }
    }

    #[test]
    fn header_wins_over_query_and_junk_is_refused() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            parse_last_event_id(&headers, Some("7")).unwrap(),
            Some(Cursor::One(EventId(7)))
        );
        headers.insert("last-event-id", HeaderValue::from_static("9"));
        assert_eq!(
            parse_last_event_id(&headers, Some("7")).unwrap(),
            Some(Cursor::One(EventId(9)))
        );
        assert!(parse_last_event_id(&HeaderMap::new(), Some("abc")).is_err());
        assert_eq!(parse_last_event_id(&HeaderMap::new(), Some("")).unwrap(), None);
    }
}
