//! The order service: intake over gRPC and REST, the catalog, and the
//! order's side of the saga.
//!
//! - [`domain`]: validation, pricing and the status decision (pure).
//! - [`store`]: the orders database; writes enqueue events in the outbox.
//! - [`api`]: the behaviour both front ends share; [`grpc`] and [`rest`]
//!   are thin adapters over it; [`error`] maps failures to status codes.
//! - [`saga`]: consumes `payments` and `inventory`, decides CONFIRMED or
//!   CANCELLED, and cancels orders past their deadline.
//! - [`Application`]: wires it together on the shared plumbing of `common`.

pub mod api;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod rest;
pub mod saga;
pub mod store;

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use common::{
    config::{self, ConfigError, DbConfig, KafkaConfig, PipelineConfig},
    service::{Infra, StartError, Starting, Supervisor},
    topics,
};
use shop_proto::order::order_service_server::{OrderServiceServer, SERVICE_NAME};
use tokio_util::sync::CancellationToken;

/// Everything the order service reads from the environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// `GRPC_ADDR` (default `0.0.0.0:50051`).
    pub grpc_addr: SocketAddr,
    /// `HTTP_ADDR` (default `0.0.0.0:8081`): the REST shim.
    pub http_addr: SocketAddr,
    /// `ORDER_DEADLINE_SECS` (default 30): a PENDING order older than this is
    /// cancelled and compensated.
    pub deadline: Duration,
    /// `ORDER_SWEEP_INTERVAL_MS` (default 1000): how often to look for them.
    pub sweep_interval: Duration,
    pub db: DbConfig,
    pub kafka: KafkaConfig,
    pub pipeline: PipelineConfig,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            grpc_addr: config::var("GRPC_ADDR", ([0, 0, 0, 0], 50051).into())?,
            http_addr: config::var("HTTP_ADDR", ([0, 0, 0, 0], 8081).into())?,
            deadline: Duration::from_secs(config::var("ORDER_DEADLINE_SECS", 30)?),
            sweep_interval: config::millis("ORDER_SWEEP_INTERVAL_MS", 1000)?,
            db: DbConfig::from_env("orders")?,
            kafka: KafkaConfig::from_env("order")?,
            pipeline: PipelineConfig::from_env()?,
        })
    }
}

/// A built, bound, not yet running order service.
pub struct Application {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    supervisor: Supervisor,
    shutdown: CancellationToken,
}

impl Application {
    /// Connects, migrates, seeds the catalog, binds both ports and spawns
    /// every task; [`Application::run`] waits for shutdown.
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, StartError> {
        let infra = Infra::new(&config.db, config.kafka.clone(), config.pipeline.clone())?;
        let (supervisor, notifier) = infra.supervisor();
        let orders_topic = config.kafka.topic(topics::ORDERS);
        let (router, reporter) = common::grpc::router(SERVICE_NAME);
        let starting = Starting::new(reporter, SERVICE_NAME);
        let catalog = Arc::new(OnceLock::new());
        let api = api::OrderApi {
            pool: infra.pool.clone(),
            catalog: catalog.clone(),
            readiness: starting.readiness().clone(),
            orders_topic: orders_topic.clone(),
            deadline: config.deadline,
            outbox: notifier.clone(),
        };

        // OrderApi answers UNAVAILABLE itself until ready, for gRPC and REST.
        let router = router.add_service(OrderServiceServer::new(grpc::OrderGrpc(api.clone())));
        let grpc_addr = infra
            .serve_grpc(&supervisor, router, &starting, config.grpc_addr, &shutdown)
            .await?;
        let (http_listener, http_addr) =
            common::grpc::bind(config.http_addr)
                .await
                .map_err(|source| StartError::Bind {
                    what: "HTTP_ADDR",
                    source,
                })?;
        let http_shutdown = shutdown.clone();
        supervisor.spawn(async move {
            let server = axum::serve(http_listener, rest::router(api))
                .with_graceful_shutdown(http_shutdown.cancelled_owned());
            if let Err(e) = server.await {
                tracing::error!(error = %e, "REST server failed");
            }
            tracing::info!("REST server stopped");
        });

        infra
            .prepare(&sqlx::migrate!("./migrations"), &shutdown)
            .await?;
        store::seed_catalog(&infra.pool).await?;
        let _ = catalog.set(store::load_catalog(&infra.pool).await?);
        infra.ready(&supervisor, starting, &shutdown);
        infra.spawn_consumer(
            &supervisor,
            &[topics::PAYMENTS, topics::INVENTORY],
            saga::SagaHandler {
                orders_topic: orders_topic.clone(),
            },
            notifier.clone(),
            &shutdown,
        )?;
        supervisor.spawn(saga::sweep_deadlines(
            infra.pool.clone(),
            orders_topic,
            config.sweep_interval,
            notifier,
            shutdown.clone(),
        ));
        tracing::info!(%grpc_addr, %http_addr, "order service started");
        Ok(Self {
            grpc_addr,
            http_addr,
            supervisor,
            shutdown,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Runs until the shutdown token fires, then stops in order.
    pub async fn run(self) {
        self.supervisor.run(self.shutdown).await;
    }
}
