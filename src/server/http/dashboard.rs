//! The operators' dashboard at `{prefix}/dashboard`: every live instance's connections,
//! throughput, broker health, slow-client cuts and refusals, live from
//! `/api/stats/stream`.
//!
//! It sits behind the publish key: the sign-in form takes the key once and sets
//! [`OPS_COOKIE`], an HMAC of its expiry keyed by the publish key itself (so changing the
//! key signs every operator out), `HttpOnly`, `SameSite=Strict`, scoped to the routes'
//! prefix. The cookie opens the dashboard and the two stats routes, nothing else: it never
//! publishes. Signing out clears it from the browser; a copy taken before stays valid
//! until its expiry or a change of the publish key (it is stateless, as the key is). The page is plain HTML with one small script under a nonce-only
//! Content-Security-Policy, so it needs no WASM bundle and works in the standalone server.

use std::time::Duration;

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{Html, IntoResponse, Response},
};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;

use super::{
    publish::{check_publish_key, read_body},
    routes::cookies_secure,
    ApiError,
};
use crate::server::{auth::bearer_token, clock::now_ms, core::service::SseService};

/// The cookie an operator's sign-in sets.
pub const OPS_COOKIE: &str = "sse_ops";
/// `{prefix}` + this: the dashboard page.
pub const DASHBOARD_PATH: &str = "/dashboard";
/// How long a sign-in lasts.
const OPS_SESSION: Duration = Duration::from_secs(12 * 3600);
/// The sign-in form's body is one field; anything longer is not a key.
const MAX_FORM_BYTES: usize = 1024;

/// `GET {prefix}/dashboard`: the dashboard for a signed-in operator, else the sign-in form.
pub async fn dashboard_page(State(service): State<SseService>, jar: CookieJar) -> Response {
    if service.config().publish_key.is_none() {
        return page(
            StatusCode::FORBIDDEN,
            "sse-notify",
            "<p>The dashboard is behind the publish key: set <code>SSE_PUBLISH_KEY</code> to use it.</p>",
            None,
        );
    }
    if !has_ops_cookie(&service, &jar) {
        return sign_in_page(&service, StatusCode::OK, None);
    }
    dashboard(&service)
}

/// `POST {prefix}/dashboard/sign-in` with `key=<SSE_PUBLISH_KEY>` (a form): sets the cookie
/// and goes back to the dashboard; a wrong key gets the form again, with a 403.
pub async fn sign_in(State(service): State<SseService>, request: Request) -> Result<Response, ApiError> {
    let Some(key) = service.config().publish_key.as_ref() else {
        return Ok(dashboard_page(State(service), CookieJar::new()).await);
    };
    let (parts, body) = request.into_parts();
    let body = read_body(body, MAX_FORM_BYTES).await?;
    #[derive(serde::Deserialize)]
    struct Form {
        #[serde(default)]
        key: String,
    }
    let given = serde_urlencoded::from_bytes::<Form>(&body)
        .map(|form| form.key)
        .unwrap_or_default();
    if !bool::from(given.trim().as_bytes().ct_eq(key.expose_secret().as_bytes())) {
        return Ok(sign_in_page(
            &service,
            StatusCode::FORBIDDEN,
            Some("That is not this server's publish key."),
        ));
    }
    let expires = now_ms() / 1000 + OPS_SESSION.as_secs();
    let cookie = ops_cookie(
        &service,
        &parts.headers,
        ops_token(key.expose_secret(), expires),
        OPS_SESSION,
    );
    Ok(back_to_dashboard(&service, cookie))
}

/// `POST {prefix}/dashboard/sign-out`: ends the operator's sign-in on this browser.
pub async fn sign_out(State(service): State<SseService>, headers: HeaderMap) -> Response {
    let cookie = ops_cookie(&service, &headers, String::new(), Duration::ZERO);
    back_to_dashboard(&service, cookie)
}

/// Checks a request to an operator route (stats): the publish key as a bearer token, or,
/// without one, a valid [`OPS_COOKIE`] on a request from the server's own pages (a browser
/// says so in `Sec-Fetch-Site`; a page of another origin, even one CORS lets in, is
/// refused). Errors are the publish key's.
pub(crate) fn check_operator(service: &SseService, headers: &HeaderMap) -> Result<(), ApiError> {
    let own_page = headers
        .get("sec-fetch-site")
        .is_none_or(|site| site.as_bytes() == b"same-origin" || site.as_bytes() == b"none");
    if own_page
        && bearer_token(headers).is_none()
        && has_ops_cookie(service, &CookieJar::from_headers(headers))
    {
        return Ok(());
    }
    check_publish_key(service, headers)
}

