//! The fault suite: under a steady load of orders, real processes are
//! killed with SIGKILL, the broker and PostgreSQL are restarted, and a
//! consumer group loses a member mid-stream. Then the invariant checker
//! reads the three databases and the topics and asserts that nothing was
//! lost or done twice.
//!
//! The services run as their real binaries (built by `cargo build --bins`,
//! which `deploy/local/test.sh` does first). The broker and PostgreSQL are
//! the shared ones, restarted with `deploy/local/{kafka,postgres}.sh`:
//! cargo runs test binaries one at a time, and this file holds one test, so
//! nothing else runs meanwhile.
//!
//! `FAULT_ROUNDS` (default 2) repeats the whole fault list; raise it for a
//! soak. `FAULT_RATE` (default 40) is the offered load in orders/s.
//! `FAULT_RUST_LOG` (default `info,sqlx=warn,rdkafka=warn`) is the services'
//! `RUST_LOG`, and `FAULT_KEEP_LOGS=1` keeps their logs (in
//! `$TMPDIR/shop-faults-<id>`) after a green run too; a failing run always
//! keeps them. With `KAFKA_DEBUG` and `FAULT_RUST_LOG=…,librdkafka=debug`
//! they hold librdkafka's own account of a broker restart.

use std::{
    collections::HashMap,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use e2e::{binary, eventually, free_addr};
use rand::Rng;
use shop_proto::order::{
    CreateOrderRequest, GetOrderRequest, OrderStatus, order_service_client::OrderServiceClient,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

/// One service process that the suite starts, kills and restarts.
struct Service {
    name: String,
    binary: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    grpc: SocketAddr,
    child: Option<Child>,
}

impl Service {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.binary)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
            child.wait().expect("reap");
        }
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().expect("try_wait").is_none() {
                assert!(
                    Instant::now() < deadline,
                    "{} ignored SIGTERM for 30 s",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a `deploy/local` script; returns what it logged (its stderr).
fn script(name: &str, action: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/local")
        .join(name);
    let out = Command::new(&path)
        .arg(action)
        .output()
        .expect("run script");
    let logged = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{} {action}: {logged}",
        path.display()
    );
    logged
}

#[derive(Default)]
struct LoadFigures {
    accepted: Mutex<Vec<String>>,
    retries: AtomicU64,
}

/// Offers `rate` orders/s until `stop`. Each order has its own idempotency
/// key and is retried with it until accepted, so an order service killed
/// mid-request neither loses nor doubles an order.
async fn offer_load(
    addr: SocketAddr,
    rate: u32,
    figures: Arc<LoadFigures>,
    stop: CancellationToken,
) {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    // Each worker offers an order every `period` on a fixed schedule (a slow
    // call delays only its own worker's next tick), at most 25 orders/s, so
    // that FAULT_RATE=1000 runs 40 workers and is really offered.
    let workers = (rate / 25).max(8);
    let period = Duration::from_secs_f64(f64::from(workers) / f64::from(rate));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let mut client = OrderServiceClient::new(channel.clone());
        let figures = figures.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.is_cancelled() {
                ticks.tick().await;
                let request = {
                    let mut rng = rand::rng();
                    // Mostly plentiful products; some PROD020 (3 units) for
                    // stock-outs; up to 3 of an expensive one exceed a new
                    // customer's credit: declines, then refunds.
                    let product = if rng.random_ratio(1, 20) {
                        20
                    } else {
                        rng.random_range(1..=18)
                    };
                    CreateOrderRequest {
                        customer_id: format!("CUST-F{:04}", rng.random_range(0..2000)),
                        product_id: format!("PROD{product:03}"),
                        quantity: rng.random_range(1..=3),
                        idempotency_key: uuid::Uuid::now_v7().to_string(),
                        ..Default::default()
                    }
                };
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    match client.create_order(request.clone()).await {
                        Ok(reply) => {
                            figures
                                .accepted
                                .lock()
                                .unwrap()
                                .push(reply.into_inner().order_id);
                            break;
                        }
                        Err(status)
                            if Instant::now() < deadline
                                && status.code() != Code::InvalidArgument =>
                        {
                            figures.retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(status) => panic!("order not accepted within 120 s: {status:?}"),
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("load worker");
    }
}

/// Time from a fault until a new order is decided again.
async fn recovery(addr: SocketAddr, since: Instant) -> Duration {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let client = OrderServiceClient::new(channel);
    let key = uuid::Uuid::now_v7().to_string();
    let order_id = eventually("a probe order to be accepted", || {
        let mut client = client.clone();
        let key = key.clone();
        async move {
            let request = CreateOrderRequest {
                customer_id: "CUST-PROBE".into(),
                product_id: "PROD013".into(),
                quantity: 1,
                idempotency_key: key,
                ..Default::default()
            };
            Some(
                client
                    .create_order(request)
                    .await
                    .ok()?
                    .into_inner()
                    .order_id,
            )
        }
    })
    .await;
    eventually("the probe order to be decided", || {
        let order_id = order_id.clone();
        let mut client = client.clone();
        async move {
            let order = client
                .get_order(GetOrderRequest { order_id })
                .await
                .ok()?
                .into_inner();
            (order.status != OrderStatus::Pending as i32).then_some(())
        }
    })
    .await;
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_lost_nothing_done_twice_under_faults() {
    let rounds: u32 = std::env::var("FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rate: u32 = std::env::var("FAULT_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    // What earlier test binaries left makes every restart slower, more so on
    // a loaded machine: a restarted broker leads each partition it holds
    // again, and its group coordinator loads only once the last is led (after
    // a whole test run, 1,494 partitions kept the consumers from joining 10 s
    // longer); PostgreSQL's crash recovery first fsyncs every file of the
    // cluster (~180 test databases: 56 s instead of 1 s). Nothing else runs
    // meanwhile (see the module docs).
    tokio::task::spawn_blocking(|| {
        script("kafka.sh", "delete-test-topics");
        script("postgres.sh", "drop-test-databases");
    })
    .await
    .unwrap();
    let id = e2e::unique_id();
    let workdir = std::env::temp_dir().join(format!("shop-faults-{id}"));
    std::fs::create_dir_all(&workdir).unwrap();
    let (orders_url, payments_url, inventory_url) = tokio::join!(
        e2e::create_database(format!("t_{id}_orders")),
        e2e::create_database(format!("t_{id}_payments")),
        e2e::create_database(format!("t_{id}_inventory")),
    );
    let rust_log = std::env::var("FAULT_RUST_LOG")
        .unwrap_or_else(|_| "info,sqlx=warn,rdkafka=warn".to_owned());
    let common_env = |service: &str, db: &str, grpc: SocketAddr| -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), db.into()),
            ("KAFKA_BROKERS".into(), e2e::brokers()),
            ("KAFKA_TOPIC_PREFIX".into(), format!("t{id}.")),
            ("KAFKA_GROUP_ID".into(), format!("t{id}-{service}")),
            ("KAFKA_PARTITIONS".into(), "6".into()),
            ("GRPC_ADDR".into(), grpc.to_string()),
            ("METRICS_ADDR".into(), free_addr().to_string()),
            ("HEALTH_CHECK_INTERVAL_MS".into(), "250".into()),
            ("OUTBOX_POLL_INTERVAL_MS".into(), "50".into()),
            ("RUST_LOG".into(), rust_log.clone()),
        ]
    };
    let mut services: HashMap<&str, Service> = HashMap::new();
    // Every service is a static group member named after its key, as up.sh
    // runs them: a member killed and started again, or cut off by a broker
    // restart, takes its place back at once. (A dynamic one joins next to its
    // dead self and its whole group waits out the dead one's session: 5-9 s a
    // kill.) The key is its Kafka client id too.
    let mut add = |key: &'static str, binary_name: &str, db: &str, extra: Vec<(String, String)>| {
        let grpc = free_addr();
        let mut env = common_env(binary_name, db, grpc);
        env.push(("KAFKA_CLIENT_ID".into(), key.into()));
        env.push(("KAFKA_GROUP_INSTANCE_ID".into(), key.into()));
        env.extend(extra);
        services.insert(
            key,
            Service {
                name: key.to_owned(),
                binary: binary(binary_name),
                env,
                log: workdir.join(format!("{key}.log")),
                grpc,
                child: None,
            },
        );
    };
    add(
        "order",
        "order",
        &orders_url,
        vec![
            ("HTTP_ADDR".into(), free_addr().to_string()),
            // Long enough that recovery, not the deadline, decides orders.
            ("ORDER_DEADLINE_SECS".into(), "90".into()),
        ],
    );
    add("payment-a", "payment", &payments_url, vec![]);
    add("payment-b", "payment", &payments_url, vec![]);
    add("inventory", "inventory", &inventory_url, vec![]);
    for service in services.values_mut() {
        service.start();
    }
    for service in services.values() {
        e2e::wait_serving(service.grpc, "").await;
    }
    let order_addr = services["order"].grpc;

    let figures = Arc::new(LoadFigures::default());
    let stop_load = CancellationToken::new();
    let load_started = Instant::now();
    let load = tokio::spawn(offer_load(
        order_addr,
        rate,
        figures.clone(),
        stop_load.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let outbox_dbs: HashMap<&str, PgPool> = HashMap::from([
        ("order", PgPool::connect_lazy(&orders_url).unwrap()),
        ("payment-a", PgPool::connect_lazy(&payments_url).unwrap()),
        ("inventory", PgPool::connect_lazy(&inventory_url).unwrap()),
    ]);
    // Event ids of the outbox rows each killed relay left unpublished.
    let mut left_pending: Vec<uuid::Uuid> = Vec::new();
    let started = Instant::now();
    let mut faults: Vec<(String, Duration)> = Vec::new();
    let mut coordinator_restarts = 0;
    for round in 1..=rounds {
        let plan = [
            "kill -9 payment-a",
            "kill -9 inventory",
            "kill -9 order",
            "restart kafka",
            // Once more with every service left running: a restart longer
            // than the session can fence the static members (their next
            // commit under a lapsed member id), and one fenced after both
            // must join again rather than stop; the consumers must also find
            // the group coordinator again right after its last return.
            "restart kafka again",
            "restart postgres",
            "rebalance payment",
        ];
        for fault in plan {
            let t0 = Instant::now();
            match fault {
                "kill -9 payment-a" | "kill -9 inventory" | "kill -9 order" => {
                    let name = fault.trim_start_matches("kill -9 ");
                    let service = services.get_mut(name).unwrap();
                    service.kill9();
                    // What the dead relay left unpublished: the restarted one
                    // must publish it (and consumers drop what it repeats),
                    // checked against the topics once the pipeline settles.
                    let db = &outbox_dbs[name];
                    let pending: Vec<uuid::Uuid> = sqlx::query_scalar(
                        "SELECT event_id FROM outbox WHERE published_at IS NULL",
                    )
                    .fetch_all(db)
                    .await
                    .unwrap();
                    left_pending.extend(pending);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    services.get_mut(name).unwrap().start();
                }
                "restart kafka" | "restart kafka again" => {
                    // Round 1 a clean restart, later rounds a SIGKILL of the
                    // broker; the second restart is always a clean one.
                    let hard = round > 1 && fault == "restart kafka";
                    let logged = tokio::task::spawn_blocking(move || {
                        if hard {
                            script("kafka.sh", "kill");
                            script("kafka.sh", "start")
                        } else {
                            script("kafka.sh", "restart")
                        }
                    })
                    .await
                    .unwrap();
                    // kafka.sh restarts a broker whose group coordinator
                    // loaded from a stale epoch after an unclean stop (a Kafka
                    // 4.1.1 race that leaves groups unable to join).
                    coordinator_restarts += logged.matches("restarting Kafka cleanly").count();
                }
                "restart postgres" => {
                    let hard = round > 1;
                    tokio::task::spawn_blocking(move || {
                        if hard {
                            script("postgres.sh", "kill");
                            script("postgres.sh", "start");
                        } else {
                            script("postgres.sh", "restart");
                        }
                    })
                    .await
                    .unwrap();
                }
                "rebalance payment" => {
                    // Two members of one group; one dies mid-stream, the other
                    // takes its partitions, then it comes back.
                    let b = services.get_mut("payment-b").unwrap();
                    b.kill9();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let took_over = recovery(order_addr, t0).await;
                    let b = services.get_mut("payment-b").unwrap();
                    b.start();
                    e2e::wait_serving(b.grpc, "").await;
                    faults.push((
                        format!("round {round}: kill -9 payment-b (one of two in the group)"),
                        took_over,
                    ));
                    continue;
                }
                _ => unreachable!(),
            }
            let took = recovery(order_addr, t0).await;
            faults.push((format!("round {round}: {fault}"), took));
        }
    }
    // One graceful stop and start too: SIGTERM must commit and flush.
    let t0 = Instant::now();
    let service = services.get_mut("payment-a").unwrap();
    service.terminate();
    service.start();
    faults.push(("SIGTERM payment-a".into(), recovery(order_addr, t0).await));

    stop_load.cancel();
    load.await.expect("load generator");
    let load_time = load_started.elapsed();
    let fault_phase = started.elapsed();

    let pool = |url: &str| PgPool::connect_lazy(url).unwrap();
    let sources = shopctl::invariants::Sources {
        orders: pool(&orders_url),
        payments: pool(&payments_url),
        inventory: pool(&inventory_url),
        kafka: e2e::test_kafka_config(&id, "checker"),
    };
    // The pipeline settles (compensations, relays) within the deadline; the
    // checker must then find no violation.
    let mut last = None;
    let settle = Instant::now();
    let report = loop {
        let report = shopctl::invariants::check(&sources)
            .await
            .expect("checker runs");
        if report.ok() {
            break report;
        }
        if settle.elapsed() > Duration::from_secs(120) {
            for service in services.values() {
                let log = std::fs::read_to_string(&service.log).unwrap_or_default();
                let tail: Vec<_> = log.lines().rev().take(15).collect();
                eprintln!(
                    "--- {} log tail ---\n{}",
                    service.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            panic!(
                "invariants violated after 120 s: {:#?}",
                last.unwrap_or(report)
            );
        }
        last = Some(report);
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let settled_in = settle.elapsed();

    // Every row a killed relay left pending reached its topic since (the
    // checker sees only the rows still in the outboxes; these may have
    // been pruned).
    let on_topics = shopctl::invariants::published_event_ids(&sources.kafka)
        .await
        .expect("read the topics");
    let never_published: Vec<_> = left_pending
        .iter()
        .filter(|id| !on_topics.contains(id))
        .collect();
    assert!(
        never_published.is_empty(),
        "{} of the {} outbox rows killed relays left pending are not on the topics: {never_published:?}",
        never_published.len(),
        left_pending.len()
    );

    let accepted_ids: Vec<uuid::Uuid> = figures
        .accepted
        .lock()
        .unwrap()
        .iter()
        .map(|id| id.parse().unwrap())
        .collect();
    let accepted = i64::try_from(accepted_ids.len()).expect("a count fits in i64");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE order_id = ANY($1)")
        .bind(&accepted_ids)
        .fetch_one(&sources.orders)
        .await
        .unwrap();
    assert_eq!(
        stored, accepted,
        "every order the client saw accepted is stored"
    );
    let f = &report.figures;
    assert!(
        f.confirmed > 0 && f.cancelled > 0,
        "the load exercised both outcomes: {f:?}"
    );
    assert_eq!(f.dead_letters, 0, "no valid event was dead-lettered");
    let max_recovery = faults.iter().map(|(_, d)| *d).max().unwrap();
    // Written past the harness's capture so that the figures show in CI.
    let mut out = std::io::stderr().lock();
    writeln!(
        out,
        "\n== fault suite: {rounds} rounds, {} faults in {:.0?} at {rate} orders/s offered \
         ({:.0} orders/s accepted over the {:.0?} of load)",
        faults.len(),
        fault_phase,
        f64::from(u32::try_from(figures.accepted.lock().unwrap().len()).unwrap_or(u32::MAX))
            / load_time.as_secs_f64(),
        load_time
    )
    .unwrap();
    for (fault, took) in &faults {
        writeln!(out, "   {fault:<50} decided again after {took:.1?}").unwrap();
    }
    // Recoveries only the services' logs tell of (their counters start
    // again with every restart): a relay that replaced a producer the
    // broker no longer acknowledged, a static member fenced by the broker
    // that joined again, and a consumer whose group join never completed
    // that joined again.
    let logged = |needle: &str| -> usize {
        services
            .values()
            .map(|s| std::fs::read_to_string(&s.log).unwrap_or_default())
            .map(|text| text.matches(needle).count())
            .sum()
    };
    writeln!(
        out,
        "   relay producers replaced {}, fenced static members joined again {}, consumers stuck out of their group joined again {}, \
         brokers restarted again for a stale group-coordinator load {coordinator_restarts}",
        logged("relaying with a new producer"),
        logged("static group member was fenced"),
        logged("the group's join never"),
    )
    .unwrap();
    writeln!(
        out,
        "   orders {} (accepted by the load client {accepted}, the rest are probes; client retries {}): confirmed {}, cancelled {}\n   \
         outbox rows a killed relay left pending {} (all published since), duplicate records on topics {}, \
         duplicates suppressed by consumers {}, dead letters {}\n   \
         charged {} = confirmed totals {}; refunds {}; releases {}; max recovery {max_recovery:.1?}; settled in {:.1?}\n   \
         invariants: OK",
        f.orders,
        figures.retries.load(Ordering::Relaxed),
        f.confirmed,
        f.cancelled,
        left_pending.len(),
        f.duplicate_records,
        f.duplicates_suppressed,
        f.dead_letters,
        f.charged_units,
        f.confirmed_total_units,
        f.refunded_payments,
        f.released_reservations,
        settled_in,
    )
    .unwrap();
    drop(out);
    for service in services.values_mut() {
        service.terminate();
    }
    if std::env::var_os("FAULT_KEEP_LOGS").is_some() {
        println!("service logs kept in {}", workdir.display());
    } else {
        let _ = std::fs::remove_dir_all(&workdir);
    }
}
