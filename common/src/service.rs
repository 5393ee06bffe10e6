//! Start-up and shutdown shared by the services.
//!
//! [`Infra::connect`] brings up what every service needs (pool with
//! migrations, idempotent producer, topics); [`Supervisor`] runs the tasks
//! and shuts them down in order: servers and consumers first, so that no new
//! work arrives and in-flight work commits, then the outbox relay, which
//! publishes what they wrote and flushes the producer.

use std::future::Future;

use rdkafka::producer::FutureProducer;
use sqlx::{PgPool, migrate::Migrator};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{ConfigError, DbConfig, KafkaConfig, PipelineConfig},
    db::{self, DbError},
    kafka::{self, KafkaError},
    outbox::Relay,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("cannot bind {what}: {source}")]
    Bind {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl From<rdkafka::error::KafkaError> for StartError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        StartError::Kafka(e.into())
    }
}

impl From<sqlx::Error> for StartError {
    fn from(e: sqlx::Error) -> Self {
        StartError::Db(DbError::Migrate(e.into()))
    }
}

/// The connections of one running service.
pub struct Infra {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub kafka: KafkaConfig,
    pub pipeline: PipelineConfig,
}

impl Infra {
    /// Connects and prepares: migrations (waiting for the database), the
    /// producer, and the pipeline's topics (waiting for the broker).
    pub async fn connect(
        db: &DbConfig,
        kafka_cfg: KafkaConfig,
        pipeline: PipelineConfig,
        migrator: &Migrator,
        shutdown: &CancellationToken,
    ) -> Result<Self, StartError> {
        let pool = db::pool(db)?;
        db::migrate(&pool, migrator, shutdown).await?;
        let producer = kafka::producer(&kafka_cfg)?;
        kafka::ensure_topics(&kafka_cfg, &crate::topics::ALL, shutdown).await?;
        Ok(Self {
            pool,
            producer,
            kafka: kafka_cfg,
            pipeline,
        })
    }

    pub fn relay(&self) -> Relay {
        Relay::new(self.pool.clone(), self.producer.clone(), &self.pipeline)
    }
}

/// Runs a service's tasks and stops them in order (see module docs).
pub struct Supervisor {
    front: TaskTracker,
    relay: Relay,
}

impl Supervisor {
    pub fn new(relay: Relay) -> Self {
        Self {
            front: TaskTracker::new(),
            relay,
        }
    }

    /// Spawns a task that stops on its own when the shutdown token fires.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.front.spawn(task);
    }

    /// Runs until `shutdown`; returns when everything has stopped.
    pub async fn run(self, shutdown: CancellationToken) {
        let relay_stop = CancellationToken::new();
        let relay = tokio::spawn(self.relay.run(relay_stop.clone()));
        shutdown.cancelled().await;
        self.front.close();
        self.front.wait().await;
        relay_stop.cancel();
        let _ = relay.await;
        tracing::info!("shutdown complete");
    }
}
