//! Inventory's side of the saga, plugged into `common::consumer` through
//! `common::saga`: `OrderCreated` reserves an order's stock
//! (all lines or none) and `OrderCancelled` gives a reservation back. Both
//! run in the consume loop's transaction and publish their result on the
//! `inventory` topic through the outbox.
//!
//! The consume loop already drops redelivered event ids; these handlers are
//! also idempotent per order (the `reservations` primary key), so a second
//! `OrderCreated` or `OrderCancelled` for the same order, under a new event
//! id, changes nothing.
//!
//! Stock never goes negative, also with several inventory instances taking
//! orders for the same product at once: the stock rows are locked (`FOR
//! UPDATE`, in product order) before the decision, and the `CHECK
//! (available >= 0)` constraint backs that up.

use common::{
    consumer::HandlerError,
    outbox::{self, OutboxEvent},
    saga::{CANCELLED_BEFORE_RESERVATION, OrderSide},
};
use shop_proto::{EventName, events};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    domain::{self, Decision, Line, Status},
    store::{self, NewReservation},
};

/// Inventory's side of the saga.
pub struct Reservations {
    /// Full name of the `inventory` topic, where results are published.
    pub inventory_topic: String,
}

fn stock_lines(lines: &[Line]) -> Vec<events::StockLine> {
    lines
        .iter()
        .map(|l| events::StockLine {
            product_id: l.product_id.clone(),
            quantity: l.quantity,
        })
        .collect()
}

impl OrderSide for Reservations {
    /// Reserves every line of a new order, or rejects it with the reason,
    /// and publishes `InventoryUpdated` either way. An order that already
    /// has a reservation (or was cancelled first) changes nothing.
    async fn created(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        e: events::OrderCreated,
    ) -> Result<(), HandlerError> {
        let lines =
            domain::merge_lines(e.items.iter().map(|l| (l.product_id.as_str(), l.quantity)))
                .map_err(|invalid| {
                    HandlerError::Permanent(format!("order {order_id}: {invalid}"))
                })?;
        if store::reservation_exists(conn, order_id).await? {
            tracing::debug!(%order_id, "order already has a reservation; nothing to do");
            return Ok(());
        }
        let product_ids: Vec<&str> = lines.iter().map(|l| l.product_id.as_str()).collect();
        let available = store::lock_stock(conn, &product_ids).await?;
        let decision = domain::decide(&lines, &available);
        let (status, reason) = match &decision {
            Decision::Reserve => (Status::Reserved, ""),
            Decision::Reject(reason) => (Status::Rejected, reason.as_str()),
        };
        let inserted = store::insert_reservation(
            conn,
            NewReservation {
                order_id,
                customer_id: &e.customer_id,
                status,
                reason,
                lines: &lines,
            },
        )
        .await?;
        if !inserted {
            // A concurrent delivery of this order decided (and committed)
            // while we waited; its decision stands.
            tracing::debug!(%order_id, "order reserved concurrently; nothing to do");
            return Ok(());
        }
        let outcome = match decision {
            Decision::Reserve => {
                let changed = store::take_stock(conn, &lines).await?;
                if usize::try_from(changed) != Ok(lines.len()) {
                    // Cannot happen: every row was locked and found above.
                    return Err(HandlerError::Permanent(format!(
                        "order {order_id}: reserved {changed} of {} stock rows",
                        lines.len()
                    )));
                }
                events::InventoryOutcome::Reserved
            }
            Decision::Reject(_) => {
                tracing::info!(%order_id, reason, "order rejected");
                events::InventoryOutcome::Rejected
            }
        };
        let event_id = Uuid::now_v7();
        let event = events::InventoryUpdated {
            event_id: event_id.to_string(),
            occurred_at: Some(common::time::now()),
            order_id: e.order_id.clone(),
            customer_id: e.customer_id.clone(),
            outcome: outcome as i32,
            items: stock_lines(&lines),
            reason: reason.to_owned(),
        };
        self.publish(conn, &e.customer_id, event_id, &event).await
    }

    /// Gives a RESERVED order's stock back and publishes
    /// `InventoryReleased`. REJECTED and RELEASED orders change nothing.
    async fn compensate(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        e: &events::OrderCancelled,
    ) -> Result<bool, HandlerError> {
        let Some(reservation) = store::lock_reservation(conn, order_id).await? else {
            return Ok(false);
        };
        match reservation.status {
            Status::Reserved => {}
            Status::Rejected | Status::Released => return Ok(true),
        }
        let lines = store::reservation_items(conn, order_id).await?;
        let product_ids: Vec<&str> = lines.iter().map(|l| l.product_id.as_str()).collect();
        // Same lock order as reserving, so the two never deadlock.
        store::lock_stock(conn, &product_ids).await?;
        let changed = store::give_back_stock(conn, &lines).await?;
        if usize::try_from(changed) != Ok(lines.len()) {
            return Err(HandlerError::Permanent(format!(
                "order {order_id}: released {changed} of {} stock rows",
                lines.len()
            )));
        }
        store::mark_released(conn, order_id, &e.reason).await?;
        let event_id = Uuid::now_v7();
        let event = events::InventoryReleased {
            event_id: event_id.to_string(),
            occurred_at: Some(common::time::now()),
            order_id: e.order_id.clone(),
            customer_id: reservation.customer_id.clone(),
            items: stock_lines(&lines),
            reason: e.reason.clone(),
        };
        self.publish(conn, &reservation.customer_id, event_id, &event)
            .await?;
        Ok(true)
    }

    /// A REJECTED reservation of nothing: the late `OrderCreated` reserves
    /// nothing.
    async fn mark_cancelled_first(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        customer_id: &str,
    ) -> sqlx::Result<bool> {
        store::insert_reservation(
            conn,
            NewReservation {
                order_id,
                customer_id,
                status: Status::Rejected,
                reason: CANCELLED_BEFORE_RESERVATION,
                lines: &[],
            },
        )
        .await
    }
}

impl Reservations {
    /// Enqueues `message` on the `inventory` topic, keyed by customer.
    async fn publish<M: prost::Message + EventName>(
        &self,
        conn: &mut PgConnection,
        customer_id: &str,
        event_id: Uuid,
        message: &M,
    ) -> Result<(), HandlerError> {
        let out = OutboxEvent::new(self.inventory_topic.clone(), customer_id, event_id, message);
        outbox::enqueue(conn, &[out]).await?;
        Ok(())
    }
}