fn has_ops_cookie(service: &SseService, jar: &CookieJar) -> bool {
    let (Some(key), Some(cookie)) = (service.config().publish_key.as_ref(), jar.get(OPS_COOKIE)) else {
        return false;
    };
    ops_token_valid(key.expose_secret(), cookie.value(), now_ms() / 1000)
}

/// `<expiry, seconds>.<HMAC-SHA256 of "sse-notify ops <expiry>" keyed by the publish key>`.
fn ops_token(publish_key: &str, expires: u64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, publish_key.as_bytes());
    let tag = ring::hmac::sign(&key, format!("sse-notify ops {expires}").as_bytes());
    format!("{expires}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// Whether `token` is one [`ops_token`] made with this key and has not expired at `now`.
fn ops_token_valid(publish_key: &str, token: &str, now: u64) -> bool {
    let Some((expires, tag)) = token.split_once('.') else {
        return false;
    };
    let (Ok(expires), Ok(tag)) = (expires.parse::<u64>(), URL_SAFE_NO_PAD.decode(tag)) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, publish_key.as_bytes());
    expires > now
        && expires <= now + OPS_SESSION.as_secs()
        && ring::hmac::verify(&key, format!("sse-notify ops {expires}").as_bytes(), &tag).is_ok()
}

/// The `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, on the routes' prefix, `Secure`
/// as the session cookie would be.
fn ops_cookie(service: &SseService, headers: &HeaderMap, value: String, lasts: Duration) -> String {
    let secure = cookies_secure(service, None, headers);
    Cookie::build((OPS_COOKIE, value))
        .path(cookie_path(service))
        .http_only(true)
        .same_site(SameSite::Strict)
        .max_age(cookie::time::Duration::seconds(lasts.as_secs() as i64))
        .secure(secure)
        .build()
        .to_string()
}

/// The routes' prefix (from the stream's path), `/` without one.
fn prefix(service: &SseService) -> String {
    service
        .stream_path()
        .strip_suffix(crate::api::STREAM_PATH)
        .unwrap_or_default()
        .to_string()
}

fn cookie_path(service: &SseService) -> String {
    let prefix = prefix(service);
    if prefix.is_empty() {
        "/".into()
    } else {
        prefix
    }
}

