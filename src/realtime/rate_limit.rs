//! The inbound token bucket: `inbound_rate_per_s` tokens a second, up to `inbound_burst`.

use std::time::Instant;

/// What to do with one inbound client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Process it.
    Allow,
    /// Drop it and tell the client with an `error` (first offence since the bucket was last full).
    Warn,
    /// The client went on after the warning: close with 4029.
    Close,
}

/// A token bucket with a warning step before the close.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens held.
    burst: f64,
    /// Tokens now.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
    /// Set on the first refused message; cleared when the bucket has refilled completely.
    warned: bool,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_s: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket { rate: f64::from(rate_per_s), burst, tokens: burst, updated: now, warned: false }
    }

    /// Takes a token for one message arriving at `now`.
    pub fn take(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
        if self.tokens >= self.burst {
            self.warned = false;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Verdict::Allow
        } else if self.warned {
            Verdict::Close
        } else {
            self.warned = true;
            Verdict::Warn
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_warn_then_close() {
        let t = Instant::now();
        let mut b = TokenBucket::new(10, 3, t);
        assert_eq!(b.take(t), Verdict::Allow);
        assert_eq!(b.take(t), Verdict::Allow);
        assert_eq!(b.take(t), Verdict::Allow);
        assert_eq!(b.take(t), Verdict::Warn);
        assert_eq!(b.take(t), Verdict::Close);
    }

    #[test]
    fn refills_at_the_rate() {
        let t = Instant::now();
        let mut b = TokenBucket::new(10, 2, t);
        b.take(t);
        b.take(t);
        assert_eq!(b.take(t), Verdict::Warn);
        // 100 ms later one token is back.
        assert_eq!(b.take(t + Duration::from_millis(100)), Verdict::Allow);
        assert_eq!(b.take(t + Duration::from_millis(100)), Verdict::Close);
    }

    #[test]
    fn a_full_refill_forgives_the_warning() {
        let t = Instant::now();
        let mut b = TokenBucket::new(10, 2, t);
        b.take(t);
        b.take(t);
        assert_eq!(b.take(t), Verdict::Warn);
        let later = t + Duration::from_secs(1);
        assert_eq!(b.take(later), Verdict::Allow);
        assert_eq!(b.take(later), Verdict::Allow);
        assert_eq!(b.take(later), Verdict::Warn, "a fresh warning, not a close");
    }

    #[test]
    fn steady_rate_is_never_limited() {
        let t = Instant::now();
        let mut b = TokenBucket::new(10, 1, t);
        for i in 0..100 {
            assert_eq!(b.take(t + Duration::from_millis(100 * i)), Verdict::Allow);
        }
    }
}
