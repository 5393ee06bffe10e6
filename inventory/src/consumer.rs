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
//!
//! A batch's run of `OrderCreated` is applied set-based
//! ([`OrderSide::created_all`]): two statements for the run instead of
//! about six per order, the stock rows of all its products locked once in
//! product order, each order decided in memory in event order against the
//! stock the orders before it left ([`Shelf`]), and each product's row
//! updated once with its net change. Updating a popular product's row once
//! per order made every later lookup in the transaction walk a growing
//! chain of row versions. A run of `OrderCancelled` is released the same
//! way ([`OrderSide::compensate_all`]): three statements for the run, each
//! product's row updated once. [`OrderSide::created`] and
//! [`OrderSide::compensate`] are the per-record paths the consume loop
//! falls back to when a batch fails; both must decide alike.

use std::collections::{BTreeMap, BTreeSet};

use common::{
    consumer::HandlerError,
    metrics,
    outbox::{self, OutboxEvent},
    saga::{CANCELLED_BEFORE_RESERVATION, CancelledOrder, NewOrder, OrderSide},
};
use shop_proto::{EventName, events};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    domain::{self, Decision, Line, Shelf, Status},
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

/// The order's lines, one per product in product order; lines that can
/// never apply make the order fail permanently.
fn merged_lines(order_id: Uuid, e: &events::OrderCreated) -> Result<Vec<Line>, HandlerError> {
    domain::merge_lines(e.items.iter().map(|l| (l.product_id.as_str(), l.quantity)))
        .map_err(|invalid| HandlerError::Permanent(format!("order {order_id}: {invalid}")))
}

