//! The skeleton every service is built on: connect, open the ports, get
//! ready, run supervised, stop in order. A service's `build` only adds its
//! API, its seed data and its consumer:
//!
//! ```text
//! Service::new ─► serve_grpc (NOT_SERVING, API UNAVAILABLE) ─► prepare
//!   (waits for database and broker; migrations, topics) ─► seed ─► ready
//!   (API open, health follows the dependencies) ─► spawn_consumer ─► started
//! ```
//!
//! The ports open before the dependencies are waited for, so that probes
//! get an answer (`NOT_SERVING`) rather than a refused connection.
//! [`Running::run`] supervises every task (see [`Supervisor`]): a task that
//! ends before shutdown stops the service with an error, which [`main`]
//! turns into a non-zero exit.

use std::{
    future::Future,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use rdkafka::producer::FutureProducer;
use sqlx::{PgPool, migrate::Migrator};
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    broker_identity::{self, IdentityError},
    config::{ConfigError, DbConfig, KafkaConfig, PipelineConfig},
    consumer::{self, ConsumeLoop, EventHandler},
    db::{self, DbError},
    grpc::Router,
    kafka::{self, KafkaError},
    outbox::{Notifier, Relay},
    supervisor::{Supervisor, TaskFailed, TaskResult},
    tls,
};

/// Why a service could not start. Each variant names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid setting: {0}")]
    Setting(String),
    #[error("database: {0}")]
    Db(#[from] DbError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("cannot bind {what}: {source}")]
    Bind {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{step} failed: {source}")]
    Step {
        step: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
}

impl StartError {
    /// For `map_err`: the error of the start-up step named `step` (such as
    /// "seeding stock").
    pub fn step<E>(step: &'static str) -> impl FnOnce(E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        move |e| Self::Step {
            step,
            source: Box::new(e),
        }
    }

    /// Shutdown was asked for while start-up waited: not a failure.
    fn is_cancelled(&self) -> bool {
        matches!(
            self,
            StartError::Db(DbError::Cancelled) | StartError::Kafka(KafkaError::Cancelled)
        )
    }
}

/// Whether start-up has finished (migrations ran, the Kafka cluster is the
/// expected one, topics exist, seed data loaded). Until then the service's
/// API answers UNAVAILABLE and health is `NOT_SERVING`, although its ports are
/// open: probes get an answer. A service that refuses to run (another Kafka
/// cluster, see [`crate::broker_identity`]) says why in that answer.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    refusal: Arc<Mutex<Option<String>>>,
}

impl Readiness {
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Start-up is held back for `reason`, which callers are told.
    pub(crate) fn refuse(&self, reason: String) {
        *self.refusal.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
    }

    pub(crate) fn clear_refusal(&self) {
        *self.refusal.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// A gRPC interceptor for the service's API (not health or reflection).
    pub fn interceptor(
        &self,
    ) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<>
    {
        let ready = self.clone();
        move |request| {
            if ready.is_ready() {
                Ok(request)
            } else {
                Err(ready.unavailable())
            }
        }
    }

    /// What the API answers until ready: UNAVAILABLE, with the reason when
    /// start-up is refused.
    pub fn unavailable(&self) -> tonic::Status {
        match &*self.refusal.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(reason) => tonic::Status::unavailable(reason.clone()),
            None => tonic::Status::unavailable("service is starting; retry shortly"),
        }
    }
}

/// A service being built (see the module docs).
pub struct Service {
    /// The service's database.
    pub pool: PgPool,
    /// The idempotent producer (outbox relay, dead letters).
    pub producer: FutureProducer,
    pub kafka: KafkaConfig,
    pipeline: PipelineConfig,
    supervisor: Supervisor,
    outbox: Notifier,
    /// Started by [`Service::prepare`], once the outbox table exists and
    /// the broker is known to be the right one.
    relay: Option<Relay>,
    health: HealthReporter,
    health_services: Vec<String>,
    readiness: Readiness,
    router: Option<Router>,
    shutdown: CancellationToken,
    tls: tls::Settings,
    grpc_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    health_addr: Option<SocketAddr>,
}

