//! Who is asking: the [`Authenticate`] hook that turns a request into an [`Identity`], and
//! its default, [`Auth`]: session tokens (JWT, HS256, signed with `SSE_JWT_SECRET`).
//!
//! Claim `sub` is the user id, `exp` is required, `sid` (session id) is optional. The user
//! id of a stream comes only from the hook (a verified token by default), never from a
//! query parameter.
//!
//! A host app that has sessions of its own (tower-sessions, axum-login, ...) gives the
//! service an [`Authenticate`] of its own instead, so browsers need no second credential:
//!
//! ```no_run
//! use axum::http::request::Parts;
//! use sse_notify::server::{AuthError, Identity};
//!
//! async fn from_my_session(parts: Parts) -> Result<Identity, AuthError> {
//!     let user = parts.headers.get("x-user").and_then(|v| v.to_str().ok()).ok_or(AuthError::Missing)?;
//!     Ok(Identity::new(user))
//! }
//! # async fn start() -> Result<(), Box<dyn std::error::Error>> {
//! let sse = sse_notify::server::SseService::builder(sse_notify::server::SseConfig::from_env()?)
//!     .authenticate(from_my_session)
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! ```
//! use std::time::Duration;
//! use sse_notify::server::Auth;
//!
//! let auth = Auth::new(Some(&"a-secret-of-at-least-16-bytes".into()));
//! let token = auth.issue("alice", None, Duration::from_secs(60)).unwrap();
//! assert_eq!(auth.verify(&token).unwrap().sub, "alice");
//! assert!(Auth::new(Some(&"another-secret-0123456".into())).verify(&token).is_err());
//! ```

use std::{future::Future, time::Duration};

use async_trait::async_trait;
use axum::http::{header, request::Parts, HeaderMap};
use axum_extra::extract::CookieJar;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Name of the session cookie set by `POST /api/session`.
pub const SESSION_COOKIE: &str = "sse_session";
/// Longest accepted user id.
pub const MAX_USER_ID_LEN: usize = 128;
/// The `aud` claim of session tokens: a token leaked through `?token=` is refused by any
/// other API that shares the secret but checks its own audience, and tokens meant for
/// another API are refused here.
pub const TOKEN_AUDIENCE: &str = "sse-notify";

/// What the identity tag key is derived for, so it never equals the token signing key.
const TAG_KEY_LABEL: &[u8] = b"sse-notify identity tag v1";

/// The claims of a session token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Optional session id, e.g. to tell one login from another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// The audience: [`TOKEN_AUDIENCE`] on every token issued here, and required unless
    /// [`Auth::accept_tokens_without_audience`] (during a migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Why a request was refused: `Missing` and `Invalid` are a 401 (the browser's hook stops:
/// signed out), `Unavailable` a 503 with `Retry-After` (the hook retries).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no session: send cookie `sse_session`, `Authorization: Bearer <jwt>` or `?token=<jwt>`")]
    Missing,
    #[error("invalid session token: {0}")]
    Invalid(String),
    /// Who the request is from cannot be told right now (the host's session store did
    /// not answer, or its session layer does not wrap these routes): not a sign-out.
    #[error("the session cannot be checked now: {0}")]
    Unavailable(String),
}

/// Who a request comes from, as an [`Authenticate`] hook found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user whose events the stream carries.
    pub user_id: String,
    /// When the identity stops being valid, seconds since the Unix epoch (a token's `exp`):
    /// the stream ends then. `None`: it lasts as long as the stream.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// `user_id`, valid as long as the stream.
    pub fn new(user_id: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            expires_at: None,
        }
    }

    /// The same identity, ending at `expires_at` (seconds since the Unix epoch).
    #[must_use]
    pub fn expires_at(mut self, expires_at: u64) -> Self {
        self.expires_at = Some(expires_at);
        self
    }
}

/// Finds who sent a request (the head only: the stream has no body). The service is built
/// with one; [`Auth`] (JWT) is the default. Any `async fn(Parts) -> Result<Identity,
/// AuthError>` is one too.
#[async_trait]
pub trait Authenticate: Send + Sync + 'static {
    async fn authenticate(&self, request: Parts) -> Result<Identity, AuthError>;
}

#[async_trait]
impl<F, Fut> Authenticate for F
where
    F: Fn(Parts) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Identity, AuthError>> + Send,
{
    async fn authenticate(&self, request: Parts) -> Result<Identity, AuthError> {
        self(request).await
    }
}

