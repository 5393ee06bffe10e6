//! What payment and inventory share as the two sides of the order saga.
//!
//! Both consume `orders`: an `OrderCreated` makes them act (pay or decline,
//! reserve or reject), an `OrderCancelled` makes them undo what they did
//! (refund, release). A side plugs in those two steps as an [`OrderSide`];
//! [`OrderSideHandler`] turns it into the consume loop's handler and holds
//! the one rule they share: a cancellation that overtakes its order's
//! creation leaves a marker record, so that the late creation does nothing.
//! The markers' reasons are defined here, and the invariant checker reads
//! the same constants.
//!
//! A consumer batch reaches a side in runs: [`OrderSideHandler`] splits the
//! batch's new events into maximal runs of consecutive `OrderCreated` and
//! of consecutive `OrderCancelled`, handed at once to
//! [`OrderSide::created_all`] and [`OrderSide::compensate_all`] (which
//! payment and inventory apply in a few set-based statements, whatever the
//! run's length). Runs are applied in the batch's order, so an order's
//! cancellation sees its creation applied (or not yet) exactly as it would
//! one event at a time. Cancellations come in bulk when they come: a product
//! sold out cancels every order that asks for it, and the deadline sweeper
//! cancels every order a slow pipeline left undecided. When the batch fails,
//! the consume loop replays it one record per transaction through
//! [`OrderSideHandler`]'s `apply`, the per-record path that isolates a bad
//! record.

use std::future::Future;

use shop_proto::events::{OrderCancelled, OrderCreated};
use sqlx::PgConnection;
use uuid::Uuid;

use tracing::Instrument;

use crate::consumer::{DecodeError, EventHandler, EventMeta, HandlerError, decode_as, parse_id};

/// Reason on the DECLINED payment row written when an order's
/// `OrderCancelled` arrives before its `OrderCreated`: the late creation
/// finds the row and charges nothing.
pub const CANCELLED_BEFORE_PAYMENT: &str = "order cancelled before payment";

/// Reason on the REJECTED reservation written in the same case: the late
/// creation reserves nothing.
pub const CANCELLED_BEFORE_RESERVATION: &str = "order cancelled before reservation";

/// What the `orders` topic carries for the services that act on orders
/// (payment and inventory): a new order, or its cancellation.
/// `OrderConfirmed` needs nothing from them.
#[derive(Clone, Debug)]
pub enum OrderEvent {
    Created(shop_proto::events::OrderCreated),
    Cancelled(shop_proto::events::OrderCancelled),
}

impl OrderEvent {
    /// [`crate::consumer::EventHandler::decode`] for the `orders` topic.
    pub fn decode(event_type: &str, payload: &[u8]) -> Result<Option<Self>, DecodeError> {
        use shop_proto::{EventName, events};
        Ok(Some(match event_type {
            events::OrderCreated::EVENT_TYPE => Self::Created(decode_as(event_type, payload)?),
            events::OrderCancelled::EVENT_TYPE => Self::Cancelled(decode_as(event_type, payload)?),
            events::OrderConfirmed::EVENT_TYPE => return Ok(None),
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        }))
    }
}

/// A new order of a run handed to [`OrderSide::created_all`]: its id
/// (parsed) and customer (present) are checked already.
#[derive(Debug)]
pub struct NewOrder<'a> {
    /// The record it came in; its span is the order's trace, which the
    /// side's outbox events continue (`OutboxEvent::caused_by`).
    pub meta: &'a EventMeta,
    pub order_id: Uuid,
    pub event: OrderCreated,
}

/// A cancellation of a run handed to [`OrderSide::compensate_all`]: its
/// order id is parsed already.
#[derive(Debug)]
pub struct CancelledOrder<'a> {
    /// The record it came in, whose span the side's events continue.
    pub meta: &'a EventMeta,
    pub order_id: Uuid,
    pub event: OrderCancelled,
}