fn back_to_dashboard(service: &SseService, cookie: String) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&format!("{}{DASHBOARD_PATH}", prefix(service))) {
        headers.insert(header::LOCATION, location);
    }
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn sign_in_page(service: &SseService, status: StatusCode, error: Option<&str>) -> Response {
    let error = error
        .map(|e| format!(r#"<p class="error" role="alert">{}</p>"#, escape(e)))
        .unwrap_or_default();
    let body = format!(
        r#"<form class="card signin" method="post" action="{action}">
<h1>sse-notify</h1>
<p>The operators' dashboard. Sign in with this server's publish key (<code>SSE_PUBLISH_KEY</code>).</p>
{error}<label for="key">Publish key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form>"#,
        action = escape(&format!("{}{DASHBOARD_PATH}/sign-in", prefix(service))),
    );
    page(status, "Sign in · sse-notify", &body, None)
}

fn dashboard(service: &SseService) -> Response {
    let report = service.stats_report();
    let prefix = prefix(service);
    let mut rows = String::new();
    for instance in &report.cluster.instances {
        let s = &instance.stats.stats;
        let refused: u64 = instance.stats.refused.values().sum();
        rows.push_str(&format!(
            r#"<tr data-instance="{id}"><th scope="row"><code>{id}</code>{this}</th><td data-k="clients">{clients}</td><td data-k="users">{users}</td><td data-k="published">–</td><td data-k="delivered">–</td><td data-k="slow">{slow}</td><td data-k="refused">{refused}</td><td data-k="broker">{broker} ({health})</td></tr>"#,
            id = escape(&instance.instance),
            this = if instance.instance == report.instance { " <small>(this one)</small>" } else { "" },
            clients = s.clients,
            users = s.users,
            slow = s.slow_client_disconnects,
            broker = escape(&s.broker),
            health = s.broker_health.as_str(),
        ));
    }
    let mut reasons = String::new();
    for (reason, n) in &report.cluster.refused {
        reasons.push_str(&format!(
            r#"<tr><th scope="row">{reason}</th><td data-reason="{reason}">{n}</td></tr>"#,
            reason = escape(reason),
        ));
    }
    let c = &report.cluster;
    let refused: u64 = c.refused.values().sum();
    let body = format!(
        r#"<header class="top"><h1>sse-notify</h1>
<form method="post" action="{sign_out}"><button type="submit" class="quiet">Sign out</button></form></header>
<p id="live" class="muted" aria-live="polite">Connecting…</p>
<div class="tiles">
<div class="tile"><span>Instances</span><strong id="instances">{instances}</strong></div>
<div class="tile"><span>Connections</span><strong id="clients">{clients}</strong></div>
<div class="tile"><span>Published /s</span><strong id="published">–</strong></div>
<div class="tile"><span>Delivered /s</span><strong id="delivered">–</strong></div>
<div class="tile"><span>Slow clients cut</span><strong id="slow">{slow}</strong></div>
<div class="tile"><span>Refused</span><strong id="refused">{refused}</strong></div>
</div>
<section class="card"><h2>Instances</h2><div class="scroll"><table id="instance-table">
<thead><tr><th scope="col">Instance</th><th scope="col">Connections</th><th scope="col">Users</th><th scope="col">Published /s</th><th scope="col">Delivered /s</th><th scope="col">Slow cut</th><th scope="col">Refused</th><th scope="col">Broker</th></tr></thead>
<tbody>{rows}</tbody></table></div></section>
<section class="card"><h2>Refused connections by reason</h2><table id="reasons"><tbody>{reasons}</tbody></table></section>"#,
        sign_out = escape(&format!("{prefix}{DASHBOARD_PATH}/sign-out")),
        instances = c.instances.len(),
        clients = c.clients,
        slow = c.slow_client_disconnects,
    );
    let stream = format!("{prefix}{}", crate::api::STATS_STREAM_PATH);
    page(
        StatusCode::OK,
        "Dashboard · sse-notify",
        &body,
        Some(&live_script(&stream)),
    )
}

/// Follows `/api/stats/stream` and rewrites the figures; rates come from two samples.
fn live_script(stream: &str) -> String {
    let stream = serde_json::to_string(stream).unwrap_or_else(|_| "\"\"".into());
    LIVE_SCRIPT.replace("STREAM", &stream)
}

/// The page's script; `STREAM` becomes the stats stream's URL as a JSON string. Data from
/// the server only ever lands in `textContent`.
const LIVE_SCRIPT: &str = r##"(() => {
const set = (el, v) => { if (el && el.textContent !== String(v)) el.textContent = String(v); };
const sum = (o) => Object.values(o || {}).reduce((a, b) => a + b, 0);
let last = new Map();
const live = document.getElementById("live");
const source = new EventSource(STREAM);
source.onopen = () => set(live, "Live, every second, from every instance.");
source.onerror = () => set(live, "Reconnecting…");
source.addEventListener("stats", (m) => {
  const r = JSON.parse(m.data), c = r.cluster, now = Date.now();
  const rate = (id, key, value) => {
    const before = last.get(id + key); last.set(id + key, [value, now]);
    if (!before || now <= before[1]) return "–";
    return Math.max(0, Math.round((value - before[0]) * 1000 / (now - before[1])));
  };
  set(document.getElementById("instances"), c.instances.length);
  set(document.getElementById("clients"), c.clients);
  set(document.getElementById("published"), rate("", "p", c.eventsPublished));
  set(document.getElementById("delivered"), rate("", "d", c.eventsDelivered));
  set(document.getElementById("slow"), c.slowClientDisconnects);
  set(document.getElementById("refused"), sum(c.refused));
  const body = document.querySelector("#instance-table tbody");
  const seen = new Set();
  for (const i of c.instances) {
    seen.add(i.instance);
    let row = body.querySelector(`tr[data-instance="${CSS.escape(i.instance)}"]`);
    if (!row) {
      row = document.createElement("tr"); row.dataset.instance = i.instance;
      const th = document.createElement("th"); th.scope = "row";
      const code = document.createElement("code"); code.textContent = i.instance; th.append(code);
      row.append(th);
      for (const k of ["clients", "users", "published", "delivered", "slow", "refused", "broker"]) {
        const td = document.createElement("td"); td.dataset.k = k; row.append(td);
      }
      body.append(row);
    }
    const s = i.stats, cell = (k) => row.querySelector(`td[data-k="${k}"]`);
    set(cell("clients"), s.clients); set(cell("users"), s.users);
    set(cell("published"), rate(i.instance, "p", s.eventsPublished));
    set(cell("delivered"), rate(i.instance, "d", s.eventsDelivered));
    set(cell("slow"), s.slowClientDisconnects); set(cell("refused"), sum(s.refused));
    set(cell("broker"), `${s.broker} (${s.brokerHealth})`);
  }
  for (const row of [...body.rows]) if (!seen.has(row.dataset.instance)) row.remove();
  for (const [reason, n] of Object.entries(c.refused)) set(document.querySelector(`td[data-reason="${CSS.escape(reason)}"]`), n);
});
})();"##;

