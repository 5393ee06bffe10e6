//! The order's saga rules as a pure state machine over one `orders` row.
//!
//! [`crate::saga_batch`] folds a batch of `payments` and `inventory` results
//! over the locked rows with [`SagaState::apply`], then writes them back in
//! a few statements; the per-record replay of a failed batch is the same
//! fold over a batch of one. Keeping the rules here, free of I/O, lets them
//! be tested without a database.

use crate::domain::{Decision, InventoryStatus, Outcome, PaymentStatus, Status, decide};

/// Which side of the saga reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Payment,
    Inventory,
}

/// What one consumed event says about an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// A side's result (`PaymentCompleted`, `InventoryUpdated`).
    Result(Side, Outcome),
    /// A side undid what it did after the order was cancelled
    /// (`PaymentRefunded`, `InventoryReleased`).
    Compensated(Side),
}

/// The saga's columns of an `orders` row.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct SagaState {
    pub status: Status,
    pub reason: String,
    pub payment_status: Option<PaymentStatus>,
    pub payment_reason: String,
    pub inventory_status: Option<InventoryStatus>,
    pub inventory_reason: String,
}

/// A decision taken while applying a report; the caller publishes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decided {
    Confirmed,
    Cancelled(String),
}

/// What applying one report did to the row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// The row changed and must be written (which moves `updated_at`).
    pub changed: bool,
    /// Watchers are told (a recorded result; compensation marks are not
    /// notified, as they never were).
    pub notify: bool,
    /// The order left PENDING.
    pub decided: Option<Decided>,
}

impl SagaState {
    /// Applies one report with the saga's rules:
    ///
    /// - the first report of a side wins; a later result for the same side
    ///   changes nothing (a redelivery under another event id, or a result
    ///   after a compensation mark);
    /// - a recorded result decides the order (via [`decide`]) only while it
    ///   is PENDING: an order the deadline cancelled keeps its reason;
    /// - a compensation marks the side REFUNDED / RELEASED unconditionally.
    pub fn apply(&mut self, report: Report) -> Step {
        match report {
            Report::Compensated(Side::Payment) => {
                self.payment_status = Some(PaymentStatus::Refunded);
                Step {
                    changed: true,
                    ..Step::default()
                }
            }
            Report::Compensated(Side::Inventory) => {
                self.inventory_status = Some(InventoryStatus::Released);
                Step {
                    changed: true,
                    ..Step::default()
                }
            }
            Report::Result(side, outcome) => self.record(side, outcome),
        }
    }

    fn record(&mut self, side: Side, outcome: Outcome) -> Step {
        let (ok, reason) = match outcome {
            Outcome::Ok => (true, String::new()),
            Outcome::Failed(r) => (false, r),
        };
        match side {
            Side::Payment if self.payment_status.is_some() => return Step::default(),
            Side::Inventory if self.inventory_status.is_some() => return Step::default(),
            Side::Payment => {
                self.payment_status = Some(if ok {
                    PaymentStatus::Approved
                } else {
                    PaymentStatus::Declined
                });
                self.payment_reason = reason;
            }
            Side::Inventory => {
                self.inventory_status = Some(if ok {
                    InventoryStatus::Reserved
                } else {
                    InventoryStatus::Rejected
                });
                self.inventory_reason = reason;
            }
        }
        let mut step = Step {
            changed: true,
            notify: true,
            decided: None,
        };
        if self.status != Status::Pending {
            return step; // decided already (timed out); compensation is under way
        }
        match decide(self.payment().as_ref(), self.inventory().as_ref()) {
            Decision::Wait => {}
            Decision::Confirm => {
                self.status = Status::Confirmed;
                step.decided = Some(Decided::Confirmed);
            }
            Decision::Cancel(reason) => {
                self.status = Status::Cancelled;
                self.reason.clone_from(&reason);
                step.decided = Some(Decided::Cancelled(reason));
            }
        }
        step
    }

    /// What payment reported, if it has.
    fn payment(&self) -> Option<Outcome> {
        self.payment_status.map(|s| match s {
            PaymentStatus::Approved => Outcome::Ok,
            PaymentStatus::Declined | PaymentStatus::Refunded => {
                Outcome::Failed(self.payment_reason.clone())
            }
        })
    }

