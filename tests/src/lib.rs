//! Helpers for the end-to-end tests: a whole pipeline (order, payment,
//! inventory) started in-process on real PostgreSQL and real Kafka, isolated
//! per test by fresh databases, a topic prefix and consumer group names.
//!
//! The broker and the database server come from `deploy/local/test.sh`
//! (`KAFKA_BROKERS`, `TEST_DATABASE_URL`); nothing here fakes them.

pub mod process;
pub mod scratch_postgres;

use std::{future::Future, net::SocketAddr, time::Duration};

use common::config::{DbConfig, KafkaConfig, PipelineConfig};
use shop_proto::{
    inventory::inventory_service_client::InventoryServiceClient,
    order::{CreateOrderRequest, Order, OrderStatus, order_service_client::OrderServiceClient},
    payment::payment_service_client::PaymentServiceClient,
};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How long a test waits for an asynchronous outcome before failing.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The server's admin URL (a database tests may connect to in order to
/// create their own).
#[must_use]
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://shop:shop@127.0.0.1:5432/postgres".to_owned())
}

#[must_use]
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A short unique id for names of databases, topics and groups.
#[must_use]
pub fn unique_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
}

/// Creates a fresh database and returns its URL.
pub async fn create_database(name: String) -> String {
    let admin = admin_url();
    let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
        panic!("PostgreSQL at {admin} is not reachable (run deploy/local/test.sh): {e}")
    });
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let (base, _) = admin.rsplit_once('/').expect("URL has a database");
    format!("{base}/{name}")
}

/// Pipeline settings tuned for tests: quick health checks and relay polls.
#[must_use]
pub fn test_pipeline_config() -> PipelineConfig {
    PipelineConfig {
        outbox_poll_interval: Duration::from_millis(50),
        health_interval: Duration::from_millis(200),
        ..PipelineConfig::default()
    }
}

/// Kafka settings for one test: its own topic prefix and group names.
#[must_use]
pub fn test_kafka_config(id: &str, service: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers(),
        topic_prefix: format!("t{id}."),
        group_id: format!("t{id}-{service}"),
        group_instance_id: None,
        partitions: 3,
        client_id: format!("t{id}-{service}"),
        debug: String::new(),
        security: common::kafka_security::KafkaSecurity::default(),
    }
}

/// A single-product order in the original system's shape.
#[must_use]
pub fn order_request(customer: &str, product: &str, quantity: i32) -> CreateOrderRequest {
    keyed_order_request(customer, product, quantity, "")
}

/// The same with an idempotency key (empty: none).
#[must_use]
pub fn keyed_order_request(
    customer: &str,
    product: &str,
    quantity: i32,
    key: &str,
) -> CreateOrderRequest {
    CreateOrderRequest {
        customer_id: customer.into(),
        product_id: product.into(),
        quantity,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// A loopback address with a free port, for a service run as a process.
#[must_use]
///
/// Picked below the kernel's ephemeral range (32768 and up on Linux), where
/// the outgoing connections of everything else on the machine take their
/// ports: a port picked there and bound a moment later may meanwhile have
/// become some client connection's local port.
///
/// A port is handed out once per test process: tests run in parallel
/// threads, and a port picked, released and picked again before its first
/// taker binds it would make two services fight over it.
pub fn free_addr() -> SocketAddr {
    use rand::Rng;
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..1000 {
        let port = rand::rng().random_range(20_000..32_000);
        if handed_out.contains(&port) {
            continue;
        }
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            handed_out.push(port);
            return listener.local_addr().expect("bound address");
        }
    }
    panic!("no free loopback port in 20000..32000")
}

/// A service binary of this workspace; they sit next to the test binary's
/// `deps/` folder (`cargo build --bins`, which `deploy/local/test.sh` runs).
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (deploy/local/test.sh does)",
        path.display()
    );
    path
}

/// A running pipeline; stopped (gracefully) by [`Pipeline::stop`] or when
/// dropped.
pub struct Pipeline {
    pub id: String,
    /// The broker it runs against.
    pub brokers: String,
    pub order_grpc: SocketAddr,
    pub order_http: SocketAddr,
    pub payment_grpc: SocketAddr,
    pub inventory_grpc: SocketAddr,
    pub orders_db: PgPool,
    pub payments_db: PgPool,
    pub inventory_db: PgPool,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<Result<(), String>>>,
}

/// Options a test may change before starting a pipeline.
#[derive(Clone, Debug)]
pub struct Options {
    pub order_deadline: Duration,
    /// false: inventory never runs, so no order gets its stock result.
    pub run_inventory: bool,
    /// How long published outbox rows are kept.
    pub outbox_retention: Duration,
    /// Run on the databases (and topic names) of the earlier pipeline with
    /// this id instead of fresh ones.
    pub reuse: Option<String>,
    /// Bootstrap servers, when not the shared test broker.
    pub brokers: Option<String>,
    /// Whether [`Pipeline::start_with`] waits until every service reports
    /// SERVING.
    pub wait_serving: bool,
    /// The order service's intake limits, when not its environment's.
    pub intake: Option<order::intake::Limits>,
    /// The order service's group commit, when not its environment's.
    pub group_commit: Option<order::group_commit::Settings>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            order_deadline: Duration::from_secs(120),
            run_inventory: true,
            outbox_retention: Duration::from_secs(3600),
            reuse: None,
            brokers: None,
            wait_serving: true,
            intake: None,
            group_commit: None,
        }
    }
}