impl Service {
    /// Creates the pool, the producer and the outbox relay for the gRPC
    /// service named `grpc_service` (e.g. `shop.payment.v1.PaymentService`).
    /// The pool and the producer connect lazily, so this succeeds while the
    /// database or broker is down; see [`Service::prepare`]. `tls` applies
    /// to the gRPC and REST listeners (see [`crate::tls`]).
    pub fn new(
        grpc_service: &str,
        db: &DbConfig,
        kafka_cfg: KafkaConfig,
        pipeline: PipelineConfig,
        tls: tls::Settings,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        crate::metrics::install();
        let pool = db::pool(db)?;
        let producer = kafka::producer(&kafka_cfg)?;
        let (router, health) = crate::grpc::router(grpc_service, tls.server.as_ref())
            .map_err(|e| StartError::Setting(format!("TLS of the gRPC server: {e}")))?;
        let health_services = vec![grpc_service.to_owned()];
        let mut supervisor = Supervisor::new();
        supervisor.report_to(health.clone(), health_services.clone());
        let relay = Relay::new(pool.clone(), producer.clone(), kafka_cfg.clone(), &pipeline);
        let outbox = relay.notifier();
        Ok(Self {
            pool,
            producer,
            kafka: kafka_cfg,
            pipeline,
            supervisor,
            outbox,
            relay: Some(relay),
            health,
            health_services,
            readiness: Readiness::default(),
            router: Some(router),
            shutdown,
            tls,
            grpc_addr: None,
            http_addr: None,
            metrics_addr: None,
            health_addr: None,
        })
    }

    /// Gate the service's API with this (see [`Readiness::interceptor`]).
    #[must_use]
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// Wakes the outbox relay; writers call it after they commit.
    #[must_use]
    pub fn outbox(&self) -> Notifier {
        self.outbox.clone()
    }

    /// The service's shutdown token.
    #[must_use]
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Binds `addr` and serves health, reflection and what `add_api` adds
    /// right away, `NOT_SERVING` until [`Service::ready`], over TLS when
    /// configured; with `HEALTH_ADDR` set, also health alone in plaintext
    /// there (for probes). Returns the address bound (port 0 picks a free
    /// one).
    pub async fn serve_grpc(
        &mut self,
        addr: SocketAddr,
        add_api: impl FnOnce(Router) -> Router,
    ) -> Result<SocketAddr, StartError> {
        // tonic-health starts "" as SERVING; nothing is known yet.
        crate::health::set_all(
            &self.health,
            &self.health_services,
            ServingStatus::NotServing,
        )
        .await;
        let router = self
            .router
            .take()
            .ok_or_else(|| StartError::Setting("the gRPC server is served once".to_owned()))?;
        let router = add_api(router);
        let (listener, bound) = bind(addr, "GRPC_ADDR").await?;
        let shutdown = self.shutdown.clone();
        self.supervisor.spawn("gRPC server", async move {
            crate::grpc::serve(router, listener, shutdown).await?;
            Ok(())
        });
        self.grpc_addr = Some(bound);
        if let Some(addr) = self.tls.health_addr {
            let (listener, health_bound) = bind(addr, "HEALTH_ADDR").await?;
            let router = crate::grpc::health_router(&self.health);
            let shutdown = self.shutdown.clone();
            self.supervisor.spawn("health server", async move {
                crate::grpc::serve_health(router, listener, shutdown).await?;
                Ok(())
            });
            self.health_addr = Some(health_bound);
        }
        Ok(bound)
    }