impl CancelledOrder<'_> {
    /// The run's order ids, each once, in id order: the order a side locks
    /// their records in.
    #[must_use]
    pub fn distinct_ids(run: &[Self]) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = run.iter().map(|o| o.order_id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// One side of the saga (payment or inventory): what it does when an order
/// is created and when it is cancelled. Each step runs in the consume
/// loop's transaction and publishes its result through the outbox.
pub trait OrderSide: Send + Sync + 'static {
    /// Acts on a new order and publishes the result. An order that already
    /// has a record on this side (a duplicate under a new event id, or a
    /// cancellation that came first) must change nothing.
    fn created(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        event: OrderCreated,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Acts on a run of new orders (consecutive `OrderCreated` of one
    /// batch, in their order, possibly naming one order twice) with exactly
    /// the effect of [`OrderSide::created`] on each in turn: the same rows,
    /// the same events in the same order, each decided against what the
    /// orders before it left. The default does just that, one by one; a
    /// side overrides it to apply the run in a few set-based statements. It
    /// need not isolate a bad order: an error fails the batch, which is then
    /// replayed one record at a time.
    fn created_all(
        &self,
        conn: &mut PgConnection,
        orders: Vec<NewOrder<'_>>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            for order in orders {
                self.created(conn, order.order_id, order.event)
                    .instrument(order.meta.span.clone())
                    .await?;
            }
            Ok(())
        }
    }

    /// Locks the order's record on this side. Without one, returns false.
    /// With one, undoes what [`OrderSide::created`] did (unless there was
    /// nothing to undo, or it is undone already), publishes that, and
    /// returns true.
    fn compensate(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        event: &OrderCancelled,
    ) -> impl Future<Output = Result<bool, HandlerError>> + Send;

    /// Compensates a run of cancellations (consecutive `OrderCancelled` of
    /// one batch, in their order, possibly naming one order twice) with
    /// exactly the effect of [`OrderSide::compensate`] on each in turn, and
    /// returns what each would have returned. The default does just that,
    /// one by one; a side overrides it to apply the run set-based. As with
    /// [`OrderSide::created_all`], an error fails the batch, which is then
    /// replayed one record at a time.
    fn compensate_all(
        &self,
        conn: &mut PgConnection,
        orders: &[CancelledOrder<'_>],
    ) -> impl Future<Output = Result<Vec<bool>, HandlerError>> + Send {
        async move {
            let mut found = Vec::with_capacity(orders.len());
            for order in orders {
                found.push(
                    self.compensate(conn, order.order_id, &order.event)
                        .instrument(order.meta.span.clone())
                        .await?,
                );
            }
            Ok(found)
        }
    }

    /// Writes the record of an order cancelled before its creation arrived
    /// (it makes a late [`OrderSide::created`] do nothing), unless the order
    /// has a record by now; returns whether it wrote it. Inserting waits for
    /// a concurrent transaction that writes the order's record.
    fn mark_cancelled_first(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        customer_id: &str,
    ) -> impl Future<Output = sqlx::Result<bool>> + Send;
}

/// Plugs an [`OrderSide`] into the consume loop (`common::consumer`).
pub struct OrderSideHandler<S>(pub S);

impl<S: OrderSide> EventHandler for OrderSideHandler<S> {
    type Event = OrderEvent;

    fn decode(&self, event_type: &str, payload: &[u8]) -> Result<Option<OrderEvent>, DecodeError> {
        OrderEvent::decode(event_type, payload)
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        meta: &EventMeta,
        event: OrderEvent,
    ) -> Result<(), HandlerError> {
        let order_id = match &event {
            OrderEvent::Created(e) => &e.order_id,
            OrderEvent::Cancelled(e) => &e.order_id,
        };
        meta.span.record("order_id", order_id.as_str());
        match event {
            OrderEvent::Created(e) => {
                let order_id = parse_id("order id", &e.order_id)?;
                require_customer(&e.customer_id, order_id)?;
                self.0.created(conn, order_id, e).await
            }
            OrderEvent::Cancelled(e) => self.cancelled(conn, e).await,
        }
    }

    /// Runs of `OrderCreated` go to [`OrderSide::created_all`] at once,
    /// runs of `OrderCancelled` to [`OrderSide::compensate_all`], each run
    /// after the one before it, as one event at a time would.
    async fn apply_all(
        &self,
        conn: &mut PgConnection,
        events: Vec<(&EventMeta, OrderEvent)>,
    ) -> Result<(), HandlerError> {
        let mut created = Vec::new();
        let mut cancelled = Vec::new();
        for (meta, event) in events {
            match event {
                OrderEvent::Created(e) => {
                    self.cancel_all(conn, std::mem::take(&mut cancelled))
                        .await?;
                    meta.span.record("order_id", e.order_id.as_str());
                    // A bad record fails the batch; the per-record replay
                    // dead-letters it.
                    let order_id = parse_id("order id", &e.order_id)?;
                    require_customer(&e.customer_id, order_id)?;
                    created.push(NewOrder {
                        meta,
                        order_id,
                        event: e,
                    });
                }
                OrderEvent::Cancelled(e) => {
                    if !created.is_empty() {
                        self.0
                            .created_all(conn, std::mem::take(&mut created))
                            .await?;
                    }
                    meta.span.record("order_id", e.order_id.as_str());
                    let order_id = parse_id("order id", &e.order_id)?;
                    cancelled.push(CancelledOrder {
                        meta,
                        order_id,
                        event: e,
                    });
                }
            }
        }
        if !created.is_empty() {
            self.0.created_all(conn, created).await?;
        }
        self.cancel_all(conn, cancelled).await
    }
}

impl<S: OrderSide> OrderSideHandler<S> {
    async fn cancelled(
        &self,
        conn: &mut PgConnection,
        e: OrderCancelled,
    ) -> Result<(), HandlerError> {
        let order_id = parse_id("order id", &e.order_id)?;
        if self.0.compensate(conn, order_id, &e).await? {
            return Ok(());
        }
        self.without_record(conn, order_id, &e).await
    }

    /// A run of cancellations: compensated at once, then those whose order
    /// this side has no record of yet get their markers, in run order. (One
    /// at a time, a marker would be written between the compensations
    /// before and after it; markers publish nothing and touch no other
    /// order's rows, so the outcome is the same.)
    async fn cancel_all(
        &self,
        conn: &mut PgConnection,
        run: Vec<CancelledOrder<'_>>,
    ) -> Result<(), HandlerError> {
        if run.is_empty() {
            return Ok(());
        }
        let found = self.0.compensate_all(conn, &run).await?;
        for (order, found) in run.iter().zip(found) {
            if !found {
                self.without_record(conn, order.order_id, &order.event)
                    .instrument(order.meta.span.clone())
                    .await?;
            }
        }
        Ok(())
    }

    /// A cancellation of an order this side has no record of: marks it
    /// cancelled first, or, if its creation committed meanwhile, undoes
    /// that.
    async fn without_record(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        e: &OrderCancelled,
    ) -> Result<(), HandlerError> {
        require_customer(&e.customer_id, order_id)?;
        if self
            .0
            .mark_cancelled_first(conn, order_id, &e.customer_id)
            .await?
        {
            tracing::info!(%order_id, "order cancelled before its creation arrived; it will not be acted on");
            return Ok(());
        }
        // The marker lost to the order's creation, which committed while
        // the insert waited: undo what it did.
        if self.0.compensate(conn, order_id, e).await? {
            Ok(())
        } else {
            Err(HandlerError::Permanent(format!(
                "the record of order {order_id} vanished while it was being cancelled"
            )))
        }
    }
}

fn require_customer(customer_id: &str, order_id: Uuid) -> Result<(), HandlerError> {
    if customer_id.is_empty() {
        return Err(HandlerError::Permanent(format!(
            "order {order_id} has no customer_id"
        )));
    }
    Ok(())
}
