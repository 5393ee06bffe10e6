//! The deadline sweeper: an order still PENDING past its deadline (a
//! result lost, a side down for too long) is cancelled like any other, so
//! that payment and inventory undo what they did for it.

use std::time::Duration;

use common::{outbox, retry::Streak};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    backlog::Backlog,
    consumer::cancel,
    domain::{InventoryStatus, PaymentStatus},
};

/// Cancels PENDING orders past their deadline, in batches, until
/// `shutdown`. An unreachable database is waited out; any other error that
/// repeats ends the sweeper, and with it the service (see
/// `common::retry::Streak`).
pub async fn sweep_deadlines(
    pool: PgPool,
    orders_topic: String,
    interval: Duration,
    notifier: outbox::Notifier,
    backlog: Backlog,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut streak = Streak::new();
    loop {
        let delay = match sweep_once(&pool, &orders_topic).await {
            Ok(0) => {
                streak.reset();
                interval
            }
            Ok(n) => {
                streak.reset();
                backlog.decided(n as u64);
                tracing::warn!(orders = n, "cancelled orders past their deadline");
                notifier.notify();
                continue; // there may be more
            }
            Err(e) => {
                tracing::warn!(error = %e, "deadline sweep failed");
                let transient = common::db::is_transient(&e);
                let delay = streak.failed(e, transient).map_err(|e| {
                    anyhow::Error::new(e).context("the deadline sweeper cannot go on")
                })?;
                delay.max(interval)
            }
        };
        if shutdown
            .run_until_cancelled(tokio::time::sleep(delay))
            .await
            .is_none()
        {
            return Ok(());
        }
    }
}

/// A PENDING order past its deadline, and which results it has.
#[derive(sqlx::FromRow)]
struct Expired {
    order_id: Uuid,
    customer_id: String,
    payment_status: Option<PaymentStatus>,
    inventory_status: Option<InventoryStatus>,
}

/// One batch of expired orders; returns how many were cancelled.
pub async fn sweep_once(pool: &PgPool, orders_topic: &str) -> sqlx::Result<usize> {
    let mut tx = pool.begin().await?;
    let expired: Vec<Expired> = sqlx::query_as(
        "SELECT order_id, customer_id, payment_status, inventory_status FROM orders
         WHERE status = 'PENDING' AND deadline_at < now()
         ORDER BY deadline_at LIMIT 500 FOR UPDATE SKIP LOCKED",
    )
    .fetch_all(&mut *tx)
    .await?;
    if expired.is_empty() {
        return Ok(0);
    }
    let orders: Vec<(Uuid, String, String)> = expired
        .into_iter()
        .map(|o| {
            let missing: Vec<&str> = [
                ("payment", o.payment_status.is_none()),
                ("inventory", o.inventory_status.is_none()),
            ]
            .into_iter()
            .filter(|&(_, missing)| missing)
            .map(|(name, _)| name)
            .collect();
            (
                o.order_id,
                o.customer_id,
                format!("timed out waiting for {}", missing.join(" and ")),
            )
        })
        .collect();
    cancel(&mut tx, orders_topic, &orders).await?;
    tx.commit().await?;
    common::metrics::orders_decided("CANCELLED", orders.len() as u64);
    Ok(orders.len())
}