/// Builds and runs one service in a task; start-up and run errors come
/// back as text.
fn launch<F>(started: F) -> JoinHandle<Result<(), String>>
where
    F: Future<Output = Result<common::service::Running, common::service::StartError>>
        + Send
        + 'static,
{
    tokio::spawn(async move {
        let outcome = match started.await {
            Ok(running) => running.run().await.map_err(|e| e.to_string()),
            Err(e) => Err(format!("start-up: {e}")),
        };
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "a service of the test pipeline stopped");
        }
        outcome
    })
}

impl Pipeline {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        common::telemetry::init_for_tests();
        let shutdown = CancellationToken::new();
        let brokers = options.brokers.clone().unwrap_or_else(brokers);
        let (id, urls) = if let Some(id) = &options.reuse {
            let (base, _) = admin_url()
                .rsplit_once('/')
                .map(|(b, d)| (b.to_owned(), d.to_owned()))
                .expect("URL has a database");
            let url = |db: &str| format!("{base}/t_{id}_{db}");
            (
                id.clone(),
                (url("orders"), url("payments"), url("inventory")),
            )
        } else {
            let id = unique_id();
            let urls = tokio::join!(
                create_database(format!("t_{id}_orders")),
                create_database(format!("t_{id}_payments")),
                create_database(format!("t_{id}_inventory")),
            );
            (id, urls)
        };
        let (orders_url, payments_url, inventory_url) = urls;
        let pipeline_config = || PipelineConfig {
            outbox_retention: options.outbox_retention,
            ..test_pipeline_config()
        };
        let db = |url: &str| DbConfig {
            url: url.into(),
            max_connections: 5,
        };
        let kafka = |service: &str| KafkaConfig {
            brokers: brokers.clone(),
            ..test_kafka_config(&id, service)
        };
        // Ports picked here rather than port 0, so that the addresses are
        // known while start-up may still be waiting.
        let (order_grpc, order_http, payment_grpc, inventory_grpc) =
            (free_addr(), free_addr(), free_addr(), free_addr());

        let mut payment_cfg = payment::Config::from_env().expect("payment config");
        payment_cfg.metrics_addr = ([127, 0, 0, 1], 0).into();
        payment_cfg.grpc_addr = payment_grpc;
        payment_cfg.db = db(&payments_url);
        payment_cfg.kafka = kafka("payment");
        payment_cfg.pipeline = pipeline_config();

        let mut inventory_cfg = inventory::Config::from_env().expect("inventory config");
        inventory_cfg.metrics_addr = ([127, 0, 0, 1], 0).into();
        inventory_cfg.grpc_addr = inventory_grpc;
        inventory_cfg.db = db(&inventory_url);
        inventory_cfg.kafka = kafka("inventory");
        inventory_cfg.pipeline = pipeline_config();

        let mut order_cfg = order::Config::from_env().expect("order config");
        order_cfg.metrics_addr = ([127, 0, 0, 1], 0).into();
        order_cfg.grpc_addr = order_grpc;
        order_cfg.http_addr = order_http;
        order_cfg.deadline = options.order_deadline;
        order_cfg.sweep_interval = Duration::from_millis(200);
        order_cfg.db = db(&orders_url);
        order_cfg.kafka = kafka("order");
        order_cfg.pipeline = pipeline_config();
        if let Some(limits) = &options.intake {
            order_cfg.intake = limits.clone();
        }
        if let Some(settings) = &options.group_commit {
            order_cfg.group_commit = settings.clone();
        }