/// A decision as stored: status and reason.
fn status_of(decision: &Decision) -> (Status, &str) {
    match decision {
        Decision::Reserve => (Status::Reserved, ""),
        Decision::Reject(reason) => (Status::Rejected, reason.as_str()),
    }
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
        let lines = merged_lines(order_id, &e)?;
        if store::reservation_exists(conn, order_id).await? {
            tracing::debug!(%order_id, "order already has a reservation; nothing to do");
            return Ok(());
        }
        let product_ids: Vec<&str> = lines.iter().map(|l| l.product_id.as_str()).collect();
        let available = store::lock_stock(conn, &product_ids).await?;
        let decision = domain::decide(&lines, &available);
        let (status, reason) = status_of(&decision);
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
        if decision == Decision::Reserve {
            let changed = store::take_stock(conn, &lines).await?;
            if usize::try_from(changed) != Ok(lines.len()) {
                // Cannot happen: every row was locked and found above.
                return Err(HandlerError::Permanent(format!(
                    "order {order_id}: reserved {changed} of {} stock rows",
                    lines.len()
                )));
            }
        } else {
            tracing::info!(%order_id, reason, "order rejected");
        }
        let out = self.updated(&e, &decision, &lines);
        outbox::enqueue(conn, &[out]).await?;
        Ok(())
    }

    /// The same as [`Reservations::created`] on each order in turn, in two
    /// statements for the whole run: lock the stock rows of the run's
    /// products once (in product order) and find the orders that have a
    /// reservation already ([`store::open_run`]), then, after deciding every
    /// other order in memory in event order ([`Shelf`]), write the
    /// reservations and their items, each product's net units and the
    /// results ([`store::write_run`]).
    async fn created_all(
        &self,
        conn: &mut PgConnection,
        orders: Vec<NewOrder<'_>>,
    ) -> Result<(), HandlerError> {
        let lines = orders
            .iter()
            .map(|o| merged_lines(o.order_id, &o.event))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<Uuid> = orders.iter().map(|o| o.order_id).collect();
        // Every order's products, also those of an order found reserved
        // already: the lock and the lookup are one statement.
        let products: BTreeSet<&str> = lines
            .iter()
            .flat_map(|lines| lines.iter().map(|l| l.product_id.as_str()))
            .collect();
        let products: Vec<&str> = products.into_iter().collect();
        let start = store::open_run(conn, &products, &ids).await?;
        // Orders decided before, and (by inserting) those decided in this
        // run: a second `OrderCreated` of one order changes nothing.
        let mut seen = start.reserved;
        let mut statements = 1;
        let todo: Vec<(&NewOrder<'_>, &[Line])> = orders
            .iter()
            .zip(&lines)
            .filter(|(order, _)| {
                let new = seen.insert(order.order_id);
                if !new {
                    order.meta.span.in_scope(|| {
                        tracing::debug!(order_id = %order.order_id, "order already has a reservation; nothing to do");
                    });
                }
                new
            })
            .map(|(order, lines)| (order, lines.as_slice()))
            .collect();
        if !todo.is_empty() {
            let mut stock = Shelf::new(start.available);
            let decided: Vec<(&NewOrder<'_>, &[Line], Decision)> = todo
                .into_iter()
                .map(|(order, lines)| (order, lines, stock.reserve(lines)))
                .collect();
            let new: Vec<NewReservation<'_>> = decided
                .iter()
                .map(|(order, lines, decision)| {
                    let (status, reason) = status_of(decision);
                    NewReservation {
                        order_id: order.order_id,
                        customer_id: &order.event.customer_id,
                        status,
                        reason,
                        lines,
                    }
                })
                .collect();
            let taken = stock.taken();
            let events: Vec<OutboxEvent> = decided
                .iter()
                .map(|(order, lines, decision)| {
                    if let Decision::Reject(reason) = decision {
                        order.meta.span.in_scope(|| {
                            tracing::info!(order_id = %order.order_id, reason, "order rejected");
                        });
                    }
                    self.updated(&order.event, decision, lines)
                        .caused_by(&order.meta.span)
                })
                .collect();
            let written = store::write_run(conn, &new, &taken, &events).await?;
            if usize::try_from(written.reservations) != Ok(new.len()) {
                // Another transaction recorded one of these orders while we
                // decided. Roll back; one record at a time sees its row.
                return Err(HandlerError::Permanent(format!(
                    "one of {} orders was reserved concurrently",
                    new.len()
                )));
            }
            if usize::try_from(written.stock_rows) != Ok(taken.len()) {
                // Cannot happen: every row was locked and found above.
                return Err(HandlerError::Permanent(format!(
                    "reserved {} of {} stock rows",
                    written.stock_rows,
                    taken.len()
                )));
            }
            // the reservations, items, stock and events at once
            statements += 1;
        }
        metrics::set_based_run(
            &orders[0].meta.topic,
            "inventory",
            events::OrderCreated::EVENT_TYPE,
            orders.len() as u64,
        );
        tracing::debug!(
            orders = orders.len(),
            statements,
            "applied a run of orders set-based"
        );
        Ok(())
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
        let out = self.released(e, &reservation.customer_id, &lines);
        outbox::enqueue(conn, &[out]).await?;
        Ok(true)
    }

    /// The same as [`Reservations::compensate`] on each cancellation in
    /// turn, in three statements for the whole run: lock the run's
    /// reservations and read the items of the RESERVED ones
    /// ([`store::open_releases`]), lock their stock rows in product order
    /// ([`store::lock_stock`]), release in memory in event order (a second
    /// cancellation of an order finds it released), then write each
    /// product's net units once, the reservations and the events
    /// ([`store::write_releases`]).
    async fn compensate_all(
        &self,
        conn: &mut PgConnection,
        orders: &[CancelledOrder<'_>],
    ) -> Result<Vec<bool>, HandlerError> {
        let mut held = store::open_releases(conn, &CancelledOrder::distinct_ids(orders)).await?;
        let products: BTreeSet<&str> = held
            .values()
            .flat_map(|h| h.lines.iter().map(|l| l.product_id.as_str()))
            .collect();
        let mut given: BTreeMap<String, i64> = BTreeMap::new();
        if !products.is_empty() {
            let products: Vec<&str> = products.into_iter().collect();
            let locked = store::lock_stock(conn, &products).await?;
            given = locked.into_keys().map(|p| (p, 0)).collect();
        }
        let mut found = Vec::with_capacity(orders.len());
        let mut released = Vec::new();
        let mut events = Vec::new();
        for order in orders {
            let order_id = order.order_id;
            let Some(h) = held.get_mut(&order_id) else {
                found.push(false);
                continue;
            };
            found.push(true);
            if h.reservation.status != Status::Reserved {
                continue; // rejected or released already: nothing to give back
            }
            for line in &h.lines {
                let units = given.get_mut(&line.product_id).ok_or_else(|| {
                    HandlerError::Permanent(format!(
                        "order {order_id}: product {} of its reservation has no stock row",
                        line.product_id
                    ))
                })?;
                *units += i64::from(line.quantity);
            }
            h.reservation.status = Status::Released;
            released.push((order_id, order.event.reason.as_str()));
            events.push(
                self.released(&order.event, &h.reservation.customer_id, &h.lines)
                    .caused_by(&order.meta.span),
            );
        }
        if !released.is_empty() {
            let given: Vec<(&str, i64)> = given
                .iter()
                .filter(|(_, units)| **units != 0)
                .map(|(p, units)| (p.as_str(), *units))
                .collect();
            let moved = store::write_releases(conn, &released, &given, &events).await?;
            if usize::try_from(moved) != Ok(given.len()) {
                // Cannot happen: every row was locked and found above.
                return Err(HandlerError::Permanent(format!(
                    "released {moved} of {} stock rows",
                    given.len()
                )));
            }
        }
        metrics::set_based_run(
            &orders[0].meta.topic,
            "inventory",
            events::OrderCancelled::EVENT_TYPE,
            orders.len() as u64,
        );
        Ok(found)
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
    /// The `InventoryUpdated` that publishes an order's decision.
    fn updated(
        &self,
        e: &events::OrderCreated,
        decision: &Decision,
        lines: &[Line],
    ) -> OutboxEvent {
        let (outcome, reason) = match decision {
            Decision::Reserve => (events::InventoryOutcome::Reserved, ""),
            Decision::Reject(reason) => (events::InventoryOutcome::Rejected, reason.as_str()),
        };
        let event_id = Uuid::now_v7();
        let event = events::InventoryUpdated {
            event_id: event_id.to_string(),
            occurred_at: Some(common::time::now()),
            order_id: e.order_id.clone(),
            customer_id: e.customer_id.clone(),
            outcome: outcome as i32,
            items: stock_lines(lines),
            reason: reason.to_owned(),
        };
        OutboxEvent::new(
            self.inventory_topic.clone(),
            &e.customer_id,
            event_id,
            &event,
        )
    }

    /// Enqueues `message` on the `inventory` topic, keyed by customer.
    /// The `InventoryReleased` that publishes a release, keyed by customer.
    fn released(
        &self,
        e: &events::OrderCancelled,
        customer_id: &str,
        lines: &[Line],
    ) -> OutboxEvent {
        let event_id = Uuid::now_v7();
        let event = events::InventoryReleased {
            event_id: event_id.to_string(),
            occurred_at: Some(common::time::now()),
            order_id: e.order_id.clone(),
            customer_id: customer_id.to_owned(),
            items: stock_lines(lines),
            reason: e.reason.clone(),
        };
        OutboxEvent::new(self.inventory_topic.clone(), customer_id, event_id, &event)
    }
}
