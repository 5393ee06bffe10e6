//! The order service: intake over gRPC and REST, the catalog, and the
//! order's side of the saga.
//!
//! - [`domain`]: validation, pricing and the status decision (pure).
//! - [`store`]: the orders database; writes enqueue events in the outbox.
//! - [`api`]: the behaviour both front ends share; [`grpc`] and [`rest`]
//!   are thin adapters over it; [`error`] maps failures to status codes.
//! - [`consumer`]: consumes `payments` and `inventory`, decides CONFIRMED
//!   or CANCELLED, a batch at a time in [`saga_batch`] by the rules of
//!   [`saga`] (pure); [`deadline`] cancels orders whose results never came.
//! - [`intake`]: the limits on `CreateOrder` (in flight, per client rate,
//!   database queueing); [`backlog`] bounds the orders waiting to be decided.
//! - [`group_commit`]: the writers that store concurrent new orders in one
//!   transaction; [`idempotency`] decides each request's fate by its key.
//! - [`watch`]: `WatchOrder` (gRPC stream and Server-Sent Events), fed by
//!   PostgreSQL notifications from the transactions that change orders.
//! - [`build`]: wires it together on the skeleton of `common::service`.

pub mod api;
pub mod backlog;
pub mod consumer;
pub mod deadline;
pub mod domain;
pub mod error;
pub mod group_commit;
pub mod grpc;
pub mod idempotency;
pub mod intake;
pub mod rest;
pub mod saga;
pub mod saga_batch;
pub mod store;
pub mod watch;

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use common::{
    config::{self, ConfigError, DbConfig, KafkaConfig, PipelineConfig},
    service::{Service, StartError},
    tls, topics,
};
use shop_proto::order::order_service_server::{OrderServiceServer, SERVICE_NAME};
use tokio_util::sync::CancellationToken;

/// Everything the order service reads from the environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// `GRPC_ADDR` (default `0.0.0.0:50051`).
    pub grpc_addr: SocketAddr,
    /// `METRICS_ADDR` (default `0.0.0.0:9464`): Prometheus `/metrics`.
    pub metrics_addr: SocketAddr,
    /// `HTTP_ADDR` (default `0.0.0.0:8081`): the REST shim.
    pub http_addr: SocketAddr,
    /// `ORDER_DEADLINE_SECS` (default 30): a PENDING order older than this is
    /// cancelled and compensated.
    pub deadline: Duration,
    /// `ORDER_SWEEP_INTERVAL_MS` (default 1000): how often to look for them.
    pub sweep_interval: Duration,
    /// `INTAKE_*`: the protection of `CreateOrder` (see [`intake`]).
    pub intake: intake::Limits,
    /// `INTAKE_WRITERS`, `INTAKE_GROUP_MAX`, `INTAKE_QUEUE_MAX`: group commit
    /// of new orders (see [`group_commit`]).
    pub group_commit: group_commit::Settings,
    pub db: DbConfig,
    pub kafka: KafkaConfig,
    pub pipeline: PipelineConfig,
    /// `TLS_CERT_FILE`, `TLS_KEY_FILE`, `TLS_CLIENT_CA_FILE`, `HEALTH_ADDR`:
    /// TLS and mTLS of the listeners (see [`common::tls`]).
    pub tls: tls::Settings,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            grpc_addr: config::var("GRPC_ADDR", ([0, 0, 0, 0], 50051).into())?,
            metrics_addr: config::var("METRICS_ADDR", ([0, 0, 0, 0], 9464).into())?,
            http_addr: config::var("HTTP_ADDR", ([0, 0, 0, 0], 8081).into())?,
            deadline: Duration::from_secs(config::var("ORDER_DEADLINE_SECS", 30)?),
            sweep_interval: config::millis("ORDER_SWEEP_INTERVAL_MS", 1000)?,
            intake: intake::Limits::from_env()?,
            group_commit: group_commit::Settings::from_env()?,
            db: DbConfig::from_env("orders")?,
            kafka: KafkaConfig::from_env("order")?,
            pipeline: PipelineConfig::from_env()?,
            tls: tls::Settings::from_env()?,
        })
    }
}

/// A started order service; `run` it.
pub type Application = common::service::Running;

/// Opens both ports at once, waits for the database and the broker
/// (migrations, topics), seeds the catalog, then opens the API and starts
/// the consumer and the deadline sweeper.
pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Application, StartError> {
    let mut service = Service::new(
        SERVICE_NAME,
        &config.db,
        config.kafka.clone(),
        config.pipeline.clone(),
        config.tls.clone(),
        shutdown,
    )?;
    service.serve_metrics(config.metrics_addr).await?;
    common::metrics::register_order_counters();
    consumer::register_metrics();
    let orders_topic = config.kafka.topic(topics::ORDERS);
    let catalog = Arc::new(OnceLock::new());
    let writer = group_commit::GroupCommit::new(
        service.pool.clone(),
        config.group_commit.clone(),
        config.intake.queue_timeout,
        config.deadline,
        service.outbox(),
    );
    let api = api::OrderApi {
        pool: service.pool.clone(),
        catalog: catalog.clone(),
        readiness: service.readiness().clone(),
        orders_topic: orders_topic.clone(),
        writer: writer.clone(),
        watchers: watch::Watchers::default(),
        shutdown: service.shutdown().clone(),
        intake: intake::Guard::new(&config.intake),
    };
    let watchers = api.watchers.clone();
    let backlog = api.intake.backlog();
    // OrderApi answers UNAVAILABLE itself until ready, for gRPC and REST.
    let grpc_api = OrderServiceServer::new(grpc::OrderGrpc(api.clone()));
    service
        .serve_grpc(config.grpc_addr, |router| router.add_service(grpc_api))
        .await?;
    service
        .serve_http(config.http_addr, rest::router(api))
        .await?;

    service.prepare(&sqlx::migrate!("./migrations")).await?;
    store::seed_catalog(&service.pool)
        .await
        .map_err(StartError::step("seeding the catalog"))?;
    let loaded = store::load_catalog(&service.pool)
        .await
        .map_err(StartError::step("loading the catalog"))?;
    let _ = catalog.set(loaded);
    // Last tasks: they outlive the servers' in-flight calls, which wait on
    // them; they run before the API lets a call in, so that the first calls
    // find a writer idle instead of queueing for one.
    for _ in 0..writer.writers() {
        let writer = writer.clone();
        service.spawn_last("order intake writer", move |stop| writer.run(stop));
    }
    service.ready();
    service.spawn_consumer(
        &[topics::PAYMENTS, topics::INVENTORY],
        consumer::SagaHandler {
            orders_topic: orders_topic.clone(),
            backlog: backlog.clone(),
        },
    )?;
    let sweeper = deadline::sweep_deadlines(
        service.pool.clone(),
        orders_topic,
        config.sweep_interval,
        service.outbox(),
        backlog.clone(),
        service.shutdown().clone(),
    );
    service.spawn("deadline sweeper", sweeper);
    let counted = backlog.track(service.pool.clone(), service.shutdown().clone());
    service.spawn("pending orders count", counted);
    let listener = watch::listen(
        watch::listener_pool(&service.pool),
        watchers,
        service.shutdown().clone(),
    );
    service.spawn("order change listener", listener);
    Ok(service.started())
}
