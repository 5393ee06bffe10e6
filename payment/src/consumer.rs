//! Payment's side of the saga, plugged into `common::consumer` through
//! `common::saga`: an `OrderCreated` is paid from the customer's credit or
//! declined, and an `OrderCancelled` refunds what was paid. Each result is
//! published on `payments` through the outbox, in the transaction that
//! decided it.
//!
//! Idempotent beyond the consume loop's event-id check: the payments table
//! holds one row per order, so a second `OrderCreated` for an order (or one
//! arriving after its cancellation) charges nothing, and a second
//! `OrderCancelled` finds the payment already refunded.
//!
//! A batch's run of `OrderCreated` is applied set-based
//! ([`OrderSide::created_all`]): two statements for the run instead of five
//! per order, the accounts locked once in customer order and each decision
//! taken in memory in event order against the credit the orders before it
//! left ([`Books`]). A run of `OrderCancelled` is refunded the same way
//! ([`OrderSide::compensate_all`]): two statements for the run.
//! [`OrderSide::created`] and [`OrderSide::compensate`] are the per-record
//! paths the consume loop falls back to when a batch fails; both must
//! decide alike.

use common::{
    consumer::HandlerError,
    metrics,
    outbox::{self, OutboxEvent},
    saga::{CANCELLED_BEFORE_PAYMENT, CancelledOrder, NewOrder, OrderSide},
};
use shop_proto::{EventName, common::Money, events};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    domain::{self, AccountDefaults, Books, Decision, Status},
    store::{self, NewPayment, PaymentRow},
};

/// Refund reason when the cancellation gave none.
const DEFAULT_CANCEL_REASON: &str = "order cancelled";

/// The order's total, which must be there, not negative, and in a
/// currency: order never publishes another, so it can never apply.
fn checked_total(order_id: Uuid, e: &events::OrderCreated) -> Result<&Money, HandlerError> {
    let total = e
        .total
        .as_ref()
        .ok_or_else(|| HandlerError::Permanent(format!("order {order_id} has no total")))?;
    if total.units < 0 {
        return Err(HandlerError::Permanent(format!(
            "order {order_id} has a negative total {}",
            domain::money_text(total.units, &total.currency)
        )));
    }
    if total.currency.is_empty() {
        return Err(HandlerError::Permanent(format!(
            "order {order_id} total has no currency"
        )));
    }
    Ok(total)
}

/// The refund reason: the cancellation's, or a default when it gave none.
fn refund_reason(e: &events::OrderCancelled) -> &str {
    if e.reason.is_empty() {
        DEFAULT_CANCEL_REASON
    } else {
        e.reason.as_str()
    }
}

/// A decision as stored: status and reason.
fn status_of(decision: &Decision) -> (Status, &str) {
    match decision {
        Decision::Approve => (Status::Approved, ""),
        Decision::Decline(reason) => (Status::Declined, reason.as_str()),
    }
}

/// Payment's side of the saga.
pub struct Payments {
    /// Full name of the `payments` topic, where results are published.
    pub payments_topic: String,
    /// What a customer's account starts with on their first order.
    pub defaults: AccountDefaults,
}

impl Payments {
    /// The `PaymentCompleted` that publishes a decision, keyed by customer.
    fn completed(
        &self,
        order_id: Uuid,
        customer_id: &str,
        decision: &Decision,
        total: &Money,
    ) -> OutboxEvent {
        let (outcome, reason) = match decision {
            Decision::Approve => (events::PaymentOutcome::Approved, ""),
            Decision::Decline(reason) => (events::PaymentOutcome::Declined, reason.as_str()),
        };
        let event_id = Uuid::now_v7();
        let event = events::PaymentCompleted {
            event_id: event_id.to_string(),
            occurred_at: Some(common::time::now()),
            order_id: order_id.to_string(),
            customer_id: customer_id.to_owned(),
            outcome: outcome as i32,
            amount: Some(total.clone()),
            reason: reason.to_owned(),
        };
        OutboxEvent::new(self.payments_topic.clone(), customer_id, event_id, &event)
    }

    /// The `PaymentRefunded` that publishes a refund, keyed by customer.
    fn refunded(&self, order_id: Uuid, payment: &PaymentRow, reason: &str) -> OutboxEvent {
        let event_id = Uuid::now_v7();
        let event = events::PaymentRefunded {
            event_id: event_id.to_string(),
            occurred_at: Some(common::time::now()),
            order_id: order_id.to_string(),
            customer_id: payment.customer_id.clone(),
            amount: Some(Money {
                currency: payment.currency.clone(),
                units: payment.amount,
            }),
            reason: reason.to_owned(),
        };
        OutboxEvent::new(
            self.payments_topic.clone(),
            &payment.customer_id,
            event_id,
            &event,
        )
    }
}