/// A whole page: the shared styles (light and dark), `body`, and `script` under a fresh
/// nonce; nothing else may run, load or frame it.
fn page(status: StatusCode, title: &str, body: &str, script: Option<&str>) -> Response {
    let nonce = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
    let script = script
        .map(|s| format!(r#"<script nonce="{nonce}">{s}</script>"#))
        .unwrap_or_default();
    let html = format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark"><title>{title}</title>
<style nonce="{nonce}">{STYLE}</style></head>
<body><main>{body}</main>{script}</body></html>"#,
        title = escape(title),
    );
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    );
    let mut response = (status, Html(html)).into_response();
    let headers = response.headers_mut();
    if let Ok(csp) = HeaderValue::from_str(&csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

const STYLE: &str = r#"
:root { color-scheme: light dark; --bg: #f6f7f9; --card: #fff; --text: #1b1f24; --muted: #5b6470; --line: #dde1e6; --accent: #2563eb; --bad: #b42318; }
@media (prefers-color-scheme: dark) { :root { --bg: #0f1216; --card: #181c22; --text: #e7eaee; --muted: #9aa4b1; --line: #2a3038; --accent: #7aa2ff; --bad: #ff8a80; } }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text); font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; }
main { max-width: 64rem; margin: 0 auto; padding: 1.5rem 1rem 3rem; }
h1 { font-size: 1.4rem; margin: 0; } h2 { font-size: 1.05rem; margin: 0 0 .75rem; }
.top { display: flex; align-items: center; justify-content: space-between; gap: 1rem; }
.muted { color: var(--muted); margin: .25rem 0 1rem; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 12px; padding: 1rem 1.25rem; margin: 0 0 1rem; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(9.5rem, 1fr)); gap: .75rem; margin: 0 0 1rem; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 12px; padding: .75rem 1rem; display: flex; flex-direction: column; }
.tile span { color: var(--muted); font-size: .85rem; } .tile strong { font-size: 1.6rem; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: right; padding: .4rem .6rem; border-bottom: 1px solid var(--line); white-space: nowrap; }
th:first-child { text-align: left; } thead th { color: var(--muted); font-weight: 600; font-size: .85rem; }
#reasons th { font-weight: 400; } small { color: var(--muted); }
button { font: inherit; border-radius: 8px; border: 1px solid var(--accent); background: var(--accent); color: #fff; padding: .5rem 1rem; cursor: pointer; }
button.quiet { background: transparent; color: var(--accent); }
button:focus-visible, input:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
.signin { max-width: 26rem; margin: 10vh auto 0; display: flex; flex-direction: column; gap: .6rem; }
.signin p { margin: 0; color: var(--muted); }
input { font: inherit; padding: .55rem .7rem; border-radius: 8px; border: 1px solid var(--line); background: var(--bg); color: var(--text); }
.error { color: var(--bad) !important; font-weight: 600; }
"#;

/// Escapes text for HTML (element content and quoted attributes).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_tokens_verify_only_with_their_key_and_before_their_expiry() {
        let now = 1_800_000_000;
        let token = ops_token("the-key", now + 60);
        assert!(ops_token_valid("the-key", &token, now));
        assert!(!ops_token_valid("another-key", &token, now), "another key");
        assert!(!ops_token_valid("the-key", &token, now + 60), "expired");
        // An expiry pushed later breaks the tag; one beyond a session is refused outright.
        let (_, tag) = token.split_once('.').unwrap();
        assert!(!ops_token_valid("the-key", &format!("{}.{tag}", now + 120), now));
        let far = ops_token("the-key", now + OPS_SESSION.as_secs() + 1);
        assert!(!ops_token_valid("the-key", &far, now));
        for bad in ["", ".", "x.y", "123", &format!("{}.", now + 60)] {
            assert!(!ops_token_valid("the-key", bad, now), "{bad:?}");
        }
    }

    #[test]
    fn escape_leaves_no_markup() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
