//! The order's side of the saga, plugged into `common::consumer`: results
//! from payment and inventory decide its status. Cancelling publishes
//! `OrderCancelled`, on which payment refunds and inventory releases
//! whatever they did for the order; [`crate::deadline`] cancels the orders
//! whose results never came.
//!
//! [`crate::saga_batch`] applies the events with the rules of
//! [`crate::saga`]: a whole batch in a few set-based statements
//! (`EventHandler::apply_all`), and, when a batch fails and the consume loop
//! replays it one record per transaction (`EventHandler::apply`), each
//! record as a batch of one, which isolates a bad record (an unknown order,
//! an invalid outcome) so that it alone is dead-lettered.

use common::{
    consumer::{DecodeError, EventHandler, EventMeta, HandlerError, decode_as},
    outbox::{self, OutboxEvent},
};
use shop_proto::{EventName, events};
use sqlx::PgConnection;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    backlog::Backlog,
    domain::Outcome,
    saga::{Report, SagaState, Side},
    saga_batch::Path,
};

/// Events applied, by path: `set` ([`crate::saga_batch`]) or `record` (the
/// per-record replay of a batch that failed). Counted on commit.
pub const SAGA_EVENTS: &str = "shop_order_saga_events_total";
/// Batches the set-based path applied. Counted on commit; with
/// [`SAGA_EVENTS`] it gives the mean batch size.
pub const SAGA_BATCHES: &str = "shop_order_saga_batches_total";

/// Makes the saga counters show (at 0) before the first event.
pub fn register_metrics() {
    metrics::describe_counter!(
        SAGA_EVENTS,
        "Saga events order applied, by path (set, record)."
    );
    metrics::describe_counter!(SAGA_BATCHES, "Batches order applied set-based.");
    for path in ["set", "record"] {
        metrics::counter!(SAGA_EVENTS, "path" => path).increment(0);
    }
    metrics::counter!(SAGA_BATCHES).increment(0);
}

/// Counts events applied by `path` when the consume loop's transaction
/// commits.
pub(crate) fn count_applied(path: &'static str, events: usize) {
    common::metrics::count_on_commit(
        SAGA_EVENTS,
        vec![metrics::Label::new("path", path)],
        events as u64,
    );
}

/// The events order acts on, from topics `payments` and `inventory`.
#[derive(Clone, Debug)]
pub enum SagaEvent {
    Payment(events::PaymentCompleted),
    PaymentRefunded(events::PaymentRefunded),
    Inventory(events::InventoryUpdated),
    InventoryReleased(events::InventoryReleased),
}

impl SagaEvent {
    /// The order it concerns (as carried, not yet parsed) and what it
    /// reports; an outcome outside the contract can never apply.
    pub(crate) fn into_report(self) -> Result<(String, Report), HandlerError> {
        Ok(match self {
            SagaEvent::Payment(e) => {
                let outcome = match events::PaymentOutcome::try_from(e.outcome) {
                    Ok(events::PaymentOutcome::Approved) => Outcome::Ok,
                    Ok(events::PaymentOutcome::Declined) => Outcome::Failed(e.reason),
                    _ => {
                        return Err(HandlerError::Permanent(format!(
                            "payment outcome {} is not valid",
                            e.outcome
                        )));
                    }
                };
                (e.order_id, Report::Result(Side::Payment, outcome))
            }
            SagaEvent::Inventory(e) => {
                let outcome = match events::InventoryOutcome::try_from(e.outcome) {
                    Ok(events::InventoryOutcome::Reserved) => Outcome::Ok,
                    Ok(events::InventoryOutcome::Rejected) => Outcome::Failed(e.reason),
                    _ => {
                        return Err(HandlerError::Permanent(format!(
                            "inventory outcome {} is not valid",
                            e.outcome
                        )));
                    }
                };
                (e.order_id, Report::Result(Side::Inventory, outcome))
            }
            SagaEvent::PaymentRefunded(e) => (e.order_id, Report::Compensated(Side::Payment)),
            SagaEvent::InventoryReleased(e) => (e.order_id, Report::Compensated(Side::Inventory)),
        })
    }
}

/// Plugs the saga into `common::consumer`.
pub struct SagaHandler {
    /// Full name of the `orders` topic, where decisions are published.
    pub orders_topic: String,
    /// Told of the orders decided once their transaction commits, so that
    /// intake admits as many new ones without waiting for the next count.
    pub backlog: Backlog,
}

impl SagaHandler {
    fn decided(&self, n: u64) {
        if n > 0 {
            let backlog = self.backlog.clone();
            common::metrics::after_commit(move || backlog.decided(n));
        }
    }
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

    /// The per-record path: the replay of a batch that failed, one record
    /// per transaction, through the same code as a batch.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        meta: &EventMeta,
        event: SagaEvent,
    ) -> Result<(), HandlerError> {
        let decided =
            crate::saga_batch::apply(conn, &self.orders_topic, vec![(meta, event)], Path::Record)
                .await?;
        self.decided(decided);
        Ok(())
    }

    /// The set-based path ([`crate::saga_batch`]).
    async fn apply_all(
        &self,
        conn: &mut PgConnection,
        events: Vec<(&EventMeta, SagaEvent)>,
    ) -> Result<(), HandlerError> {
        // A root span: the batch serves many traces; each record's own hop
        // is its `order status update` span.
        let span = tracing::info_span!(parent: None, "saga batch", events = events.len());
        let decided = crate::saga_batch::apply(conn, &self.orders_topic, events, Path::Set)
            .instrument(span)
            .await?;
        self.decided(decided);
        Ok(())
    }
}

/// The `orders` row the saga locks: whom to key events by, and its state.
#[derive(sqlx::FromRow)]
pub(crate) struct LockedRow {
    pub order_id: Uuid,
    pub customer_id: String,
    #[sqlx(flatten)]
    pub state: SagaState,
}

/// The columns of [`LockedRow`], for the statements that lock it (a macro,
/// so that they stay `&'static str` with `concat!`).
macro_rules! locked_columns {
    () => {
        "order_id, customer_id, status, reason, payment_status, payment_reason, \
         inventory_status, inventory_reason"
    };
}
pub(crate) use locked_columns;

/// The `OrderConfirmed` event of an order, keyed by its customer.
pub(crate) fn confirmed_event(
    orders_topic: &str,
    order_id: Uuid,
    customer_id: &str,
) -> OutboxEvent {
    let event_id = Uuid::now_v7();
    let event = events::OrderConfirmed {
        event_id: event_id.to_string(),
        occurred_at: Some(common::time::now()),
        order_id: order_id.to_string(),
        customer_id: customer_id.to_owned(),
    };
    OutboxEvent::new(orders_topic.to_owned(), customer_id, event_id, &event)
}

/// The `OrderCancelled` event of an order, keyed by its customer.
pub(crate) fn cancelled_event(
    orders_topic: &str,
    order_id: Uuid,
    customer_id: &str,
    reason: &str,
) -> OutboxEvent {
    let event_id = Uuid::now_v7();
    let event = events::OrderCancelled {
        event_id: event_id.to_string(),
        occurred_at: Some(common::time::now()),
        order_id: order_id.to_string(),
        customer_id: customer_id.to_owned(),
        reason: reason.to_owned(),
    };
    OutboxEvent::new(orders_topic.to_owned(), customer_id, event_id, &event)
}

/// Cancels orders and enqueues their `OrderCancelled` events (the deadline
/// sweeper's way; the saga cancels through its fold).
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
        .map(|(id, customer_id, reason)| cancelled_event(orders_topic, *id, customer_id, reason))
        .collect();
    outbox::enqueue(conn, &events).await
}