/// The credit in use after refunding `payment`, or why it cannot be.
fn released(
    order_id: Uuid,
    payment: &PaymentRow,
    used: i64,
    account_currency: &str,
) -> Result<i64, HandlerError> {
    domain::release(used, payment.amount).ok_or_else(|| {
        HandlerError::Permanent(format!(
            "refund of {} for order {order_id} exceeds the {} in use by {}",
            domain::money_text(payment.amount, &payment.currency),
            domain::money_text(used, account_currency),
            payment.customer_id
        ))
    })
}

/// The error of an approved payment whose account is gone.
fn no_account(order_id: Uuid, customer_id: &str) -> HandlerError {
    HandlerError::Permanent(format!(
        "order {order_id} was paid from account {customer_id}, which does not exist"
    ))
}

impl OrderSide for Payments {
    /// Decides the order's payment under the account's lock, records it,
    /// and publishes `PaymentCompleted`; does nothing if the order already
    /// has a payment row.
    async fn created(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        e: events::OrderCreated,
    ) -> Result<(), HandlerError> {
        let customer_id = e.customer_id.as_str();
        let total = checked_total(order_id, &e)?;

        store::ensure_account(conn, customer_id, &self.defaults).await?;
        // Accounts are never deleted, so the row just ensured is there.
        let credit = store::lock_account(conn, customer_id)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        let decision = domain::decide(&credit, total.units, &total.currency);
        let (status, reason) = status_of(&decision);
        // The insert comes before the credit changes: if the order already
        // has a row (a duplicate, or a cancellation that came first), it
        // writes nothing and neither does anything below.
        let inserted = store::insert_payment(
            conn,
            &NewPayment {
                order_id,
                customer_id,
                currency: &total.currency,
                amount: total.units,
                status,
                reason,
            },
        )
        .await?;
        if !inserted {
            tracing::debug!(%order_id, "order already has a payment; nothing to do");
            return Ok(());
        }
        if decision == Decision::Approve {
            // `decide` checked that this neither overflows nor passes the limit.
            store::set_used(conn, customer_id, credit.used + total.units).await?;
        }
        tracing::debug!(%order_id, customer_id, status = status.as_str(), reason, "payment decided");
        let out = self.completed(order_id, customer_id, &decision, total);
        outbox::enqueue(conn, &[out]).await?;
        Ok(())
    }

    /// The same as [`Payments::created`] on each order in turn, in two
    /// statements for the whole run: create the missing accounts, lock the
    /// run's accounts (in customer order) and find the orders that have a
    /// payment row already ([`store::open_run`]), then, after deciding
    /// every order in memory in event order ([`Books`]), write the
    /// payments, each changed account once and the results
    /// ([`store::write_run`]).
    async fn created_all(
        &self,
        conn: &mut PgConnection,
        orders: Vec<NewOrder<'_>>,
    ) -> Result<(), HandlerError> {
        let totals = orders
            .iter()
            .map(|o| checked_total(o.order_id, &o.event))
            .collect::<Result<Vec<_>, _>>()?;
        let mut customers: Vec<&str> = orders
            .iter()
            .map(|o| o.event.customer_id.as_str())
            .collect();
        customers.sort_unstable();
        customers.dedup();
        let ids: Vec<Uuid> = orders.iter().map(|o| o.order_id).collect();
        let start = store::open_run(conn, &customers, &ids, &self.defaults).await?;
        let mut books = Books::new(start.accounts);
        // Orders decided before, and (by inserting) those decided in this
        // run: a second `OrderCreated` of one order changes nothing.
        let mut seen = start.paid;
        let mut statements = 1;

        let mut decided = Vec::with_capacity(orders.len());
        for (order, total) in orders.iter().zip(totals) {
            let customer_id = order.event.customer_id.as_str();
            if !seen.insert(order.order_id) {
                order.meta.span.in_scope(|| {
                    tracing::debug!(order_id = %order.order_id, "order already has a payment; nothing to do");
                });
                continue;
            }
            // Every account of the run was ensured and locked above, unless
            // another transaction created it meanwhile (`open_run`): the
            // batch fails, and its replay one record at a time sees it.
            let decision = books
                .pay(customer_id, total.units, &total.currency)
                .ok_or(sqlx::Error::RowNotFound)?;
            decided.push((order, total, decision));
        }
        if !decided.is_empty() {
            let payments: Vec<NewPayment<'_>> = decided
                .iter()
                .map(|(order, total, decision)| {
                    let (status, reason) = status_of(decision);
                    NewPayment {
                        order_id: order.order_id,
                        customer_id: &order.event.customer_id,
                        currency: &total.currency,
                        amount: total.units,
                        status,
                        reason,
                    }
                })
                .collect();
            let events: Vec<OutboxEvent> = decided
                .iter()
                .map(|(order, total, decision)| {
                    let customer_id = order.event.customer_id.as_str();
                    order.meta.span.in_scope(|| {
                        let (status, reason) = status_of(decision);
                        tracing::debug!(order_id = %order.order_id, customer_id, status = status.as_str(), reason, "payment decided");
                    });
                    self.completed(order.order_id, customer_id, decision, total)
                        .caused_by(&order.meta.span)
                })
                .collect();
            let inserted = store::write_run(conn, &payments, &books.changed(), &events).await?;
            statements += 1;
            if usize::try_from(inserted) != Ok(payments.len()) {
                // Another transaction recorded one of these orders while we
                // decided: the decisions after it may rest on credit it did
                // not take. Roll back; one record at a time sees its row.
                return Err(HandlerError::Permanent(format!(
                    "{} of {} orders were paid concurrently",
                    payments.len() as u64 - inserted,
                    payments.len()
                )));
            }
        }
        let topic = &orders[0].meta.topic;
        metrics::set_based_run(
            topic,
            "payment",
            events::OrderCreated::EVENT_TYPE,
            orders.len() as u64,
        );
        tracing::debug!(
            orders = orders.len(),
            decided = decided.len(),
            statements,
            "applied a run of orders set-based"
        );
        Ok(())
    }