    /// Binds `addr` and serves the REST `router` until shutdown, letting
    /// in-flight requests finish; over TLS (mTLS) when configured, like
    /// gRPC. Handlers find the caller as `ConnectInfo<tls::Peer>`. Returns
    /// the address bound.
    pub async fn serve_http(
        &mut self,
        addr: SocketAddr,
        router: axum::Router,
    ) -> Result<SocketAddr, StartError> {
        let router = router.layer(axum::middleware::from_fn(crate::metrics::track_http));
        let (listener, bound) = bind(addr, "HTTP_ADDR").await?;
        let router = router.layer(crate::grpc::http_trace_layer());
        let shutdown = self.shutdown.clone();
        // The peer (address, certificate) reaches handlers as
        // `ConnectInfo<Peer>` (order's rate limit keys clients by it).
        let app = router.into_make_service_with_connect_info::<tls::Peer>();
        let server_tls = self.tls.server.clone();
        self.supervisor.spawn("REST server", async move {
            let stop = shutdown.cancelled_owned();
            if let Some(server_tls) = server_tls {
                // TLS sets TCP_NODELAY itself, before the handshake.
                let listener = tls::TlsListener::new(listener, &server_tls);
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await?;
            } else {
                // Sets TCP_NODELAY on each connection.
                let listener = tls::PlainListener(listener);
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await?;
            }
            tracing::info!("REST server stopped");
            Ok(())
        });
        self.http_addr = Some(bound);
        Ok(bound)
    }

    /// Binds `addr` and serves Prometheus metrics on `GET /metrics` until
    /// shutdown (see [`crate::metrics`]). Returns the address bound.
    pub async fn serve_metrics(&mut self, addr: SocketAddr) -> Result<SocketAddr, StartError> {
        let (listener, bound) = bind(addr, "METRICS_ADDR").await?;
        let router = crate::metrics::router(self.pool.clone());
        let shutdown = self.shutdown.clone();
        self.supervisor.spawn("metrics server", async move {
            let serve =
                axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned());
            tokio::select! {
                served = serve => served?,
                () = crate::metrics::upkeep() => {}
            }
            tracing::info!("metrics server stopped");
            Ok(())
        });
        self.metrics_addr = Some(bound);
        Ok(bound)
    }

    /// Runs the migrations, checks that the broker is the Kafka cluster
    /// this database belongs with (waiting, refused, while it is not: see
    /// [`crate::broker_identity`]) and creates the pipeline's topics,
    /// waiting (with backoff) for the database and the broker to be
    /// reachable; then starts the outbox relay.
    pub async fn prepare(&mut self, migrator: &Migrator) -> Result<(), StartError> {
        db::migrate(&self.pool, migrator, &self.shutdown).await?;
        let cluster_id =
            broker_identity::verify(&self.pool, &self.producer, &self.readiness, &self.shutdown)
                .await
                .map_err(|e| match e {
                    IdentityError::Cancelled => StartError::Kafka(KafkaError::Cancelled),
                    IdentityError::Db(e) => StartError::step("checking the Kafka cluster")(e),
                })?;
        kafka::ensure_topics(&self.kafka, &crate::topics::ALL, &self.shutdown).await?;
        let watch = broker_identity::watch(
            self.producer.clone(),
            cluster_id,
            self.pipeline.health_interval,
            self.shutdown.clone(),
        );
        self.supervisor.spawn("Kafka cluster watch", watch);
        if let Some(relay) = self.relay.take() {
            self.supervisor
                .spawn_last("outbox relay", |stop| relay.run(stop));
        }
        Ok(())
    }

    /// Start-up is done: the API answers, and health follows the database
    /// and the broker from now on.
    pub fn ready(&mut self) {
        self.readiness.mark_ready();
        let monitor = crate::health::monitor(
            self.pool.clone(),
            self.producer.clone(),
            self.health.clone(),
            self.health_services.clone(),
            self.pipeline.health_interval,
            self.shutdown.clone(),
        );
        self.supervisor.spawn("health monitor", async move {
            monitor.await;
            Ok(())
        });
    }

    /// Subscribes to `topics` (pipeline names, without prefix) and runs
    /// `handler` in the consume loop until shutdown.
    pub fn spawn_consumer<H: EventHandler>(
        &mut self,
        topics: &[&str],
        handler: H,
    ) -> Result<(), StartError> {
        let names: Vec<String> = topics.iter().map(|t| self.kafka.topic(t)).collect();
        let consumer = consumer::subscribe(&self.kafka, &names).map_err(KafkaError::from)?;
        let consume = ConsumeLoop {
            consumer,
            handler,
            pool: self.pool.clone(),
            producer: self.producer.clone(),
            outbox: self.outbox.clone(),
            kafka: self.kafka.clone(),
            topics: names,
            config: self.pipeline.clone(),
        }
        .run(self.shutdown.clone());
        self.supervisor.spawn("consume loop", async move {
            consume.await?;
            Ok(())
        });
        Ok(())
    }

    /// Runs a task of the service's own (such as a sweeper) under the
    /// supervisor: it must stop by itself when [`Service::shutdown`] fires,
    /// and an `Err` or an early end stops the service.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = TaskResult> + Send + 'static,
    {
        self.supervisor.spawn(name, task);
    }

    /// Runs a task at once that is stopped, through the token it is given,
    /// only after every front task (the servers, so every in-flight call)
    /// has finished: a writer that in-flight calls wait on (order's group
    /// commit) must outlive them. Spawn it before [`Service::ready`]: a
    /// call let in before its writer runs would wait for it.
    pub fn spawn_last<F, Fut>(&mut self, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        self.supervisor.spawn_last(name, task);
    }

    /// Start-up is complete.
    pub fn started(self) -> Running {
        tracing::info!(
            grpc_addr = ?self.grpc_addr,
            http_addr = ?self.http_addr,
            metrics_addr = ?self.metrics_addr,
            health_addr = ?self.health_addr,
            tls = self.tls.server.is_some(),
            mtls = self.tls.server.as_ref().is_some_and(tls::ServerTls::requires_client_cert),
            "service started"
        );
        Running {
            grpc_addr: self.grpc_addr.unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
            http_addr: self.http_addr,
            supervisor: self.supervisor,
            shutdown: self.shutdown,
        }
    }
}

