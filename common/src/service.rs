//! Start-up and shutdown shared by the services.
//!
//! Start-up: [`Infra::new`] creates the pool and the idempotent producer;
//! [`Infra::serve_grpc`] opens the gRPC port at once (health NOT_SERVING,
//! the API UNAVAILABLE) so that probes get answers while [`Infra::prepare`]
//! waits for the database and broker, runs migrations and creates topics;
//! [`Infra::ready`] then opens the API and lets health follow the
//! dependencies. [`Supervisor`] runs the tasks
//! and shuts them down in order: servers and consumers first, so that no new
//! work arrives and in-flight work commits, then the outbox relay, which
//! publishes what they wrote and flushes the producer.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

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
    /// Creates the pool and the producer. Both connect lazily, so this
    /// succeeds while the database or broker is down; see [`Infra::prepare`].
    pub fn new(
        db: &DbConfig,
        kafka_cfg: KafkaConfig,
        pipeline: PipelineConfig,
    ) -> Result<Self, StartError> {
        Ok(Self {
            pool: db::pool(db)?,
            producer: kafka::producer(&kafka_cfg)?,
            kafka: kafka_cfg,
            pipeline,
        })
    }

    /// Runs the migrations and creates the pipeline's topics, waiting (with
    /// backoff) for the database and the broker to be reachable.
    pub async fn prepare(
        &self,
        migrator: &Migrator,
        shutdown: &CancellationToken,
    ) -> Result<(), StartError> {
        db::migrate(&self.pool, migrator, shutdown).await?;
        kafka::ensure_topics(&self.kafka, &crate::topics::ALL, shutdown).await?;
        Ok(())
    }

    /// The supervisor of this service's tasks, owning its outbox relay, and
    /// the notifier writers use to wake that relay after they commit.
    pub fn supervisor(&self) -> (Supervisor, Notifier) {
        let relay = Relay::new(self.pool.clone(), self.producer.clone(), &self.pipeline);
        let notifier = relay.notifier();
        (Supervisor::new(relay), notifier)
    }
}

/// Whether start-up has finished (migrations ran, topics exist, seed data
/// loaded). Until then the service's API answers UNAVAILABLE and health is
/// NOT_SERVING, although its ports are open: probes get an answer.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn mark_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// A gRPC interceptor for the service's API (not health or reflection).
    pub fn interceptor(
        &self,
    ) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<>
    {
        let ready = self.clone();
        move |request| match ready.is_ready() {
            true => Ok(request),
            false => Err(Self::starting()),
        }
    }

    /// The status answered while starting.
    pub fn starting() -> tonic::Status {
        tonic::Status::unavailable("service is starting; retry shortly")
    }
}

/// A service on its way up: its health reporter and its readiness, until
/// [`Infra::ready`].
pub struct Starting {
    reporter: tonic_health::server::HealthReporter,
    services: Vec<String>,
    readiness: Readiness,
}

impl Starting {
    /// For the gRPC service named `service_name`, whose health `reporter`
    /// comes from [`crate::grpc::router`].
    pub fn new(reporter: tonic_health::server::HealthReporter, service_name: &str) -> Self {
        Self {
            reporter,
            services: vec![service_name.to_owned()],
            readiness: Readiness::default(),
        }
    }

    /// Gate the service's API with this (see [`Readiness::interceptor`]).
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
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
    /// Binds `addr` and serves `router` (the service's API, gated by
    /// `starting`'s readiness, on top of [`crate::grpc::router`]) right
    /// away, NOT_SERVING until [`Infra::ready`]. Returns the address bound.
    pub async fn serve_grpc(
        &self,
        supervisor: &Supervisor,
        router: tonic::transport::server::Router,
        starting: &Starting,
        addr: std::net::SocketAddr,
        shutdown: &CancellationToken,
    ) -> Result<std::net::SocketAddr, StartError> {
        // tonic-health starts "" as SERVING; nothing is known yet.
        crate::health::set_all(
            &starting.reporter,
            &starting.services,
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
        Ok(bound)
    }

    /// Start-up is done: the API answers, and health follows the database
    /// and the broker from now on.
    pub fn ready(&self, supervisor: &Supervisor, starting: Starting, shutdown: &CancellationToken) {
        starting.readiness.mark_ready();
        supervisor.spawn(crate::health::monitor(
            self.pool.clone(),
            self.producer.clone(),
            starting.reporter,
            starting.services,
            self.pipeline.health_interval,
            shutdown.clone(),
        ));
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
