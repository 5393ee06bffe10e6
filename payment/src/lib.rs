//! The payment service: customer credit accounts, and payment's side of the
//! saga.
//!
//! - [`domain`]: whether an order fits a customer's credit, refunds, and
//!   what a valid credit limit is (pure).
//! - [`store`]: the payments database (accounts, one payment per order).
//! - [`consumer`]: consumes `orders`; pays or declines each
//!   `OrderCreated`, refunds on `OrderCancelled`, publishes the results on
//!   `payments` through the outbox.
//! - [`grpc`]: `shop.payment.v1.PaymentService` (payments, accounts, credit
//!   limits); [`error`] maps failures to status codes.
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
use shop_proto::payment::payment_service_server::{PaymentServiceServer, SERVICE_NAME};
use tokio_util::sync::CancellationToken;

use crate::domain::AccountDefaults;

/// Everything the payment service reads from the environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// `GRPC_ADDR` (default `0.0.0.0:50052`).
    pub grpc_addr: SocketAddr,
    /// `METRICS_ADDR` (default `0.0.0.0:9465`): Prometheus `/metrics`.
    pub metrics_addr: SocketAddr,
    /// `DEFAULT_CREDIT_LIMIT_UNITS` (default 100000, i.e. $1000.00): the
    /// credit limit of a customer's account when it is first needed, in
    /// minor units of the default currency. Must not be negative.
    pub default_credit_limit: i64,
    /// `DEFAULT_CURRENCY` (default `USD`): the currency of new accounts, an
    /// ISO 4217 code.
    pub default_currency: String,
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
            grpc_addr: config::var("GRPC_ADDR", ([0, 0, 0, 0], 50052).into())?,
            metrics_addr: config::var("METRICS_ADDR", ([0, 0, 0, 0], 9465).into())?,
            default_credit_limit: config::var("DEFAULT_CREDIT_LIMIT_UNITS", 100_000)?,
            default_currency: config::var("DEFAULT_CURRENCY", "USD".to_owned())?,
            db: DbConfig::from_env("payments")?,
            kafka: KafkaConfig::from_env("payment")?,
            pipeline: PipelineConfig::from_env()?,
            tls: tls::Settings::from_env()?,
        })
    }

    /// The account defaults, checked: the database would refuse them on the
    /// first order otherwise, and every order would be dead-lettered.
    fn account_defaults(&self) -> Result<AccountDefaults, StartError> {
        if self.default_credit_limit < 0 {
            return Err(StartError::Setting(format!(
                "DEFAULT_CREDIT_LIMIT_UNITS must not be negative, got {}",
                self.default_credit_limit
            )));
        }
        let currency = &self.default_currency;
        if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(StartError::Setting(format!(
                "DEFAULT_CURRENCY must be an ISO 4217 code such as USD, got {currency:?}"
            )));
        }
        Ok(AccountDefaults {
            currency: currency.clone(),
            credit_limit: self.default_credit_limit,
        })
    }
}

/// A started payment service; `run` it.
pub type Application = common::service::Running;

/// Opens the gRPC port at once, waits for the database and the broker
/// (migrations, topics), then opens the API and starts the consumer.
pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Application, StartError> {
    let defaults = config.account_defaults()?;
    let mut service = Service::new(
        SERVICE_NAME,
        &config.db,
        config.kafka.clone(),
        config.pipeline.clone(),
        config.tls.clone(),
        shutdown,
    )?;
    service.serve_metrics(config.metrics_addr).await?;
    let api = PaymentServiceServer::with_interceptor(
        grpc::PaymentGrpc {
            pool: service.pool.clone(),
            defaults: defaults.clone(),
        },
        service.readiness().interceptor(),
    );
    service
        .serve_grpc(config.grpc_addr, |router| router.add_service(api))
        .await?;
    service.prepare(&sqlx::migrate!("./migrations")).await?;
    service.ready();
    service.spawn_consumer(
        &[topics::ORDERS],
        OrderSideHandler(consumer::Payments {
            payments_topic: config.kafka.topic(topics::PAYMENTS),
            defaults,
        }),
    )?;
    Ok(service.started())
}
