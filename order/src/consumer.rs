//! The order's side of the saga, plugged into `common::consumer`: results
//! from payment and inventory decide its status. Cancelling publishes
//! `OrderCancelled`, on which payment refunds and inventory releases
//! whatever they did for the order; [`crate::deadline`] cancels the orders
//! whose results never came.

use common::{
    consumer::{DecodeError, EventHandler, EventMeta, HandlerError, decode_as, parse_id},
    outbox::{self, OutboxEvent},
};
use shop_proto::{EventName, events};
use sqlx::PgConnection;
use tracing::Instrument;
use uuid::Uuid;

use crate::domain::{Decision, InventoryStatus, Outcome, PaymentStatus, Status, decide};

/// The events order acts on, from topics `payments` and `inventory`.
#[derive(Clone, Debug)]
pub enum SagaEvent {
    Payment(events::PaymentCompleted),
    PaymentRefunded(events::PaymentRefunded),
    Inventory(events::InventoryUpdated),
    InventoryReleased(events::InventoryReleased),
}

/// Plugs the saga into `common::consumer`.
pub struct SagaHandler {
    /// Full name of the `orders` topic, where decisions are published.
    pub orders_topic: String,
}

impl EventHandler for SagaHandler {
    type Event = SagaEvent;

    fn decode(&self, event_type: &str, payload: &[u8]) -> Result<Option<SagaEvent>, DecodeError> {
        Ok(Some(match event_type {
            events::PaymentCompleted::EVENT_TYPE => {
                SagaEvent::Payment(decode_as(event_type, payload)?)
            }
            events::PaymentRefunded::EVENT_TYPE => {
                SagaEvent::PaymentRefunded(decode_as(event_type, payload)?)
            }
            events::InventoryUpdated::EVENT_TYPE => {
                SagaEvent::Inventory(decode_as(event_type, payload)?)
            }
            events::InventoryReleased::EVENT_TYPE => {
                SagaEvent::InventoryReleased(decode_as(event_type, payload)?)
            }
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        }))
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        meta: &EventMeta,
        event: SagaEvent,
    ) -> Result<(), HandlerError> {
        let order_id = match &event {
            SagaEvent::Payment(e) => &e.order_id,
            SagaEvent::PaymentRefunded(e) => &e.order_id,
            SagaEvent::Inventory(e) => &e.order_id,
            SagaEvent::InventoryReleased(e) => &e.order_id,
        };
        meta.span.record("order_id", order_id.as_str());
        match event {
            SagaEvent::Payment(e) => {
                let outcome = match events::PaymentOutcome::try_from(e.outcome) {
                    Ok(events::PaymentOutcome::Approved) => Outcome::Ok,
                    Ok(events::PaymentOutcome::Declined) => Outcome::Failed(e.reason),
                    _ => return Err(HandlerError::Permanent(format!("payment outcome {} is not valid", e.outcome))),
                };
                self.record(conn, &e.order_id, Side::Payment, outcome).await
            }
            SagaEvent::Inventory(e) => {
                let outcome = match events::InventoryOutcome::try_from(e.outcome) {
                    Ok(events::InventoryOutcome::Reserved) => Outcome::Ok,
                    Ok(events::InventoryOutcome::Rejected) => Outcome::Failed(e.reason),
                    _ => return Err(HandlerError::Permanent(format!("inventory outcome {} is not valid", e.outcome))),
                };
                self.record(conn, &e.order_id, Side::Inventory, outcome).await
            }
            SagaEvent::PaymentRefunded(e) => {
                mark_compensated(
                    conn,
                    &e.order_id,
                    "UPDATE orders SET payment_status = 'REFUNDED', updated_at = now() WHERE order_id = $1",
                ).await
            }
            SagaEvent::InventoryReleased(e) => {
                mark_compensated(
                    conn,
                    &e.order_id,
                    "UPDATE orders SET inventory_status = 'RELEASED', updated_at = now() WHERE order_id = $1",
                ).await
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Side {
    Payment,
    Inventory,
}

/// What the saga needs of an `orders` row.
#[derive(sqlx::FromRow)]
struct SagaRow {
    customer_id: String,
    status: Status,
    payment_status: Option<PaymentStatus>,
    payment_reason: String,
    inventory_status: Option<InventoryStatus>,
    inventory_reason: String,
}

impl SagaRow {
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

impl SagaHandler {
    /// Records one side's result (the first report wins) and, if the order
    /// is still PENDING, applies the decision that follows.
    async fn record(
        &self,
        conn: &mut PgConnection,
        order_id: &str,
        side: Side,
        outcome: Outcome,
    ) -> Result<(), HandlerError> {
        let span = tracing::info_span!("order status update", order_id, side = ?side);
        self.record_in_span(conn, order_id, side, outcome)
            .instrument(span)
            .await
    }

    async fn record_in_span(
        &self,
        conn: &mut PgConnection,
        order_id: &str,
        side: Side,
        outcome: Outcome,
    ) -> Result<(), HandlerError> {
        let id = parse_id("order id", order_id)?;
        let row: Option<SagaRow> = sqlx::query_as(
            "SELECT customer_id, status, payment_status, payment_reason, inventory_status, inventory_reason
             FROM orders WHERE order_id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(mut row) = row else {
            return Err(HandlerError::Permanent(format!("unknown order {order_id}")));
        };
        let (ok, reason) = match outcome {
            Outcome::Ok => (true, String::new()),
            Outcome::Failed(r) => (false, r),
        };
        // The first report of a side wins; another event for the same
        // result changes nothing.
        match side {
            Side::Payment if row.payment_status.is_some() => return Ok(()),
            Side::Inventory if row.inventory_status.is_some() => return Ok(()),
            Side::Payment => {
                row.payment_status = Some(if ok {
                    PaymentStatus::Approved
                } else {
                    PaymentStatus::Declined
                });
                row.payment_reason = reason;
            }
            Side::Inventory => {
                row.inventory_status = Some(if ok {
                    InventoryStatus::Reserved
                } else {
                    InventoryStatus::Rejected
                });
                row.inventory_reason = reason;
            }
        }
        // Both sides from the locked row: the side not reported keeps its
        // value.
        sqlx::query(
            "UPDATE orders SET payment_status = $2, payment_reason = $3,
                               inventory_status = $4, inventory_reason = $5, updated_at = now()
             WHERE order_id = $1",
        )
        .bind(id)
        .bind(row.payment_status)
        .bind(&row.payment_reason)
        .bind(row.inventory_status)
        .bind(&row.inventory_reason)
        .execute(&mut *conn)
        .await?;
        // Recording a result moves `updated_at`, which watchers see.
        crate::store::notify_changed(conn, &[id]).await?;
        if row.status != Status::Pending {
            return Ok(()); // decided already (timed out); compensation is under way
        }
        let decision = decide(row.payment().as_ref(), row.inventory().as_ref());
        let customer_id = row.customer_id;
        match decision {
            Decision::Wait => Ok(()),
            Decision::Confirm => {
                sqlx::query("UPDATE orders SET status = 'CONFIRMED', updated_at = now() WHERE order_id = $1")
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                let event_id = Uuid::now_v7();
                let event = events::OrderConfirmed {
                    event_id: event_id.to_string(),
                    occurred_at: Some(common::time::now()),
                    order_id: order_id.to_owned(),
                    customer_id: customer_id.clone(),
                };
                let out =
                    OutboxEvent::new(self.orders_topic.clone(), &customer_id, event_id, &event);
                outbox::enqueue(conn, &[out]).await?;
                // Counted when the consume loop's transaction commits.
                common::metrics::orders_decided("CONFIRMED", 1);
                Ok(())
            }
            Decision::Cancel(reason) => {
                cancel(conn, &self.orders_topic, &[(id, customer_id, reason)]).await?;
                common::metrics::orders_decided("CANCELLED", 1);
                Ok(())
            }
        }
    }
}

async fn mark_compensated(
    conn: &mut PgConnection,
    order_id: &str,
    update: &'static str,
) -> Result<(), HandlerError> {
    let id = parse_id("order id", order_id)?;
    let done = sqlx::query(update).bind(id).execute(conn).await?;
    if done.rows_affected() == 0 {
        return Err(HandlerError::Permanent(format!("unknown order {order_id}")));
    }
    Ok(())
}

/// Cancels orders and enqueues their `OrderCancelled` events.
pub(crate) async fn cancel(
    conn: &mut PgConnection,
    orders_topic: &str,
    orders: &[(Uuid, String, String)],
) -> sqlx::Result<()> {
    let ids: Vec<Uuid> = orders.iter().map(|o| o.0).collect();
    let reasons: Vec<&str> = orders.iter().map(|o| o.2.as_str()).collect();
    sqlx::query(
        "UPDATE orders o SET status = 'CANCELLED', reason = c.reason, updated_at = now()
         FROM UNNEST($1::uuid[], $2::text[]) AS c(order_id, reason)
         WHERE o.order_id = c.order_id",
    )
    .bind(&ids)
    .bind(&reasons)
    .execute(&mut *conn)
    .await?;
    crate::store::notify_changed(conn, &ids).await?;
    let events: Vec<OutboxEvent> = orders
        .iter()
        .map(|(id, customer_id, reason)| {
            let event_id = Uuid::now_v7();
            let event = events::OrderCancelled {
                event_id: event_id.to_string(),
                occurred_at: Some(common::time::now()),
                order_id: id.to_string(),
                customer_id: customer_id.clone(),
                reason: reason.clone(),
            };
            OutboxEvent::new(orders_topic.to_owned(), customer_id, event_id, &event)
        })
        .collect();
    outbox::enqueue(conn, &events).await
}
