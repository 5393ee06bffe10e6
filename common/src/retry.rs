//! Exponential backoff with "equal" jitter: half the delay is fixed, so a
//! retry loop never spins, and half is random, so that many clients
//! retrying the same dependency do not retry in lockstep.

use rand::Rng;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    #[must_use]
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt: uniform in `[c/2, c]` where `c = min(max, base * 2^n)`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // At most `max`; a ceiling beyond u64 milliseconds (584 million years) saturates.
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis.max(1)))
    }

    /// Attempts made so far.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// The failures of a background loop (outbox relay, deadline sweeper, the
/// consume loop's own bookkeeping) in a row. A dependency that is
/// unreachable is waited out for as long as it takes, with backoff: that is
/// what health `NOT_SERVING` reports. Any other error (a table gone, a
/// database dropped, a permission revoked) will not cure itself: after
/// [`Streak::LIMIT`] in a row the loop gives up, so that its service exits
/// and its supervisor restarts it where someone will see it.
#[derive(Debug)]
pub struct Streak {
    backoff: Backoff,
    failures: u32,
}

impl Streak {
    /// Consecutive non-transient failures a loop tolerates (about 3 s of
    /// backoff in all).
    pub const LIMIT: u32 = 5;

    #[must_use]
    pub fn new() -> Self {
        Self {
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            failures: 0,
        }
    }

    /// The loop made progress: start counting afresh.
    pub fn reset(&mut self) {
        self.backoff.reset();
        self.failures = 0;
    }

    /// Records a failure. Returns how long to wait before retrying, or
    /// gives `error` back when it is not `transient` and has happened
    /// [`Streak::LIMIT`] times in a row.
    pub fn failed<E>(&mut self, error: E, transient: bool) -> Result<Duration, E> {
        if !transient {
            self.failures += 1;
            if self.failures >= Self::LIMIT {
                return Err(error);
            }
        }
        Ok(self.backoff.next_delay())
    }
}

impl Default for Streak {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streak_waits_out_transient_errors_and_gives_up_on_others() {
        let mut streak = Streak::new();
        for _ in 0..100 {
            assert!(streak.failed("unreachable", true).is_ok());
        }
        for _ in 1..Streak::LIMIT {
            assert!(streak.failed("no such table", false).is_ok());
        }
        assert_eq!(streak.failed("no such table", false), Err("no such table"));
        streak.reset();
        assert!(streak.failed("no such table", false).is_ok());
    }

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(800)));
        // Past the cap every delay lies in the upper half of [0, max].
        assert!(delays[7] >= Duration::from_millis(400));
        assert_eq!(b.attempts(), 8);
        b.reset();
        assert_eq!(b.attempts(), 0);
    }
}
