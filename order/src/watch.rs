//! `WatchOrder`: an order's current state, then each change, until it is
//! final, for any number of watchers at little cost.
//!
//! Every transaction that changes an order calls [`crate::store::notify_changed`],
//! which issues `pg_notify('order_changes', order_id)`; PostgreSQL delivers
//! it, on commit only, to every session listening on that channel in the
//! orders database, so a watcher connected to *any* order replica hears of
//! changes that another replica's consumer or sweeper made.
//!
//! Per process there is one listening connection ([`listen`], a supervised
//! task) and a map from order id to a `tokio::sync::watch` channel
//! ([`Watchers`]). A notification bumps the channel of that order, if anyone
//! watches it; each watcher then re-reads the order once and sends it if it
//! differs from what it sent last. A watcher costs a map entry, a receiver
//! and its stream's state: no task, no timer, no polling, and no database
//! connection while it waits. A `watch` channel cannot lag (a burst of
//! notifications is one wake-up), and after the listening connection is
//! (re)established every watched order is re-read, so that changes committed
//! while no one listened are not missed.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use common::retry::Backoff;
use futures::{Stream, StreamExt, stream};
use shop_proto::order::{Order, OrderStatus};
use sqlx::{
    PgPool,
    postgres::{PgListener, PgPoolOptions},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{error::OrderError, store};

/// The PostgreSQL channel [`crate::store::notify_changed`] notifies.
pub const CHANNEL: &str = "order_changes";

/// The orders being watched in this process, each with a channel that
/// [`listen`] bumps when the order changes.
#[derive(Clone, Debug, Default)]
pub struct Watchers {
    orders: Arc<Mutex<HashMap<Uuid, watch::Sender<u64>>>>,
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<u64>>> {
        self.orders.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts following `order_id`; a change notified from now on wakes
    /// the subscription.
    #[must_use]
    pub fn subscribe(&self, order_id: Uuid) -> Subscription {
        let changes = self
            .lock()
            .entry(order_id)
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe();
        Subscription {
            order_id,
            changes,
            watchers: self.clone(),
        }
    }

    /// How many distinct orders are watched.
    #[must_use]
    pub fn orders_watched(&self) -> usize {
        self.lock().len()
    }

    /// `order_id` changed: wake its watchers, if any.
    pub fn changed(&self, order_id: Uuid) {
        if let Some(sender) = self.lock().get(&order_id) {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Notifications may have been missed: wake every watcher to re-read.
    pub fn all_changed(&self) {
        for sender in self.lock().values() {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// One watcher's interest in one order; dropping it forgets the order when
/// no one else watches it.
pub struct Subscription {
    order_id: Uuid,
    changes: watch::Receiver<u64>,
    watchers: Watchers,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut orders = self.watchers.lock();
        // Under the lock, so no subscribe() for the same order runs meanwhile;
        // our own receiver still counts here.
        if orders
            .get(&self.order_id)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            orders.remove(&self.order_id);
        }
    }
}

/// Whether an order will change no more (as far as watchers are told).
#[must_use]
pub fn is_final(order: &Order) -> bool {
    matches!(
        OrderStatus::try_from(order.status),
        Ok(OrderStatus::Confirmed | OrderStatus::Cancelled)
    )
}

/// The states a watcher sends: `first` (already read, after `subscription`
/// was taken, so that no change in between is missed), then every
/// different state re-read on a notification, ending after a final one.
/// Ends with UNAVAILABLE when `shutdown` fires (the client watches again,
/// on this replica once restarted or on another) or the database fails.
pub fn follow(
    pool: PgPool,
    subscription: Subscription,
    first: Order,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<Order, OrderError>> + Send + 'static {
    enum Step {
        First(Order),
        Follow(Order),
        Done,
    }
    let after = |order: &Order| {
        if is_final(order) {
            Step::Done
        } else {
            Step::Follow(order.clone())
        }
    };
    let state = (Step::First(first), subscription, pool, shutdown);
    stream::unfold(state, move |(step, mut sub, pool, shutdown)| async move {
        let last = match step {
            Step::Done => return None,
            Step::First(order) => {
                let next = after(&order);
                return Some((Ok(order), (next, sub, pool, shutdown)));
            }
            Step::Follow(last) => last,
        };
        loop {
            let woke = tokio::select! {
                () = shutdown.cancelled() => None,
                changed = sub.changes.changed() => Some(changed.is_ok()),
            };
            if woke != Some(true) {
                let stop = OrderError::Unavailable(tonic::Status::unavailable(
                    "the order service is shutting down; watch again",
                ));
                return Some((Err(stop), (Step::Done, sub, pool, shutdown)));
            }
            let read = async {
                let mut conn = pool.acquire().await?;
                store::load(&mut conn, sub.order_id).await
            };
            match read.await {
                Ok(Some(order)) if order == last => {}
                Ok(Some(order)) => {
                    let next = after(&order);
                    return Some((Ok(order), (next, sub, pool, shutdown)));
                }
                Ok(None) => {
                    let gone = OrderError::NotFound(sub.order_id.to_string());
                    return Some((Err(gone), (Step::Done, sub, pool, shutdown)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, order_id = %sub.order_id, "watcher cannot re-read its order");
                    return Some((Err(e.into()), (Step::Done, sub, pool, shutdown)));
                }
            }
        }
    })
    .fuse()
}

/// A pool of one connection for the listener, beside the service's pool
/// (whose connections it would otherwise hold for good).
#[must_use]
pub fn listener_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// Listens on [`CHANNEL`] until `shutdown` and wakes the watchers of each
/// order notified. While the database is unreachable it reconnects with
/// backoff; after every (re)connection it wakes all watchers, since
/// notifications sent while no one listened are lost.
pub async fn listen(
    pool: PgPool,
    watchers: Watchers,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let Some(connected) = shutdown.run_until_cancelled(connect(&pool)).await else {
            return Ok(());
        };
        let mut listener = match connected {
            Ok(listener) => listener,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "cannot listen for order changes; retrying");
                if shutdown
                    .run_until_cancelled(tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return Ok(());
                }
                continue;
            }
        };
        if backoff.attempts() > 0 {
            tracing::info!("listening for order changes again");
        }
        backoff.reset();
        watchers.all_changed();
        loop {
            match shutdown.run_until_cancelled(listener.try_recv()).await {
                None => return Ok(()),
                Some(Ok(Some(notification))) => {
                    if let Ok(order_id) = Uuid::parse_str(notification.payload()) {
                        watchers.changed(order_id);
                    } else {
                        tracing::warn!(
                            payload = notification.payload(),
                            "ignoring a notification that names no order"
                        );
                    }
                }
                Some(Ok(None)) => {
                    tracing::warn!("lost the connection that listens for order changes");
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "listening for order changes failed");
                    break;
                }
            }
        }
    }
}

async fn connect(pool: &PgPool) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    // A lost connection surfaces as Ok(None) at once; reconnecting is done
    // by [`listen`], which then wakes the watchers.
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}
