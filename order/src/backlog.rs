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
//! reads it every [`REFRESH`] (one partial-index count); the orders this
//! replica admitted and had not finished writing when that count began are
//! added to it (one written meanwhile may be in both: the estimate errs
//! high until the next count), so one replica never overshoots by more
//! than what other replicas admit in one interval. The orders this
//! replica decided since the count began (its saga consumer and deadline
//! sweeper, told once their transactions committed) are taken off: a
//! decision frees room at once, where waiting for the next count made
//! intake admit in waves (a second's worth of room taken in a burst, then
//! everything refused until the next count). Decisions that committed as
//! the count began may be both missing from it and taken off: the
//! estimate then errs low by those, a batch or two. With several replicas,
//! a replica may also take off the decision of an order another one
//! admitted since the count began (its saga decides the orders of its
//! partitions, whoever took them): each replica overshoots the bound by at
//! most about twice what the others admit in one interval.

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use common::supervisor::TaskResult;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::error::OrderError;

/// How often the count of pending orders is read. The count is not free
/// where it matters: with the backlog at its bound of 10,000 it took 17 ms
/// (the partial index's entries checked against rows too new for the
/// visibility map), and read every 250 ms it cost the pipeline 12-20 % of
/// its throughput at 5,000/s offered (BENCHMARKS.md). Once a second, the
/// estimate lags the decisions of that second: intake sheds a little early,
/// with thousands of orders still queued for the consumers.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Admission by backlog; cheap to clone. `max == 0` admits everything and
/// counts nothing.
#[derive(Clone, Debug)]
pub struct Backlog {
    max: u64,
    state: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    /// PENDING orders at the last count.
    counted: u64,
    /// Orders this replica ever admitted.
    admitted: u64,
    /// Of those, the ones whose write had ended (committed or not).
    finished: u64,
    /// `finished` when the last count began: every order committed by then
    /// is in `counted`.
    finished_at_count: u64,
    /// Orders this replica ever decided (their decision committed).
    decided: u64,
    /// `decided` when the last count began.
    decided_at_count: u64,
}

impl Counts {
    fn estimate(&self) -> u64 {
        (self.counted + (self.admitted - self.finished_at_count))
            .saturating_sub(self.decided - self.decided_at_count)
    }
}

/// Where a count began: what [`Backlog::counted`] takes off its result.
#[derive(Clone, Copy, Debug)]
struct CountStart {
    finished: u64,
    decided: u64,
}

/// An admitted order whose write has not ended; drop it when it has
/// (whatever its outcome).
#[derive(Debug)]
#[must_use = "the order counts as being written until this is dropped"]
pub struct Admission(Option<Backlog>);

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(backlog) = self.0.take() {
            backlog.lock().finished += 1;
        }
    }
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

    /// Admits one more order, or says how many are pending. Keep the
    /// admission until the order's write has ended.
    pub fn admit(&self) -> Result<Admission, OrderError> {
        if self.max == 0 {
            return Ok(Admission(None));
        }
        let mut counts = self.lock();
        let pending = counts.estimate();
        if pending >= self.max {
            return Err(OrderError::Backlogged {
                pending,
                retry_after: Duration::from_secs(1),
            });
        }
        counts.admitted += 1;
        Ok(Admission(Some(self.clone())))
    }

    /// The orders pending at the last count plus those admitted since it
    /// began.
    #[cfg(test)]
    fn estimate(&self) -> u64 {
        self.lock().estimate()
    }

    /// `n` orders were decided (their transaction committed): room for as
    /// many new ones.
    pub fn decided(&self, n: u64) {
        if self.max > 0 {
            self.lock().decided += n;
        }
    }

    /// A count begins: returns the writes finished and the orders decided
    /// so far, to pass to [`Self::counted`] with its result.
    fn counting(&self) -> CountStart {
        let counts = self.lock();
        CountStart {
            finished: counts.finished,
            decided: counts.decided,
        }
    }

    fn counted(&self, pending: u64, start: CountStart) {
        let mut counts = self.lock();
        counts.counted = pending;
        counts.finished_at_count = start.finished;
        counts.decided_at_count = start.decided;
        drop(counts);
        common::metrics::orders_pending(pending);
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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
            let began = self.counting();
            let count: sqlx::Result<i64> =
                sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
                    .fetch_one(&pool)
                    .await;
            match count {
                Ok(n) => self.counted(u64::try_from(n).unwrap_or(0), began),
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
            drop(backlog.admit().expect("below the bound"));
        }
        assert!(matches!(
            backlog.admit(),
            Err(OrderError::Backlogged { pending: 3, .. })
        ));
        assert_eq!(backlog.estimate(), 3, "a refusal is not counted");
        let began = backlog.counting();
        backlog.counted(1, began);
        drop(backlog.admit().expect("two were decided meanwhile"));
        drop(backlog.admit().expect("room for one more"));
        assert!(backlog.admit().is_err());
    }

    #[test]
    fn a_decision_makes_room_before_the_next_count() {
        let backlog = Backlog::new(3);
        let began = backlog.counting();
        backlog.counted(2, began);
        drop(backlog.admit().expect("the third"));
        assert!(backlog.admit().is_err());
        // Two decided (of the counted or the admitted, all the same).
        backlog.decided(2);
        assert_eq!(backlog.estimate(), 1);
        drop(backlog.admit().expect("room again"));
        drop(backlog.admit().expect("and again"));
        assert!(backlog.admit().is_err());
        // The next count saw those two decided: they are not taken off twice.
        let began = backlog.counting();
        backlog.counted(3, began);
        assert_eq!(backlog.estimate(), 3);
        assert!(backlog.admit().is_err());
        // A decision after the count began is, once.
        backlog.decided(1);
        assert_eq!(backlog.estimate(), 2);
    }

    #[test]
    fn an_order_being_written_when_a_count_begins_still_counts() {
        let backlog = Backlog::new(3);
        drop(backlog.admit().expect("first"));
        drop(backlog.admit().expect("second"));
        let third = backlog.admit().expect("third");
        // The count begins while the third is being written, and its
        // snapshot does not hold it yet.
        let began = backlog.counting();
        backlog.counted(2, began);
        drop(third);
        assert_eq!(backlog.estimate(), 3);
        assert!(backlog.admit().is_err(), "the third must still count");
        // The next count sees it committed.
        let began = backlog.counting();
        backlog.counted(3, began);
        assert_eq!(backlog.estimate(), 3);
    }

    #[test]
    fn zero_admits_everything() {
        let backlog = Backlog::new(0);
        for _ in 0..10 {
            drop(backlog.admit().expect("no bound"));
        }
    }
}
