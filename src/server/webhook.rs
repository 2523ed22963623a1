//! Incoming webhooks signed as [Standard Webhooks](https://www.standardwebhooks.com/) sign
//! them: an upload or transcoding service calls `POST /api/webhooks/<name>` with
//! `webhook-id`, `webhook-timestamp` and `webhook-signature` (`v1,<base64 HMAC-SHA256 of
//! "<id>.<timestamp>.<body>">`), and the server turns the payload into an event for the
//! user it names. This module holds the secrets and the check; `http::webhook` the route.

use std::fmt;

use base64::{engine::general_purpose::STANDARD, Engine};
use ring::hmac;
use subtle::ConstantTimeEq;

/// How far a `webhook-timestamp` may be from the server's clock, either way: the
/// specification's five minutes. Within it, a replayed message is answered from the
/// idempotency record of its `webhook-id` and publishes nothing.
pub const TOLERANCE_SECS: u64 = 5 * 60;

/// The prefix of a Standard Webhooks secret; what follows is the key in base64.
const SECRET_PREFIX: &str = "whsec_";

/// The shortest key accepted, in bytes (the specification asks for 24 to 64; 16 still
/// holds against guessing, and some senders' keys are that short).
const MIN_KEY_BYTES: usize = 16;

/// The most `webhook-signature` entries looked at: a sender rotating keys sends two.
const MAX_SIGNATURES: usize = 8;

/// An HMAC-SHA256 tag's length; entries of any other length are not compared.
const TAG_BYTES: usize = 32;

/// One secret per webhook name: `SSE_WEBHOOK_SECRETS=uploads=whsec_...,billing=whsec_...`.
///
/// ```
/// use sse_notify::server::WebhookSecrets;
/// let secrets = WebhookSecrets::parse("uploads=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
/// assert!(secrets.has("uploads"));
/// assert!(!secrets.has("billing"));
/// assert!(WebhookSecrets::parse("uploads=not-a-secret").is_err());
/// ```
#[derive(Clone, Default)]
pub struct WebhookSecrets(Vec<(String, hmac::Key)>);

impl fmt::Debug for WebhookSecrets {
    /// The names only: the keys are secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

impl WebhookSecrets {
    /// Comma-separated `name=whsec_<base64>` pairs; a name is `[a-z0-9_-]{1,64}`. A name
    /// listed twice accepts either secret (while the sender moves to a new one).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut secrets = Self::default();
        for (n, entry) in list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            // Never the entry itself in the message: it may be all secret.
            let (name, secret) = entry
                .split_once('=')
                .ok_or_else(|| format!("entry {}: expected name=whsec_<base64>", n + 1))?;
            secrets = secrets.with(name.trim(), secret.trim())?;
        }
        Ok(secrets)
    }

    /// Adds the secret of webhook `name` (`whsec_<base64>`).
    pub fn with(mut self, name: &str, secret: &str) -> Result<Self, String> {
        let name_ok = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(format!(
                "{name:?}: a webhook name is 1 to 64 of a-z, 0-9, _ and -"
            ));
        }
        let key = secret
            .strip_prefix(SECRET_PREFIX)
            .and_then(|b64| STANDARD.decode(b64).ok())
            .filter(|key| key.len() >= MIN_KEY_BYTES)
            .ok_or_else(|| {
                format!(
                    "the secret of {name:?}: expected whsec_ and at least {MIN_KEY_BYTES} bytes in base64"
                )
            })?;
        self.0
            .push((name.to_owned(), hmac::Key::new(hmac::HMAC_SHA256, &key)));
        Ok(self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a webhook of this name is configured.
    pub fn has(&self, name: &str) -> bool {
        self.keys(name).next().is_some()
    }

    /// The keys of webhook `name`: more than one while its secret is being rotated.
    fn keys<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a hmac::Key> + 'a {
        self.0.iter().filter(move |(n, _)| n == name).map(|(_, key)| key)
    }

    /// Checks a delivery to webhook `name`: its timestamp within [`TOLERANCE_SECS`] of
    /// `now_secs`, then one of its `v1` signatures, compared in constant time.
    pub fn verify(&self, name: &str, delivery: &Delivery<'_>, now_secs: u64) -> Result<(), WebhookError> {
        if !self.has(name) {
            return Err(WebhookError::UnknownName);
        }
        check_timestamp(delivery.timestamp, now_secs)?;
        let mut signed =
            Vec::with_capacity(delivery.id.len() + delivery.timestamp.len() + delivery.body.len() + 2);
        signed.extend_from_slice(delivery.id.as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(delivery.timestamp.as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(delivery.body);
        // Space-separated `v1,<base64>` entries: a sender rotating its secret signs twice.
        // One HMAC per key, whatever the header holds (an unauthenticated caller must not
        // buy a hash of the body per entry), then each well-formed tag compared in
        // constant time; at most MAX_SIGNATURES entries are looked at.
        let tags: Vec<Vec<u8>> = delivery
            .signature
            .split(' ')
            .take(MAX_SIGNATURES)
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|b64| STANDARD.decode(b64).ok())
            .filter(|tag| tag.len() == TAG_BYTES)
            .collect();
        let matches = !tags.is_empty()
            && self.keys(name).any(|key| {
                let expected = hmac::sign(key, &signed);
                tags.iter()
                    .any(|tag| bool::from(expected.as_ref().ct_eq(tag.as_slice())))
            });
        if matches {
            Ok(())
        } else {
            Err(WebhookError::Signature)
        }
    }
}