#[async_trait]
impl Authenticate for Auth {
    /// The token of the `Authorization: Bearer` header, else the `token` query parameter,
    /// else the `sse_session` cookie; `sub` is the user, `exp` when the stream ends.
    async fn authenticate(&self, request: Parts) -> Result<Identity, AuthError> {
        let query_token = request.uri.query().and_then(|q| url_query_value(q, "token"));
        let claims = self.authenticate_headers(&request.headers, query_token.as_deref())?;
        Ok(Identity::new(claims.sub).expires_at(claims.exp))
    }
}

/// The decoded value of `name` in a query string.
fn url_query_value(query: &str, name: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// Signs and verifies session tokens.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Keys [`identity_tag`](Self::identity_tag): derived from the secret, so every
    /// instance that shares the secret gives a user the same tag, and a tag reveals
    /// neither the user id nor the secret.
    tag_key: ring::hmac::Key,
}

impl Auth {
    /// Uses `secret`, or a random per-process secret (tokens then die with the process and
    /// cannot be shared between instances) when `None`.
    pub fn new(secret: Option<&SecretString>) -> Self {
        let secret: Vec<u8> = match secret {
            Some(s) => s.expose_secret().as_bytes().to_vec(),
            None => (0..32).map(|_| rand::random::<u8>()).collect(),
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.set_audience(&[TOKEN_AUDIENCE]);
        validation.leeway = 5;
        let tag_secret = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            TAG_KEY_LABEL,
        );
        Self {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            validation,
            tag_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, tag_secret.as_ref()),
        }
    }

    /// Also accepts tokens without `aud` (a token with another `aud` is still refused):
    /// for a migration from tokens minted before they carried it.
    #[must_use]
    pub fn accept_tokens_without_audience(mut self, accept: bool) -> Self {
        let required: &[&str] = if accept {
            &["exp", "sub"]
        } else {
            &["exp", "sub", "aud"]
        };
        self.validation.set_required_spec_claims(required);
        self
    }

    /// The opaque tag of `user_id`: base64url of the first 12 bytes of HMAC-SHA256 over
    /// it. Browsers key the channels their tabs share by it, so a tab never hears the
    /// events of another user signed in in the same browser, without the user id being
    /// exposed to scripts that could not see it before.
    pub fn identity_tag(&self, user_id: &str) -> String {
        use base64::Engine as _;
        let mac = ring::hmac::sign(&self.tag_key, user_id.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&mac.as_ref()[..12])
    }

    /// A token for `user_id` valid for `ttl`, with `aud` [`TOKEN_AUDIENCE`].
    pub fn issue(&self, user_id: &str, session_id: Option<&str>, ttl: Duration) -> Result<String, AuthError> {
        validate_user_id(user_id).map_err(AuthError::Invalid)?;
        let claims = Claims {
            sub: user_id.to_string(),
            exp: crate::server::clock::now_ms() / 1000 + ttl.as_secs(),
            sid: session_id.map(str::to_string),
            aud: Some(TOKEN_AUDIENCE.into()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// Verifies signature, algorithm and expiry, and that `sub` is a usable user id.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        validate_user_id(&data.claims.sub).map_err(AuthError::Invalid)?;
        Ok(data.claims)
    }

    /// Finds the token of a request and verifies it: the explicit ones first (the bearer
    /// header, then the `token` query parameter, which a page sets on purpose), then the
    /// ambient `sse_session` cookie.
    pub fn authenticate_headers(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Claims, AuthError> {
        let cookie = CookieJar::from_headers(headers)
            .get(SESSION_COOKIE)
            .map(|c| c.value().to_string());
        let token = bearer_token(headers)
            .or(query_token)
            .or(cookie.as_deref())
            .ok_or(AuthError::Missing)?;
        self.verify(token)
    }
}

/// A user id is 1 to 128 characters without control characters.
pub fn validate_user_id(user_id: &str) -> Result<(), String> {
    if user_id.trim().is_empty() {
        return Err("user id must not be empty".into());
    }
    if user_id.chars().count() > MAX_USER_ID_LEN {
        return Err(format!("user id must be at most {MAX_USER_ID_LEN} characters"));
    }
    if user_id.chars().any(char::is_control) {
        return Err("user id must not contain control characters".into());
    }
    Ok(())
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef-test";

    fn auth() -> Auth {
        Auth::new(Some(&SECRET.into()))
    }

    /// The same user gets the same tag from every instance sharing the secret; another
    /// user, or another secret, another tag; and the tag does not carry the user id.
    #[test]
    fn identity_tags_are_stable_per_secret_and_opaque() {
        let tag = auth().identity_tag("alice");
        assert_eq!(tag, auth().identity_tag("alice"));
        assert_eq!(tag.len(), 16, "12 bytes in base64url: {tag}");
        assert!(tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(tag, auth().identity_tag("bob"));
        assert_ne!(
            tag,
            Auth::new(Some(&"another-secret-0123456".into())).identity_tag("alice")
        );
        assert_ne!(
            Auth::new(None).identity_tag("alice"),
            Auth::new(None).identity_tag("alice")
        );
        assert!(!tag.contains("alice"));
    }

    #[test]
    fn expired_and_forged_tokens_are_refused() {
        let auth = auth();
        let expired = Claims {
            sub: "a".into(),
            exp: 1_000,
            sid: None,
            aud: Some(TOKEN_AUDIENCE.into()),
        };
        let token = jsonwebtoken::encode(
            &Header::default(),
            &expired,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(auth.verify(&token).is_err());
        let good = auth.issue("a", Some("s1"), Duration::from_secs(60)).unwrap();
        // Change one byte of the signature itself (a swapped last character can leave the
        // decoded bytes as they were: it carries padding bits).
        use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
        let (signed, signature) = good.rsplit_once('.').unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
        bytes[7] ^= 0x01;
        let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&bytes));
        assert!(
            matches!(auth.verify(&forged), Err(AuthError::Invalid(e)) if e.contains("InvalidSignature")),
            "a changed signature must fail as a bad signature"
        );
        assert_eq!(auth.verify(&good).unwrap().sid.as_deref(), Some("s1"));
    }

    /// Tokens carry `aud`; one without it passes only behind the migration switch, and
    /// one for another audience never does.
    #[test]
    fn tokens_need_this_audience() {
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap()
        };
        let exp = crate::server::clock::now_ms() / 1000 + 60;
        let issued = auth().issue("a", None, Duration::from_secs(60)).unwrap();
        assert_eq!(
            auth().verify(&issued).unwrap().aud.as_deref(),
            Some(TOKEN_AUDIENCE)
        );
        let without = sign(serde_json::json!({"sub": "a", "exp": exp}));
        let other = sign(serde_json::json!({"sub": "a", "exp": exp, "aud": "billing-api"}));
        assert!(auth().verify(&without).is_err());
        assert!(auth().verify(&other).is_err());
        let migrating = auth().accept_tokens_without_audience(true);
        assert_eq!(migrating.verify(&without).unwrap().sub, "a");
        assert!(migrating.verify(&other).is_err());
        assert!(migrating.verify(&issued).is_ok());
    }

    #[test]
    fn alg_none_is_refused() {
        // {"alg":"none"} . {"sub":"a","exp":9999999999} . (no signature)
        let token = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(auth().verify(token).is_err());
    }

    #[test]
    fn token_sources_in_order() {
        let auth = auth();
        let a = auth.issue("a", None, Duration::from_secs(60)).unwrap();
        let b = auth.issue("b", None, Duration::from_secs(60)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            format!("x=1; {SESSION_COOKIE}={a}").parse().unwrap(),
        );
        assert_eq!(auth.authenticate_headers(&headers, None).unwrap().sub, "a");
        assert_eq!(auth.authenticate_headers(&headers, Some(&b)).unwrap().sub, "b");
        headers.insert(header::AUTHORIZATION, format!("Bearer {b}").parse().unwrap());
        assert_eq!(auth.authenticate_headers(&headers, Some(&a)).unwrap().sub, "b");
        assert!(matches!(
            auth.authenticate_headers(&HeaderMap::new(), None),
            Err(AuthError::Missing)
        ));
    }

    #[test]
    fn user_ids_are_checked() {
        assert!(validate_user_id("alice@example.com").is_ok());
        assert!(validate_user_id("").is_err());
        assert!(validate_user_id("a\nb").is_err());
        assert!(validate_user_id(&"x".repeat(129)).is_err());
    }
}
