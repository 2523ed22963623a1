//! `Idempotency-Key` on `POST /api/events` and
//! [`SseService::with_idempotency_key`]: a publish retried with the same key and body
//! within [`SseConfig::idempotency_window`](crate::server::SseConfig) gets the first one's
//! ids and publishes nothing; the same key with another body is refused. The record lives
//! in the broker (Redis or the cluster: one record for every instance; the process for the
//! in-memory broker), under a hash of the key, so its size is bounded whatever the key.

use ring::digest::{digest, SHA256};

use super::service::{SendError, SseService};
use crate::server::event::{Envelope, EventId};

/// The longest key accepted (as Stripe's and the IETF draft's examples fit).
pub const MAX_KEY_LEN: usize = 255;

/// How long a key stays "in progress" at most: far longer than a publish takes.
const PENDING_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// A key is 1 to [`MAX_KEY_LEN`] visible ASCII characters; the error says so.
pub(crate) fn check_idempotency_key(key: &str) -> Result<(), String> {
    if (1..=MAX_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(format!("expected 1 to {MAX_KEY_LEN} visible ASCII characters"))
    }
}

/// Hex SHA-256 of `bytes`.
pub(crate) fn fingerprint(bytes: &[u8]) -> String {
    digest(&SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where the record of `key` lives in the broker.
fn record_key(key: &str) -> String {
    format!("sse:idem:{}", fingerprint(key.as_bytes()))
}

impl SseService {
    /// Publishes `envelopes` once per `key`: the first call publishes and records its ids
    /// (`body` is the request as sent, what a retry must repeat); a retry of the same body
    /// gets those ids back, another body [`SendError::KeyReused`]. A publish that
    /// fails forgets the key, so a retry publishes.
    pub(crate) async fn publish_once(
        &self,
        key: &str,
        body: &[u8],
        envelopes: Vec<Envelope>,
    ) -> Result<Vec<EventId>, SendError> {
        let broker = self.broker();
        let window = self.config().idempotency_window;
        let record = record_key(key);
        let body = fingerprint(body);
        // "In progress" only for as long as a publish can take: a process that dies, or a
        // record that cannot be completed, frees the key within a minute, not the window.
        let held = broker
            .put_if_absent(&record, &format!("{body} pending"), window.min(PENDING_FOR))
            .await?;
        if let Some(held) = held {
            let (first_body, state) = held.split_once(' ').unwrap_or((held.as_str(), ""));
            if first_body != body {
                return Err(SendError::KeyReused);
            }
            let Some(ids) = state.strip_prefix("done") else {
                return Err(SendError::KeyInProgress);
            };
            return Ok(ids.split_whitespace().filter_map(|id| id.parse().ok()).collect());
        }
        match self.publish_envelopes(envelopes).await {
            Ok(ids) => {
                let list: Vec<String> = ids.iter().map(ToString::to_string).collect();
                let done = format!("{body} done {}", list.join(" "));
                if let Err(e) = broker.put(&record, &done, window).await {
                    // Published: a retry meets "in progress" until the pending record
                    // expires, then publishes again (twice rather than never).
                    tracing::warn!(error = %e, "published, but the idempotency record was not completed");
                }
                Ok(ids)
            }
            Err(e) => {
                if let Err(e) = broker.remove(&record).await {
                    tracing::warn!(error = %e, "could not release an idempotency key");
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_named_by_a_hash_of_bounded_length() {
        let long = "k".repeat(MAX_KEY_LEN);
        assert_eq!(record_key(&long).len(), record_key("a").len());
        assert_ne!(record_key("a"), record_key("b"));
        assert_eq!(fingerprint(b"abc").len(), 64);
    }

    #[test]
    fn keys_are_bounded_visible_ascii() {
        assert!(check_idempotency_key("order-42.shipped").is_ok());
        assert!(check_idempotency_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
        for bad in ["", "with space", "caf\u{e9}", &"k".repeat(MAX_KEY_LEN + 1)] {
            assert!(check_idempotency_key(bad).is_err(), "{bad:?}");
        }
    }
}
