//! `grpc.health.v1` status that follows the service's dependencies: SERVING
//! while both the database and the broker answer, `NOT_SERVING` otherwise, for
//! the overall service ("") and each named gRPC service. Kubernetes gRPC
//! probes and `grpc-health-probe` read it.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, Producer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

/// What a health check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dependencies {
    pub database: bool,
    pub broker: bool,
}

impl Dependencies {
    #[must_use]
    pub fn healthy(self) -> bool {
        self.database && self.broker
    }
}

/// Checks both dependencies once, each within `timeout`.
pub async fn check(pool: &PgPool, producer: &FutureProducer, timeout: Duration) -> Dependencies {
    let database = async {
        matches!(
            tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(pool)).await,
            Ok(Ok(_))
        )
    };
    let client = producer.clone();
    let broker = async move {
        // fetch_metadata blocks; keep it off the async workers.
        tokio::task::spawn_blocking(move || {
            client
                .client()
                .fetch_metadata(None, timeout)
                .is_ok_and(|m| !m.brokers().is_empty())
        })
        .await
        .unwrap_or(false)
    };
    let (database, broker) = tokio::join!(database, broker);
    Dependencies { database, broker }
}

/// Re-checks every `interval` until `shutdown`, updating `reporter` for ""
/// and each of `services`; logs each change. On shutdown everything turns
/// `NOT_SERVING`, for the health watchers still connected while in-flight
/// calls finish (the servers stop accepting on the same token).
pub async fn monitor(
    pool: PgPool,
    producer: FutureProducer,
    reporter: HealthReporter,
    services: Vec<String>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut last: Option<Dependencies> = None;
    loop {
        let now = check(&pool, &producer, interval.max(Duration::from_secs(1))).await;
        if last != Some(now) {
            if now.healthy() {
                tracing::info!("dependencies reachable: SERVING");
            } else {
                tracing::warn!(
                    database = now.database,
                    broker = now.broker,
                    "dependency unreachable: NOT_SERVING"
                );
            }
            let status = if now.healthy() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_all(&reporter, &services, status).await;
            last = Some(now);
        }
        if shutdown
            .run_until_cancelled(tokio::time::sleep(interval))
            .await
            .is_none()
        {
            break;
        }
    }
    set_all(&reporter, &services, ServingStatus::NotServing).await;
}

/// Named services first, the overall status last: whoever sees "" change
/// can rely on the named ones having changed too.
pub(crate) async fn set_all(reporter: &HealthReporter, services: &[String], status: ServingStatus) {
    for s in services {
        reporter.set_service_status(s, status).await;
    }
    reporter.set_service_status("", status).await;
}
