//! Which Kafka cluster a service's database belongs with.
//!
//! The outbox marks events published and the consumers' offsets live in the
//! broker: both only mean something for the cluster they were written to.
//! A database paired with another cluster (a replaced cluster, a lost log, a
//! second local checkout with an empty broker) would silently miss every
//! event it recorded as published, and its consumers would start over.
//!
//! So each database records the cluster id at the service's first start
//! (table `kafka_cluster`). At every later start [`verify`] compares it with
//! the cluster id the broker reports, and a service that finds another
//! cluster refuses to consume or relay: health `NOT_SERVING`, its API
//! UNAVAILABLE with the reason, a log line that says what to do; it waits
//! for an operator's decision ([`accept`], run by `shopctl broker accept`).
//! While running, [`watch`] checks again after reconnects; a change stops
//! the service (non-zero exit), and the restart refuses as above.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, Producer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{retry::Backoff, service::Readiness};

/// What the log and the API say when the cluster changed.
fn refusal(recorded: &str, found: &str) -> String {
    format!(
        "refusing to run: this database was used with Kafka cluster {recorded}, but the broker \
         is cluster {found}; events recorded as published went to the old cluster. If the change \
         is intended, run `shopctl broker accept` (it republishes the outbox rows still kept and \
         resets consumer offsets to the earliest); otherwise point KAFKA_BROKERS at the old \
         cluster"
    )
}

/// The id of the cluster the producer is connected to, `None` while the
/// broker cannot be reached within `timeout`.
pub async fn cluster_id(producer: &FutureProducer, timeout: Duration) -> Option<String> {
    let client = producer.clone();
    // fetch_cluster_id blocks; keep it off the async workers.
    tokio::task::spawn_blocking(move || client.client().fetch_cluster_id(timeout))
        .await
        .ok()
        .flatten()
}

/// The cluster id this database recorded, if any.
pub async fn recorded(pool: &PgPool) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT cluster_id FROM kafka_cluster")
        .fetch_optional(pool)
        .await
}

/// Records `cluster_id` unless one is recorded; returns the one recorded.
async fn record_first(pool: &PgPool, cluster_id: &str) -> sqlx::Result<String> {
    sqlx::query("INSERT INTO kafka_cluster (cluster_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(cluster_id)
        .execute(pool)
        .await?;
    recorded(pool).await?.ok_or(sqlx::Error::RowNotFound)
}

/// Why [`verify`] returned without a verified cluster.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("shut down while checking the Kafka cluster")]
    Cancelled,
}

/// How often a refusing service looks whether an operator accepted the new
/// cluster.
const RECHECK: Duration = Duration::from_secs(2);

/// Start-up check: returns the cluster id once the broker's is the one the
/// database recorded (recording it at first start). While they differ the
/// service is refused (see module docs) and this keeps waiting.
pub async fn verify(
    pool: &PgPool,
    producer: &FutureProducer,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Result<String, IdentityError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut refused_for: Option<String> = None;
    loop {
        let delay = match cluster_id(producer, Duration::from_secs(5)).await {
            None => {
                tracing::warn!("broker unreachable; waiting to read its cluster id");
                backoff.next_delay()
            }
            Some(found) => {
                let recorded = record_first(pool, &found).await?;
                if recorded == found {
                    if refused_for.is_some() {
                        tracing::info!(cluster_id = %found, "Kafka cluster accepted; starting");
                        readiness.clear_refusal();
                    }
                    return Ok(found);
                }
                if refused_for.as_deref() != Some(found.as_str()) {
                    let reason = refusal(&recorded, &found);
                    tracing::error!(recorded = %recorded, found = %found, "{reason}");
                    readiness.refuse(reason);
                    refused_for = Some(found);
                }
                RECHECK
            }
        };
        if shutdown
            .run_until_cancelled(tokio::time::sleep(delay))
            .await
            .is_none()
        {
            return Err(IdentityError::Cancelled);
        }
    }
}

/// Running check, a supervised task: after every reconnect the broker may
/// be another cluster. Returns an error (which stops the service) as soon
/// as the broker reports a cluster other than `expected`.
pub async fn watch(
    producer: FutureProducer,
    expected: String,
    interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        if let Some(found) = cluster_id(&producer, interval.max(Duration::from_secs(1))).await
            && found != expected
        {
            anyhow::bail!("{}", refusal(&expected, &found));
        }
        if shutdown
            .run_until_cancelled(tokio::time::sleep(interval))
            .await
            .is_none()
        {
            return Ok(());
        }
    }
}

/// What [`accept`] changed in one database.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Accepted {
    /// The cluster recorded before, if any.
    pub previous: Option<String>,
    /// The cluster recorded now.
    pub cluster_id: String,
    /// Outbox rows marked unpublished, so that the relay sends them to the
    /// new cluster (consumers drop the ones they applied already). Rows
    /// pruned before (older than `OUTBOX_RETENTION_SECS`) are gone.
    pub republished: u64,
}

/// The operator's decision that this database now belongs with cluster
/// `cluster_id`: records it and marks every outbox row still kept as
/// unpublished, in one transaction.
pub async fn accept(pool: &PgPool, cluster_id: &str) -> sqlx::Result<Accepted> {
    let mut tx = pool.begin().await?;
    let previous: Option<String> =
        sqlx::query_scalar("SELECT cluster_id FROM kafka_cluster FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await?;
    sqlx::query(
        "INSERT INTO kafka_cluster (cluster_id) VALUES ($1)
         ON CONFLICT (singleton) DO UPDATE SET cluster_id = EXCLUDED.cluster_id,
                                               recorded_at = now()",
    )
    .bind(cluster_id)
    .execute(&mut *tx)
    .await?;
    let republished = if previous.as_deref() == Some(cluster_id) {
        0
    } else {
        sqlx::query("UPDATE outbox SET published_at = NULL WHERE published_at IS NOT NULL")
            .execute(&mut *tx)
            .await?
            .rows_affected()
    };
    tx.commit().await?;
    Ok(Accepted {
        previous,
        cluster_id: cluster_id.to_owned(),
        republished,
    })
}