/// A `webhook-timestamp` is seconds since the Unix epoch within [`TOLERANCE_SECS`] of
/// `now_secs`: checked alone before the body is read, and again as part of
/// [`WebhookSecrets::verify`].
pub fn check_timestamp(timestamp: &str, now_secs: u64) -> Result<(), WebhookError> {
    let timestamp: u64 = timestamp
        .parse()
        .map_err(|_| WebhookError::Timestamp("expected seconds since the Unix epoch"))?;
    if timestamp.abs_diff(now_secs) > TOLERANCE_SECS {
        return Err(WebhookError::Timestamp(
            "more than 5 minutes from the server's clock",
        ));
    }
    Ok(())
}

/// What a delivery is signed with, as the headers and the body came.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// `webhook-id`: unique per message, the same on every retry of it.
    pub id: &'a str,
    /// `webhook-timestamp`: seconds since the Unix epoch.
    pub timestamp: &'a str,
    /// `webhook-signature`.
    pub signature: &'a str,
    pub body: &'a [u8],
}

/// Why a delivery is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("no webhook of this name is configured (SSE_WEBHOOK_SECRETS)")]
    UnknownName,
    #[error("webhook-timestamp: {0}")]
    Timestamp(&'static str),
    #[error("webhook-signature: no v1 signature matches this webhook's secret")]
    Signature,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The specification's own example (standard-webhooks' test suite).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    const TIMESTAMP: u64 = 1_614_265_330;

    fn delivery<'a>(signature: &'a str, body: &'a [u8]) -> Delivery<'a> {
        Delivery {
            id: "msg_p5jXN8AQM9LWM0D4loKWxJek",
            timestamp: "1614265330",
            signature,
            body,
        }
    }

    #[test]
    fn the_specifications_example_verifies() {
        let secrets = WebhookSecrets::parse(&format!("uploads={SECRET}")).unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secrets.verify("uploads", &delivery(SIGNATURE, body), TIMESTAMP),
            Ok(())
        );
        // Among other signatures (rotation), and with another version's entry before it.
        let several = format!("v1a,abc v1,AAAA {SIGNATURE}");
        assert_eq!(
            secrets.verify("uploads", &delivery(&several, body), TIMESTAMP),
            Ok(())
        );
    }

    #[test]
    fn only_the_first_entries_of_a_long_header_are_looked_at() {
        let secrets = WebhookSecrets::parse(&format!("uploads={SECRET}")).unwrap();
        let body = br#"{"test": 2432232314}"#;
        let padded = |n: usize| format!("{}{SIGNATURE}", "v1, ".repeat(n));
        assert_eq!(
            secrets.verify("uploads", &delivery(&padded(MAX_SIGNATURES - 1), body), TIMESTAMP),
            Ok(())
        );
        assert_eq!(
            secrets.verify("uploads", &delivery(&padded(MAX_SIGNATURES), body), TIMESTAMP),
            Err(WebhookError::Signature)
        );
    }

    #[test]
    fn anything_changed_is_refused() {
        let secrets = WebhookSecrets::parse(&format!("uploads={SECRET}")).unwrap();
        let body = br#"{"test": 2432232314}"#;
        let signed = delivery(SIGNATURE, body);
        assert_eq!(
            secrets.verify(
                "uploads",
                &delivery(SIGNATURE, br#"{"test": 2432232315}"#),
                TIMESTAMP
            ),
            Err(WebhookError::Signature)
        );
        assert_eq!(
            secrets.verify(
                "uploads",
                &Delivery {
                    id: "msg_other",
                    ..signed
                },
                TIMESTAMP
            ),
            Err(WebhookError::Signature)
        );
        assert_eq!(
            secrets.verify("uploads", &delivery("", body), TIMESTAMP),
            Err(WebhookError::Signature)
        );
        assert_eq!(
            secrets.verify("billing", &signed, TIMESTAMP),
            Err(WebhookError::UnknownName)
        );
        let other = WebhookSecrets::parse("uploads=whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
        assert_eq!(
            other.verify("uploads", &signed, TIMESTAMP),
            Err(WebhookError::Signature)
        );
    }

    #[test]
    fn timestamps_outside_five_minutes_are_refused() {
        let secrets = WebhookSecrets::parse(&format!("uploads={SECRET}")).unwrap();
        let signed = delivery(SIGNATURE, br#"{"test": 2432232314}"#);
        assert!(secrets
            .verify("uploads", &signed, TIMESTAMP + TOLERANCE_SECS)
            .is_ok());
        assert!(secrets
            .verify("uploads", &signed, TIMESTAMP - TOLERANCE_SECS)
            .is_ok());
        for now in [TIMESTAMP + TOLERANCE_SECS + 1, TIMESTAMP - TOLERANCE_SECS - 1] {
            assert!(matches!(
                secrets.verify("uploads", &signed, now),
                Err(WebhookError::Timestamp(_))
            ));
        }
        let bad = Delivery {
            timestamp: "soon",
            ..signed
        };
        assert!(matches!(
            secrets.verify("uploads", &bad, TIMESTAMP),
            Err(WebhookError::Timestamp(_))
        ));
    }

    #[test]
    fn bad_configuration_is_refused_without_echoing_the_secret() {
        for bad in [
            "uploads",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "uploads:whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "Uploads=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "uploads=MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "uploads=whsec_c2hvcnQ=",
        ] {
            let err = WebhookSecrets::parse(bad).unwrap_err();
            assert!(!err.contains("MfKQ9r8G"), "{err}");
        }
        let two = WebhookSecrets::parse(&format!(" uploads={SECRET} , billing={SECRET} ")).unwrap();
        assert!(two.has("uploads") && two.has("billing"));
        assert_eq!(format!("{two:?}"), r#"["uploads", "billing"]"#);
    }

    #[test]
    fn a_name_listed_twice_accepts_either_secret() {
        let body = br#"{"test": 2432232314}"#;
        let signed = delivery(SIGNATURE, body);
        let old_first = format!("uploads={SECRET},uploads=whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        let new_first = format!("uploads=whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAA,uploads={SECRET}");
        for list in [old_first, new_first] {
            let secrets = WebhookSecrets::parse(&list).unwrap();
            assert_eq!(secrets.verify("uploads", &signed, TIMESTAMP), Ok(()));
            assert_eq!(
                secrets.verify("uploads", &delivery(SIGNATURE, b"{}"), TIMESTAMP),
                Err(WebhookError::Signature)
            );
        }
    }
}