    /// What inventory reported, if it has.
    fn inventory(&self) -> Option<Outcome> {
        self.inventory_status.map(|s| match s {
            InventoryStatus::Reserved => Outcome::Ok,
            InventoryStatus::Rejected | InventoryStatus::Released => {
                Outcome::Failed(self.inventory_reason.clone())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> SagaState {
        SagaState {
            status: Status::Pending,
            reason: String::new(),
            payment_status: None,
            payment_reason: String::new(),
            inventory_status: None,
            inventory_reason: String::new(),
        }
    }

    fn ok(side: Side) -> Report {
        Report::Result(side, Outcome::Ok)
    }

    fn failed(side: Side, reason: &str) -> Report {
        Report::Result(side, Outcome::Failed(reason.into()))
    }

    /// Folds reports in order; returns the decisions taken.
    fn fold(state: &mut SagaState, reports: Vec<Report>) -> Vec<Decided> {
        reports
            .into_iter()
            .filter_map(|r| state.apply(r).decided)
            .collect()
    }

    #[test]
    fn both_results_confirm_once() {
        let mut s = pending();
        let first = s.apply(ok(Side::Payment));
        assert_eq!(
            first,
            Step {
                changed: true,
                notify: true,
                decided: None
            }
        );
        let second = s.apply(ok(Side::Inventory));
        assert_eq!(second.decided, Some(Decided::Confirmed));
        assert_eq!(s.status, Status::Confirmed);
        assert_eq!(s.reason, "");
        // A second copy of a result (another event id) changes nothing.
        assert_eq!(s.apply(ok(Side::Payment)), Step::default());
    }

    #[test]
    fn first_failure_cancels_with_its_reason_only() {
        let mut s = pending();
        let decided = fold(
            &mut s,
            vec![
                failed(Side::Inventory, "out of stock"),
                failed(Side::Payment, "insufficient credit"),
            ],
        );
        assert_eq!(
            decided,
            vec![Decided::Cancelled(
                "inventory rejected: out of stock".into()
            )]
        );
        assert_eq!(s.status, Status::Cancelled);
        assert_eq!(s.reason, "inventory rejected: out of stock");
        // The later result is still recorded, and watchers told.
        assert_eq!(s.payment_status, Some(PaymentStatus::Declined));
        assert_eq!(s.payment_reason, "insufficient credit");
    }

    #[test]
    fn first_report_of_a_side_wins() {
        let mut s = pending();
        fold(
            &mut s,
            vec![
                ok(Side::Payment),
                failed(Side::Payment, "late contradiction"),
            ],
        );
        assert_eq!(s.payment_status, Some(PaymentStatus::Approved));
        assert_eq!(s.payment_reason, "");
        assert_eq!(s.status, Status::Pending);
    }

    #[test]
    fn a_timed_out_order_records_results_but_is_not_decided_again() {
        let mut s = SagaState {
            status: Status::Cancelled,
            reason: "timed out waiting for payment and inventory".into(),
            ..pending()
        };
        let step = s.apply(ok(Side::Payment));
        assert!(step.changed && step.notify);
        assert_eq!(step.decided, None);
        assert_eq!(fold(&mut s, vec![ok(Side::Inventory)]), vec![]);
        assert_eq!(s.status, Status::Cancelled);
        assert_eq!(s.reason, "timed out waiting for payment and inventory");
    }

    #[test]
    fn compensation_marks_are_written_but_not_notified() {
        let mut s = pending();
        fold(
            &mut s,
            vec![ok(Side::Payment), failed(Side::Inventory, "out of stock")],
        );
        let step = s.apply(Report::Compensated(Side::Payment));
        assert_eq!(
            step,
            Step {
                changed: true,
                notify: false,
                decided: None
            }
        );
        assert_eq!(s.payment_status, Some(PaymentStatus::Refunded));
        // The reason of the result stays.
        assert_eq!(s.payment_reason, "");
        s.apply(Report::Compensated(Side::Inventory));
        assert_eq!(s.inventory_status, Some(InventoryStatus::Released));
        assert_eq!(s.inventory_reason, "out of stock");
    }

    #[test]
    fn a_result_after_a_compensation_mark_changes_nothing() {
        // Compensation marks count as the side's report (as the per-record
        // UPDATE left them), so a result arriving later is ignored.
        let mut s = SagaState {
            status: Status::Cancelled,
            ..pending()
        };
        s.apply(Report::Compensated(Side::Inventory));
        assert_eq!(s.apply(ok(Side::Inventory)), Step::default());
        assert_eq!(s.inventory_status, Some(InventoryStatus::Released));
    }
}