    /// Refunds an approved payment, restoring the credit, and publishes
    /// `PaymentRefunded`. Declined and refunded payments change nothing.
    async fn compensate(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        e: &events::OrderCancelled,
    ) -> Result<bool, HandlerError> {
        let Some(payment) = store::lock_payment(conn, order_id).await? else {
            return Ok(false);
        };
        match payment.status {
            Status::Approved => {}
            Status::Declined | Status::Refunded => return Ok(true),
        }

        let customer_id = payment.customer_id.as_str();
        let credit = store::lock_account(conn, customer_id)
            .await?
            .ok_or_else(|| no_account(order_id, customer_id))?;
        let used = released(order_id, &payment, credit.used, &credit.currency)?;
        let reason = refund_reason(e);
        store::set_used(conn, customer_id, used).await?;
        store::mark_refunded(conn, order_id, reason).await?;
        tracing::debug!(%order_id, customer_id, reason, "payment refunded");
        let out = self.refunded(order_id, &payment, reason);
        outbox::enqueue(conn, &[out]).await?;
        Ok(true)
    }

    /// The same as [`Payments::compensate`] on each cancellation in turn,
    /// in two statements for the whole run: lock the run's payments and
    /// the accounts of the approved ones ([`store::open_refunds`]), refund
    /// in memory in event order (a second cancellation of an order finds it
    /// refunded), then write the refunds, each changed account once and the
    /// events ([`store::write_refunds`]).
    async fn compensate_all(
        &self,
        conn: &mut PgConnection,
        orders: &[CancelledOrder<'_>],
    ) -> Result<Vec<bool>, HandlerError> {
        let mut start = store::open_refunds(conn, &CancelledOrder::distinct_ids(orders)).await?;
        let mut found = Vec::with_capacity(orders.len());
        let mut refunds = Vec::new();
        let mut events = Vec::new();
        for order in orders {
            let order_id = order.order_id;
            let Some(payment) = start.payments.get_mut(&order_id) else {
                found.push(false);
                continue;
            };
            found.push(true);
            if payment.status != Status::Approved {
                continue; // declined or refunded already: nothing to give back
            }
            let customer_id = payment.customer_id.as_str();
            let (currency, used) = start
                .accounts
                .get_mut(customer_id)
                .ok_or_else(|| no_account(order_id, customer_id))?;
            *used = released(order_id, payment, *used, currency)?;
            payment.status = Status::Refunded;
            let reason = refund_reason(&order.event);
            order.meta.span.in_scope(|| {
                tracing::debug!(%order_id, customer_id, reason, "payment refunded");
            });
            refunds.push((order_id, reason));
            events.push(
                self.refunded(order_id, payment, reason)
                    .caused_by(&order.meta.span),
            );
        }
        if !refunds.is_empty() {
            // `open_refunds` locked only the accounts of approved payments,
            // and every one of those was refunded above: each changed.
            let used: Vec<(&str, i64)> = start
                .accounts
                .iter()
                .map(|(customer_id, (_, used))| (customer_id.as_str(), *used))
                .collect();
            store::write_refunds(conn, &refunds, &used, &events).await?;
        }
        metrics::set_based_run(
            &orders[0].meta.topic,
            "payment",
            events::OrderCancelled::EVENT_TYPE,
            orders.len() as u64,
        );
        Ok(found)
    }

    /// A DECLINED row for nothing: the late `OrderCreated` is not charged.
    async fn mark_cancelled_first(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        customer_id: &str,
    ) -> sqlx::Result<bool> {
        store::insert_payment(
            conn,
            &NewPayment {
                order_id,
                customer_id,
                currency: &self.defaults.currency,
                amount: 0,
                status: Status::Declined,
                reason: CANCELLED_BEFORE_PAYMENT,
            },
        )
        .await
    }
}
