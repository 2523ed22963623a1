//! The one backoff formula, used by the browser's reconnects, the server's Redis
//! subscriber and the cluster router's retries alike.

/// The delay before retry `attempt` (0-based): `base_ms * 2^attempt`, capped at `cap_ms`,
/// then a random point in its upper half (`jitter` in `0.0..1.0`), so a crowd of clients
/// that lost the same server does not come back in one wave.
///
/// ```
/// use sse_notify::backoff::backoff_delay;
///
/// assert_eq!(backoff_delay(1_000, 30_000, 0, 0.0), 500);
/// assert_eq!(backoff_delay(1_000, 30_000, 3, 1.0), 8_000);
/// assert_eq!(backoff_delay(1_000, 30_000, 10, 1.0), 30_000); // capped
/// ```
pub fn backoff_delay(base_ms: u64, cap_ms: u64, attempt: u32, jitter: f64) -> u64 {
    let full = base_ms.saturating_mul(1u64 << attempt.min(16)).min(cap_ms);
    full / 2 + (full as f64 / 2.0 * jitter.clamp(0.0, 1.0)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_jitters_in_the_upper_half() {
        assert_eq!(backoff_delay(1_000, 30_000, 0, 0.0), 500);
        assert_eq!(backoff_delay(1_000, 30_000, 0, 1.0), 1_000);
        assert_eq!(backoff_delay(1_000, 30_000, 3, 1.0), 8_000);
        assert_eq!(backoff_delay(1_000, 30_000, 10, 1.0), 30_000);
        assert_eq!(backoff_delay(1_000, 30_000, 40, 0.0), 15_000);
        assert_eq!(backoff_delay(100, 5_000, 2, 0.5), 300);
    }
}
