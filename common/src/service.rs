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
    consumer::{self, ConsumeLoop, EventHandler},
    db::{self, DbError},
    kafka::{self, KafkaError},
    outbox::Notifier,
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

impl Infra {
    /// Binds `addr`, serves `router` (the service's API on top of
    /// [`crate::grpc::router`]) and keeps `reporter` following the database
    /// and broker for `service_name`. Returns the address really bound.
    pub async fn serve_grpc(
        &self,
        supervisor: &Supervisor,
        router: tonic::transport::server::Router,
        reporter: tonic_health::server::HealthReporter,
        service_name: &str,
        addr: std::net::SocketAddr,
        shutdown: &CancellationToken,
    ) -> Result<std::net::SocketAddr, StartError> {
        // tonic-health starts "" as SERVING; nothing is known yet.
        let services = vec![service_name.to_owned()];
        crate::health::set_all(
            &reporter,
            &services,
            tonic_health::ServingStatus::NotServing,
        )
        .await;
        let (listener, bound) =
            crate::grpc::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    what: "GRPC_ADDR",
                    source,
                })?;
        supervisor.spawn(crate::grpc::serve(router, listener, shutdown.clone()));
        supervisor.spawn(crate::health::monitor(
            self.pool.clone(),
            self.producer.clone(),
            reporter,
            services,
            self.pipeline.health_interval,
            shutdown.clone(),
        ));
        Ok(bound)
    }

    /// Subscribes to `topics` (pipeline names, without prefix) and runs
    /// `handler` in the consume loop until shutdown.
    pub fn spawn_consumer<H: EventHandler>(
        &self,
        supervisor: &Supervisor,
        topics: &[&str],
        handler: H,
        outbox: Notifier,
        shutdown: &CancellationToken,
    ) -> Result<(), StartError> {
        let names: Vec<String> = topics.iter().map(|t| self.kafka.topic(t)).collect();
        let consumer = consumer::subscribe(&self.kafka, &names)?;
        supervisor.spawn(
            ConsumeLoop {
                consumer,
                handler,
                pool: self.pool.clone(),
                producer: self.producer.clone(),
                outbox,
                group_id: self.kafka.group_id.clone(),
                config: self.pipeline.clone(),
            }
            .run(shutdown.clone()),
        );
        Ok(())
    }
}
