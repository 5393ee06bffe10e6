//! The order API's behaviour, shared by the gRPC service and the REST shim
//! so that both validate, price and store orders the same way.

use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock},
};

use common::outbox;
use futures::Stream;
use sha2::{Digest, Sha256};
use shop_proto::{
    EventName, events,
    order::{CreateOrderRequest, Order},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    domain::{self, Invalid, NewOrder, Price},
    error::OrderError,
    group_commit::GroupCommit,
    intake, store, watch,
};

/// Longest accepted idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

#[derive(Clone)]
pub struct OrderApi {
    pub pool: PgPool,
    /// Loaded once start-up has migrated and seeded the database.
    pub catalog: Arc<OnceLock<BTreeMap<String, Price>>>,
    pub readiness: common::service::Readiness,
    pub orders_topic: String,
    /// The writers that store new orders in groups (see [`crate::group_commit`]).
    pub writer: GroupCommit,
    /// The orders `WatchOrder` callers follow (see [`crate::watch`]).
    pub watchers: watch::Watchers,
    /// Ends the watchers' streams, so that shutdown does not wait on them.
    pub shutdown: CancellationToken,
    /// Admission to `CreateOrder` (see [`crate::intake`]).
    pub intake: intake::Guard,
}

impl OrderApi {
    /// Validates, prices and stores an order; publishes `OrderCreated`
    /// through the outbox. `client` is the caller's key for the rate limit
    /// ([`intake::client_key`]). The order is written by a group-commit
    /// writer together with whatever else is queued; a call admitted waits
    /// at most the queue timeout for a writer, then is shed with
    /// UNAVAILABLE rather than queued behind the others.
    pub async fn create(
        &self,
        req: &CreateOrderRequest,
        client: &str,
    ) -> Result<Order, OrderError> {
        let catalog = self
            .catalog
            .get()
            .ok_or_else(|| OrderError::Unavailable(self.readiness.unavailable()))?;
        let _admitted = self.intake.admit(client)?;
        let new = domain::validate(req)?;
        tracing::Span::current().record("customer_id", new.customer_id.as_str());
        let (lines, currency, total) = domain::price(&new, catalog)?;
        let key = req.idempotency_key.trim();
        if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(Invalid(format!(
                "idempotency_key is longer than {MAX_IDEMPOTENCY_KEY_LEN} characters"
            ))
            .into());
        }
        let idempotency = (!key.is_empty()).then(|| (key.to_owned(), request_hash(&new)));
        // Held until the write has ended, so that the backlog's count
        // knows whether it could be in the database yet.
        let _pending = self.intake.admit_pending()?;
        // The outbox row continues this request's trace, not the writer's:
        // its context is taken here, in the request's span.
        let span = outbox::write_span(1, events::OrderCreated::EVENT_TYPE);
        let pending = store::Pending::new(
            new.customer_id,
            lines,
            currency,
            total,
            idempotency,
            self.orders_topic.clone(),
            &span,
        );
        let order = self.writer.submit(pending).instrument(span).await?;
        tracing::Span::current().record("order_id", order.order_id.as_str());
        Ok(order)
    }

    pub async fn get(&self, order_id: &str) -> Result<Order, OrderError> {
        let id = self.order_id(order_id)?;
        let mut conn = self.pool.acquire().await?;
        store::load(&mut conn, id)
            .await?
            .ok_or_else(|| OrderError::NotFound(order_id.to_owned()))
    }

    /// The order's current state, then each change until it is final (see
    /// [`watch::follow`]). Errors about the request (bad id, unknown order,
    /// not ready) come here, before the stream, so that both front ends
    /// answer them as plain errors.
    pub async fn watch(
        &self,
        order_id: &str,
    ) -> Result<impl Stream<Item = Result<Order, OrderError>> + Send + 'static, OrderError> {
        let id = self.order_id(order_id)?;
        tracing::Span::current().record("order_id", order_id);
        // Subscribed before the first read: a change committed in between
        // wakes the watcher, which re-reads.
        let subscription = self.watchers.subscribe(id);
        let first = self.get(order_id).await?;
        Ok(watch::follow(
            self.pool.clone(),
            subscription,
            first,
            self.shutdown.clone(),
        ))
    }

    /// A request's order id, once the service is ready.
    fn order_id(&self, order_id: &str) -> Result<Uuid, OrderError> {
        if !self.readiness.is_ready() {
            return Err(OrderError::Unavailable(self.readiness.unavailable()));
        }
        Ok(Uuid::parse_str(order_id.trim())
            .map_err(|_| Invalid(format!("order_id {order_id:?} is not a UUID")))?)
    }
}

/// What makes two requests "the same" for an idempotency key: the customer
/// and the normalised lines.
fn request_hash(order: &NewOrder) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(order.customer_id.as_bytes());
    for (product, quantity) in &order.lines {
        h.update([0]);
        h.update(product.as_bytes());
        h.update(quantity.to_be_bytes());
    }
    h.finalize().to_vec()
}
