//! Which pages may open a stream with the browser's ambient credentials.
//!
//! Browsers apply no CORS to a WebSocket handshake, and a credentialed `EventSource` from
//! another site, though it cannot read, still counts against the user's connection limit
//! and pushes out their real tabs. So a stream request that a browser sent from a page
//! (it has an `Origin`) is refused unless that page is the server's own origin or one of
//! `SSE_ALLOWED_ORIGINS`: always on `/api/ws`, and on `/api/sse` when the session comes
//! from a cookie. A request without `Origin` is not from a page (curl, a backend, an
//! `EventSource` polyfill on the same origin) and is judged by its credentials alone.

use axum::http::{header, request::Parts, StatusCode};

use super::ApiError;

/// Whether `parts` may go on: its `Origin` is absent, the server's own (the `Host` the
/// request was sent to, or its HTTP/2 authority), or in `allowed`.
pub(crate) fn check(parts: &Parts, allowed: &[String]) -> Result<(), ApiError> {
    let Some(origin) = parts.headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("null").trim();
    if allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(origin.trim_end_matches('/')))
    {
        return Ok(());
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()));
    if host.is_some_and(|host| same_authority(origin, host)) {
        return Ok(());
    }
    crate::server::metrics::connection_refused("origin");
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!("a page on {origin} may not use this route with the user's session: not this server's origin nor in SSE_ALLOWED_ORIGINS"),
    )
    .field("origin"))
}

/// Whether the origin `scheme://host[:port]` names `host[:port]` (the `Host` header), with
/// the scheme's default port implied on either side.
fn same_authority(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // "null" (sandboxed frames, file:) or junk
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let strip = |a: &str| {
        let a = a.trim().trim_end_matches('/').to_ascii_lowercase();
        match a.strip_suffix(default_port) {
            Some(bare) => bare.to_string(),
            None => a,
        }
    };
    !authority.is_empty() && strip(authority) == strip(host)
}

/// Whether the session of `parts` would come from a cookie: it carries one, and (for the
/// default token [`Auth`](crate::server::auth::Auth), which prefers explicit tokens) no bearer header or
/// `?token=`. A host's own [`Authenticate`](crate::server::auth::Authenticate) hook may read any cookie,
/// so there any cookie counts.
pub(crate) fn cookie_session(parts: &Parts, default_auth: bool) -> bool {
    if !parts.headers.contains_key(header::COOKIE) {
        return false;
    }
    if !default_auth {
        return true;
    }
    let explicit_token = crate::server::auth::bearer_token(&parts.headers).is_some()
        || parts
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|pair| pair.starts_with("token=")));
    !explicit_token
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(origin: Option<&str>, host: &str) -> Parts {
        let mut request = Request::get("/api/ws").header(header::HOST, host);
        if let Some(origin) = origin {
            request = request.header(header::ORIGIN, origin);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn own_listed_and_absent_origins_pass_others_are_refused() {
        let allowed = vec!["https://app.example.com".to_string()];
        for (origin, host) in [
            (None, "notify.example.com"),
            (Some("http://127.0.0.1:3000"), "127.0.0.1:3000"),
            (Some("https://notify.example.com"), "notify.example.com"),
            (Some("https://notify.example.com"), "notify.example.com:443"),
            (Some("http://Notify.Example.com:80"), "notify.example.com"),
            (Some("https://app.example.com"), "notify.example.com"),
        ] {
            assert!(
                check(&parts(origin, host), &allowed).is_ok(),
                "{origin:?} on {host}"
            );
        }
        for (origin, host) in [
            ("https://evil.example.com", "notify.example.com"),
            ("http://127.0.0.1:3001", "127.0.0.1:3000"),
            ("http://notify.example.com.evil.com", "notify.example.com"),
            ("null", "notify.example.com"),
            ("https://notify.example.com:8443", "notify.example.com"),
            ("ftp://notify.example.com", "notify.example.com"),
        ] {
            let refused = check(&parts(Some(origin), host), &allowed).unwrap_err();
            assert_eq!(refused.status, StatusCode::FORBIDDEN, "{origin}");
            assert_eq!(refused.field.as_deref(), Some("origin"));
        }
    }

    #[test]
    fn a_session_comes_from_the_cookie_unless_a_token_is_explicit() {
        let with = |cookie: bool, uri: &str, bearer: bool| {
            let mut request = Request::get(uri);
            if cookie {
                request = request.header(header::COOKIE, "sse_session=x");
            }
            if bearer {
                request = request.header(header::AUTHORIZATION, "Bearer t");
            }
            request.body(()).unwrap().into_parts().0
        };
        assert!(cookie_session(&with(true, "/api/sse", false), true));
        assert!(!cookie_session(&with(false, "/api/sse", false), true));
        assert!(!cookie_session(&with(true, "/api/sse?token=t", false), true));
        assert!(!cookie_session(&with(true, "/api/sse", true), true));
        assert!(cookie_session(&with(true, "/api/sse?token=t", true), false));
    }
}
