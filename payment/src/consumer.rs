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

use common::{
    consumer::HandlerError,
    outbox::{self, OutboxEvent},
    saga::{CANCELLED_BEFORE_PAYMENT, OrderSide},
};
use shop_proto::{common::Money, events};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    domain::{self, AccountDefaults, Decision, Status},
    store::{self, NewPayment},
};

/// Refund reason when the cancellation gave none.
const DEFAULT_CANCEL_REASON: &str = "order cancelled";

/// Payment's side of the saga.
pub struct Payments {
    /// Full name of the `payments` topic, where results are published.
    pub payments_topic: String,
    /// What a customer's account starts with on their first order.
    pub defaults: AccountDefaults,
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

        store::ensure_account(conn, customer_id, &self.defaults).await?;
        // Accounts are never deleted, so the row just ensured is there.
        let credit = store::lock_account(conn, customer_id)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        let decision = domain::decide(&credit, total.units, &total.currency);
        let (status, reason) = match &decision {
            Decision::Approve => (Status::Approved, ""),
            Decision::Decline(reason) => (Status::Declined, reason.as_str()),
        };
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

        let outcome = match decision {
            Decision::Approve => events::PaymentOutcome::Approved,
            Decision::Decline(_) => events::PaymentOutcome::Declined,
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
        let out = OutboxEvent::new(self.payments_topic.clone(), customer_id, event_id, &event);
        outbox::enqueue(conn, &[out]).await?;
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
            .ok_or_else(|| {
                HandlerError::Permanent(format!(
                    "order {order_id} was paid from account {customer_id}, which does not exist"
                ))
            })?;
        let used = domain::release(credit.used, payment.amount).ok_or_else(|| {
            HandlerError::Permanent(format!(
                "refund of {} for order {order_id} exceeds the {} in use by {customer_id}",
                domain::money_text(payment.amount, &payment.currency),
                domain::money_text(credit.used, &credit.currency)
            ))
        })?;
        let reason = if e.reason.is_empty() {
            DEFAULT_CANCEL_REASON
        } else {
            e.reason.as_str()
        };
        store::set_used(conn, customer_id, used).await?;
        store::mark_refunded(conn, order_id, reason).await?;
        tracing::debug!(%order_id, customer_id, reason, "payment refunded");

        let event_id = Uuid::now_v7();
        let event = events::PaymentRefunded {
            event_id: event_id.to_string(),
            occurred_at: Some(common::time::now()),
            order_id: order_id.to_string(),
            customer_id: customer_id.to_owned(),
            amount: Some(Money {
                currency: payment.currency.clone(),
                units: payment.amount,
            }),
            reason: reason.to_owned(),
        };
        let out = OutboxEvent::new(self.payments_topic.clone(), customer_id, event_id, &event);
        outbox::enqueue(conn, &[out]).await?;
        Ok(true)
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