async fn bind(
    addr: SocketAddr,
    what: &'static str,
) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    crate::grpc::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, source })
}

/// A started service, bound to its ports, not yet supervised.
pub struct Running {
    grpc_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    supervisor: Supervisor,
    shutdown: CancellationToken,
}

impl Running {
    /// The gRPC address really bound.
    #[must_use]
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The REST address really bound, if the service has one.
    #[must_use]
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Runs until the shutdown token fires, then stops in order. An error
    /// means a task ended on its own (see [`Supervisor::run`]).
    pub async fn run(self) -> Result<(), TaskFailed> {
        self.supervisor.run(self.shutdown).await
    }
}

/// A service binary's whole `main`: logging and tracing, configuration,
/// signals, build, run, flushing traces at exit. Exits 0 after a requested
/// shutdown, 1 when start-up failed or a task died, 2 on invalid
/// configuration, each with a log line that says why.
pub async fn main<C, B, F>(
    service: &str,
    from_env: impl FnOnce() -> Result<C, ConfigError>,
    build: B,
) -> ExitCode
where
    B: FnOnce(C, CancellationToken) -> F,
    F: Future<Output = Result<Running, StartError>>,
{
    let telemetry = crate::telemetry::init(service);
    let code = run_service(from_env, build).await;
    telemetry.shutdown().await;
    code
}

async fn run_service<C, B, F>(
    from_env: impl FnOnce() -> Result<C, ConfigError>,
    build: B,
) -> ExitCode
where
    B: FnOnce(C, CancellationToken) -> F,
    F: Future<Output = Result<Running, StartError>>,
{
    let config = match from_env() {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            return ExitCode::from(2);
        }
    };
    let shutdown = match crate::shutdown::on_signal() {
        Ok(token) => token,
        Err(e) => {
            tracing::error!(error = %StartError::Signals(e), "start-up failed");
            return ExitCode::FAILURE;
        }
    };
    let running = match build(config, shutdown).await {
        Ok(running) => running,
        Err(e) if e.is_cancelled() => {
            tracing::info!("shut down during start-up");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            tracing::error!(error = %e, "start-up failed");
            return ExitCode::FAILURE;
        }
    };
    match running.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "service stopped on a failure; exiting non-zero");
            ExitCode::FAILURE
        }
    }
}
