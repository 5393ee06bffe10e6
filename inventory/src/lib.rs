//! The inventory service: stock levels, and the inventory side of the saga.
//!
//! - [`domain`]: merging an order's lines, the all-or-nothing reservation
//!   decision and its reason, API input checks (pure).
//! - [`store`]: the stock database (stock, reservations, their items) and
//!   the seeding of stock from the shared catalog fixture.
//! - [`consumer`]: consumes `orders`; `OrderCreated` reserves stock or
//!   rejects the order, `OrderCancelled` releases it; results go to the
//!   `inventory` topic through the outbox.
//! - [`grpc`]: `GetStock` and `SetStock`; [`error`] maps failures to status
//!   codes.
//! - [`build`]: wires it together on the skeleton of `common::service`.

pub mod consumer;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod store;

use std::net::SocketAddr;

use common::{
    config::{self, ConfigError, DbConfig, KafkaConfig, PipelineConfig},
    saga::OrderSideHandler,
    service::{Service, StartError},
    tls, topics,
};
use shop_proto::inventory::inventory_service_server::{InventoryServiceServer, SERVICE_NAME};
use tokio_util::sync::CancellationToken;

/// Everything the inventory service reads from the environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// `GRPC_ADDR` (default `0.0.0.0:50053`).
    pub grpc_addr: SocketAddr,
    /// `METRICS_ADDR` (default `0.0.0.0:9466`): Prometheus `/metrics`.
    pub metrics_addr: SocketAddr,
    /// `DATABASE_URL` (default `postgres://shop:shop@127.0.0.1:5432/inventory`).
    pub db: DbConfig,
    /// `KAFKA_*`; consumer group and client id default to `inventory`.
    pub kafka: KafkaConfig,
    pub pipeline: PipelineConfig,
    /// `TLS_CERT_FILE`, `TLS_KEY_FILE`, `TLS_CLIENT_CA_FILE`, `HEALTH_ADDR`:
    /// TLS and mTLS of the listeners (see [`common::tls`]).
    pub tls: tls::Settings,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            grpc_addr: config::var("GRPC_ADDR", ([0, 0, 0, 0], 50053).into())?,
            metrics_addr: config::var("METRICS_ADDR", ([0, 0, 0, 0], 9466).into())?,
            db: DbConfig::from_env("inventory")?,
            kafka: KafkaConfig::from_env("inventory")?,
            pipeline: PipelineConfig::from_env()?,
            tls: tls::Settings::from_env()?,
        })
    }
}

/// A started inventory service; `run` it.
pub type Application = common::service::Running;

/// Opens the gRPC port at once, waits for the database and the broker
/// (migrations, topics), seeds stock, then opens the API and starts the
/// consumer.
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
    let api = InventoryServiceServer::with_interceptor(
        grpc::InventoryGrpc {
            pool: service.pool.clone(),
        },
        service.readiness().interceptor(),
    );
    service
        .serve_grpc(config.grpc_addr, |router| router.add_service(api))
        .await?;
    service.prepare(&sqlx::migrate!("./migrations")).await?;
    store::seed_stock(&service.pool)
        .await
        .map_err(StartError::step("seeding stock"))?;
    service.ready();
    service.spawn_consumer(
        &[topics::ORDERS],
        OrderSideHandler(consumer::Reservations {
            inventory_topic: config.kafka.topic(topics::INVENTORY),
        }),
    )?;
    Ok(service.started())
}
