//! The bound on undecided orders: intake stops accepting while too many
//! orders wait for payment and stock (`INTAKE_MAX_PENDING`).
//!
//! Why: every other limit of intake ([`crate::intake`]) protects the
//! request path, but an order is only done when it is decided. When orders
//! come faster than payment, inventory and the saga can decide them, an
//! intake that keeps accepting takes the CPU and the database from the
//! consumers: on the benchmark's two cores, 5,000 orders/s offered were
//! accepted at 2,300/s while only 420/s were decided, the backlog grew by
//! the second and orders neared their deadline. Shedding at the door keeps
//! the backlog (and with it the consumer lag and the accepted → decided
//! time) bounded: the caller gets `UNAVAILABLE` with `retry-after`, as for
//! any other overload, and may retry.
//!
//! The count is of `PENDING` orders in the database, so it is the same
//! whatever the number of order replicas and whoever decides them. A task
//! reads it every [`REFRESH`] (one partial-index count); between two reads,
//! the orders each replica admits are added to the last count, so one
//! replica never overshoots by more than what other replicas admit in one
//! interval.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use common::supervisor::TaskResult;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::error::OrderError;

/// How often the count of pending orders is read.
pub const REFRESH: Duration = Duration::from_millis(250);

/// Admission by backlog; cheap to clone. `max == 0` admits everything and
/// counts nothing.
#[derive(Clone, Debug)]
pub struct Backlog {
    max: u64,
    state: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    /// PENDING orders at the last read.
    counted: AtomicU64,
    /// Orders this replica admitted since then.
    admitted: AtomicU64,
}

impl Backlog {
    /// At most `max` orders pending (0: no bound).
    #[must_use]
    pub fn new(max: u64) -> Self {
        Self {
            max,
            state: Arc::default(),
        }
    }

    /// Admits one more order, or says how many are pending.
    pub fn admit(&self) -> Result<(), OrderError> {
        if self.max == 0 {
            return Ok(());
        }
        let admitted = self.state.admitted.fetch_add(1, Ordering::Relaxed);
        let pending = self.state.counted.load(Ordering::Relaxed) + admitted;
        if pending >= self.max {
            self.state.admitted.fetch_sub(1, Ordering::Relaxed);
            return Err(OrderError::Backlogged {
                pending,
                retry_after: Duration::from_secs(1),
            });
        }
        Ok(())
    }

    /// The orders pending at the last read plus those admitted since.
    #[must_use]
    pub fn estimate(&self) -> u64 {
        self.state.counted.load(Ordering::Relaxed) + self.state.admitted.load(Ordering::Relaxed)
    }

    fn counted(&self, pending: u64) {
        self.state.counted.store(pending, Ordering::Relaxed);
        self.state.admitted.store(0, Ordering::Relaxed);
        common::metrics::orders_pending(pending);
    }

    /// Reads the count every [`REFRESH`] until `stop`. A failed read keeps
    /// the last estimate (the writers report an unreachable database).
    pub async fn track(self, pool: PgPool, stop: CancellationToken) -> TaskResult {
        if self.max == 0 {
            stop.cancelled().await;
            return Ok(());
        }
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if stop.run_until_cancelled(tick.tick()).await.is_none() {
                return Ok(());
            }
            let count: sqlx::Result<i64> =
                sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
                    .fetch_one(&pool)
                    .await;
            match count {
                Ok(n) => self.counted(u64::try_from(n).unwrap_or(0)),
                Err(e) => tracing::debug!(error = %e, "counting pending orders failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_bound_then_until_the_next_count() {
        let backlog = Backlog::new(3);
        for _ in 0..3 {
            backlog.admit().expect("below the bound");
        }
        assert!(matches!(
            backlog.admit(),
            Err(OrderError::Backlogged { pending: 3, .. })
        ));
        assert_eq!(backlog.estimate(), 3, "a refusal is not counted");
        backlog.counted(1);
        backlog.admit().expect("two were decided meanwhile");
        backlog.admit().expect("room for one more");
        assert!(backlog.admit().is_err());
    }

    #[test]
    fn zero_admits_everything() {
        let backlog = Backlog::new(0);
        for _ in 0..10 {
            backlog.admit().expect("no bound");
        }
    }
}
