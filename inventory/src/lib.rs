//! The inventory service: stock levels, and the inventory side of the saga.
//!
//! - [`domain`]: merging an order's lines, the all-or-nothing reservation
//!   decision and its reason, API input checks (pure).
//! - [`store`]: the stock database (stock, reservations, their items) and
//!   the seeding of stock from the shared catalog fixture.
//! - [`reservations`]: consumes `orders`; `OrderCreated` reserves stock or
//!   rejects the order, `OrderCancelled` releases it; results go to the
//!   `inventory` topic through the outbox.
//! - [`grpc`]: `GetStock` and `SetStock`; [`error`] maps failures to status
//!   codes.
//! - [`Application`]: wires it together on the shared plumbing of `common`.

pub mod domain;
pub mod error;
pub mod grpc;
pub mod reservations;
pub mod store;

use std::net::SocketAddr;

use common::{
    config::{self, ConfigError, DbConfig, KafkaConfig, PipelineConfig},
    service::{Infra, StartError, Starting, Supervisor},
    topics,
};
use shop_proto::inventory::inventory_service_server::{InventoryServiceServer, SERVICE_NAME};
use tokio_util::sync::CancellationToken;

/// Everything the inventory service reads from the environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// `GRPC_ADDR` (default `0.0.0.0:50053`).
    pub grpc_addr: SocketAddr,
    /// `DATABASE_URL` (default `postgres://shop:shop@127.0.0.1:5432/inventory`).
    pub db: DbConfig,
    /// `KAFKA_*`; consumer group and client id default to `inventory`.
    pub kafka: KafkaConfig,
    pub pipeline: PipelineConfig,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            grpc_addr: config::var("GRPC_ADDR", ([0, 0, 0, 0], 50053).into())?,
            db: DbConfig::from_env("inventory")?,
            kafka: KafkaConfig::from_env("inventory")?,
            pipeline: PipelineConfig::from_env()?,
        })
    }
}

/// A built, bound, not yet running inventory service.
pub struct Application {
    grpc_addr: SocketAddr,
    supervisor: Supervisor,
    shutdown: CancellationToken,
}

impl Application {
    /// Connects, migrates, seeds stock, binds the gRPC port and spawns every
    /// task; [`Application::run`] waits for shutdown.
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, StartError> {
        let infra = Infra::new(&config.db, config.kafka.clone(), config.pipeline.clone())?;
        let (supervisor, notifier) = infra.supervisor();

        let (router, reporter) = common::grpc::router(SERVICE_NAME);
        let starting = Starting::new(reporter, SERVICE_NAME);
        let router = router.add_service(InventoryServiceServer::with_interceptor(
            grpc::InventoryGrpc {
                pool: infra.pool.clone(),
            },
            starting.readiness().interceptor(),
        ));
        let grpc_addr = infra
            .serve_grpc(&supervisor, router, &starting, config.grpc_addr, &shutdown)
            .await?;
        infra
            .prepare(&sqlx::migrate!("./migrations"), &shutdown)
            .await?;
        store::seed_stock(&infra.pool).await?;
        infra.ready(&supervisor, starting, &shutdown);
        infra.spawn_consumer(
            &supervisor,
            &[topics::ORDERS],
            reservations::ReservationHandler {
                inventory_topic: config.kafka.topic(topics::INVENTORY),
            },
            notifier,
            &shutdown,
        )?;
        tracing::info!(%grpc_addr, "inventory service started");
        Ok(Self {
            grpc_addr,
            supervisor,
            shutdown,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Runs until the shutdown token fires, then stops in order.
    pub async fn run(self) {
        self.supervisor.run(self.shutdown).await;
    }
}
