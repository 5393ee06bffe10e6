//! The payment service: customer credit accounts, and payment's side of the
//! saga.
//!
//! - [`domain`]: whether an order fits a customer's credit, refunds, and
//!   what a valid credit limit is (pure).
//! - [`store`]: the payments database (accounts, one payment per order).
//! - [`saga`]: consumes `orders`; pays or declines each `OrderCreated`,
//!   refunds on `OrderCancelled`, publishes the results on `payments`
//!   through the outbox.
//! - [`grpc`]: `shop.payment.v1.PaymentService` (payments, accounts, credit
//!   limits); [`error`] maps failures to status codes.
//! - [`Application`]: wires it together on the shared plumbing of `common`.

pub mod domain;
pub mod error;
pub mod grpc;
pub mod saga;
pub mod store;

use std::net::SocketAddr;

use common::{
    config::{self, ConfigError, DbConfig, KafkaConfig, PipelineConfig},
    service::{Infra, StartError, Starting, Supervisor},
    topics,
};
use shop_proto::payment::payment_service_server::{PaymentServiceServer, SERVICE_NAME};
use tokio_util::sync::CancellationToken;

use crate::domain::AccountDefaults;

/// Everything the payment service reads from the environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// `GRPC_ADDR` (default `0.0.0.0:50052`).
    pub grpc_addr: SocketAddr,
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
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            grpc_addr: config::var("GRPC_ADDR", ([0, 0, 0, 0], 50052).into())?,
            default_credit_limit: config::var("DEFAULT_CREDIT_LIMIT_UNITS", 100_000)?,
            default_currency: config::var("DEFAULT_CURRENCY", "USD".to_owned())?,
            db: DbConfig::from_env("payments")?,
            kafka: KafkaConfig::from_env("payment")?,
            pipeline: PipelineConfig::from_env()?,
        })
    }

    /// The account defaults, checked: the database would refuse them on the
    /// first order otherwise, and every order would be dead-lettered.
    fn account_defaults(&self) -> Result<AccountDefaults, StartError> {
        if self.default_credit_limit < 0 {
            return Err(StartError::Other(format!(
                "DEFAULT_CREDIT_LIMIT_UNITS must not be negative, got {}",
                self.default_credit_limit
            )));
        }
        let currency = &self.default_currency;
        if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(StartError::Other(format!(
                "DEFAULT_CURRENCY must be an ISO 4217 code such as USD, got {currency:?}"
            )));
        }
        Ok(AccountDefaults {
            currency: currency.clone(),
            credit_limit: self.default_credit_limit,
        })
    }
}

/// A built, bound, not yet running payment service.
pub struct Application {
    grpc_addr: SocketAddr,
    supervisor: Supervisor,
    shutdown: CancellationToken,
}

impl Application {
    /// Connects, migrates, binds the gRPC port and spawns every task;
    /// [`Application::run`] waits for shutdown.
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, StartError> {
        let defaults = config.account_defaults()?;
        let infra = Infra::new(&config.db, config.kafka.clone(), config.pipeline.clone())?;
        let (supervisor, notifier) = infra.supervisor();

        let (router, reporter) = common::grpc::router(SERVICE_NAME);
        let starting = Starting::new(reporter, SERVICE_NAME);
        let router = router.add_service(PaymentServiceServer::with_interceptor(
            grpc::PaymentGrpc {
                pool: infra.pool.clone(),
                defaults: defaults.clone(),
            },
            starting.readiness().interceptor(),
        ));
        let grpc_addr = infra
            .serve_grpc(&supervisor, router, &starting, config.grpc_addr, &shutdown)
            .await?;
        infra
            .prepare(&sqlx::migrate!("./migrations"), &shutdown)
            .await?;
        infra.ready(&supervisor, starting, &shutdown);
        infra.spawn_consumer(
            &supervisor,
            &[topics::ORDERS],
            saga::PaymentHandler {
                payments_topic: config.kafka.topic(topics::PAYMENTS),
                defaults,
            },
            notifier,
            &shutdown,
        )?;
        tracing::info!(%grpc_addr, "payment service started");
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