        let mut tasks = vec![
            launch(payment::build(payment_cfg, shutdown.clone())),
            launch(order::build(order_cfg, shutdown.clone())),
        ];
        let mut serving = vec![order_grpc, payment_grpc];
        if options.run_inventory {
            tasks.push(launch(inventory::build(inventory_cfg, shutdown.clone())));
            serving.push(inventory_grpc);
        }
        let pipeline = Self {
            brokers,
            order_grpc,
            order_http,
            payment_grpc,
            inventory_grpc,
            orders_db: PgPool::connect(&orders_url).await.expect("orders db"),
            payments_db: PgPool::connect(&payments_url).await.expect("payments db"),
            inventory_db: PgPool::connect(&inventory_url).await.expect("inventory db"),
            tasks,
            id,
            shutdown,
        };
        if options.wait_serving {
            for addr in serving {
                pipeline.wait_serving(addr).await;
            }
        }
        pipeline
    }

    /// Waits until the service at `addr` reports SERVING; fails at once if
    /// a service of this pipeline stopped (start-up error or failure).
    pub async fn wait_serving(&self, addr: SocketAddr) {
        eventually(&format!("{addr} to report SERVING"), || async {
            assert!(
                !self.tasks.iter().any(tokio::task::JoinHandle::is_finished),
                "a service of the pipeline stopped while starting"
            );
            (health(addr, "").await == Some(SERVING)).then_some(())
        })
        .await;
    }

    /// The full name of a pipeline topic in this test.
    #[must_use]
    pub fn topic(&self, name: &str) -> String {
        format!("t{}.{name}", self.id)
    }

    pub async fn orders(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::new(channel(self.order_grpc).await)
    }

    pub async fn payments(&self) -> PaymentServiceClient<Channel> {
        PaymentServiceClient::new(channel(self.payment_grpc).await)
    }

    pub async fn inventory(&self) -> InventoryServiceClient<Channel> {
        InventoryServiceClient::new(channel(self.inventory_grpc).await)
    }

    #[must_use]
    pub fn rest_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.order_http)
    }

    /// Places an order over gRPC; panics if it is not accepted.
    pub async fn create(&self, request: CreateOrderRequest) -> Order {
        self.orders()
            .await
            .create_order(request)
            .await
            .expect("CreateOrder")
            .into_inner()
    }

    /// Places an order and waits until it is decided; returns it as
    /// accepted and as decided.
    pub async fn place(&self, request: CreateOrderRequest) -> (Order, Order) {
        let created = self.create(request).await;
        let decided = self.final_order(&created.order_id).await;
        (created, decided)
    }

    /// Polls `GetPayment` until the order's payment is REFUNDED.
    pub async fn refunded_payment(&self, order_id: &str) -> shop_proto::payment::Payment {
        let client = self.payments().await;
        eventually(&format!("the payment of {order_id} to be refunded"), || {
            let mut client = client.clone();
            let order_id = order_id.to_owned();
            async move {
                let payment = client
                    .get_payment(shop_proto::payment::GetPaymentRequest { order_id })
                    .await
                    .ok()?
                    .into_inner();
                (payment.status == shop_proto::payment::PaymentStatus::Refunded as i32)
                    .then_some(payment)
            }
        })
        .await
    }

    /// Polls `GetOrder` until the order leaves PENDING.
    pub async fn final_order(&self, order_id: &str) -> Order {
        let client = self.orders().await;
        eventually(&format!("order {order_id} to leave PENDING"), || {
            let mut client = client.clone();
            let order_id = order_id.to_owned();
            async move {
                let order = client
                    .get_order(shop_proto::order::GetOrderRequest { order_id })
                    .await
                    .ok()?
                    .into_inner();
                (order.status != OrderStatus::Pending as i32).then_some(order)
            }
        })
        .await
    }

    /// A producer for injecting records (duplicates, garbage) in tests.
    pub fn producer(&self) -> rdkafka::producer::FutureProducer {
        common::kafka::producer(&self.kafka()).expect("producer")
    }

    /// Kafka settings that address this test's topics.
    #[must_use]
    pub fn kafka(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers.clone(),
            ..test_kafka_config(&self.id, "test")
        }
    }

    /// Every record now on one of this test's topics.
    #[must_use]
    pub fn records(&self, name: &str) -> Vec<rdkafka::message::OwnedMessage> {
        shopctl::topic::read_all(&self.kafka(), &self.topic(name)).expect("read topic")
    }

    /// A consumer counter (`duplicates_suppressed`, `dead_lettered`) of one
    /// service's database for one of this test's topics.
    pub async fn counter(&self, db: &PgPool, topic: &str, name: &str) -> i64 {
        sqlx::query_scalar("SELECT value FROM consumer_counters WHERE topic = $1 AND name = $2")
            .bind(self.topic(topic))
            .bind(name)
            .fetch_optional(db)
            .await
            .expect("read counter")
            .unwrap_or(0)
    }

    /// The invariant checker's view of this pipeline.
    #[must_use]
    pub fn invariant_sources(&self) -> shopctl::invariants::Sources {
        shopctl::invariants::Sources {
            orders: self.orders_db.clone(),
            payments: self.payments_db.clone(),
            inventory: self.inventory_db.clone(),
            kafka: self.kafka(),
        }
    }

    /// Graceful shutdown: waits until every task has stopped.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            if let Err(failed) = task.await.expect("service task panicked") {
                panic!("a service stopped on a failure: {failed}");
            }
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// The health status of `service` at `addr`, or None if unreachable.
pub async fn health(addr: SocketAddr, service: &str) -> Option<i32> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    Some(reply.into_inner().status)
}

pub const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
pub const NOT_SERVING: i32 =
    tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// Waits until `addr` reports SERVING for `service`.
pub async fn wait_serving(addr: SocketAddr, service: &str) {
    eventually(&format!("{addr} to report SERVING"), || async {
        (health(addr, service).await == Some(SERVING)).then_some(())
    })
    .await;
}

/// Polls `check` every 50 ms until it returns Some, failing the test after
/// [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() <= DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
