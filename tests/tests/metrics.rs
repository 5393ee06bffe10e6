//! Prometheus metrics, scraped the way Prometheus does: the three services
//! run as their real binaries (one process each, so every counter belongs
//! to one service), orders go in over gRPC and REST, and the `/metrics` text
//! of each service must show exactly what happened: every counter moved by
//! the number of orders placed, the request histograms counted each call
//! with its status, and once the pipeline is quiet the outbox backlog and
//! every consumer lag are back at 0.
//!
//! A service that is down fails the test: its scrape does not answer.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use e2e::{DEADLINE, create_database, process::ServiceProcess, unique_id};
use shop_proto::order::{GetOrderRequest, OrderStatus, order_service_client::OrderServiceClient};

/// Notes a value that is not the one expected.
fn expect(wrong: &mut Vec<String>, what: &str, got: f64, want: f64) {
    if (got - want).abs() > f64::EPSILON {
        wrong.push(format!("{what}: {got}, expected {want}"));
    }
}

/// The labels of one topic's events of one type.
fn published<'a>(topic: &'a str, event_type: &'a str) -> [(&'static str, &'a str); 2] {
    [("topic", topic), ("event_type", event_type)]
}

/// One parsed scrape: every sample as (name, labels, value).
#[derive(Debug, Default)]
struct Scrape(Vec<(String, BTreeMap<String, String>, f64)>);

impl Scrape {
    /// Parses the text exposition format (the subset any exporter writes:
    /// `name{k="v",...} value`, comments and blank lines).
    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with }");
                    let mut labels = BTreeMap::new();
                    // Our label values hold no `",` sequences.
                    for pair in body.split("\",").filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once("=\"").expect("label is k=\"v\"");
                        labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                    }
                    (name.to_owned(), labels)
                }
            };
            samples.push((name, labels, value));
        }
        Scrape(samples)
    }

    /// The samples of `name` whose labels include `labels`.
    fn series<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a (String, BTreeMap<String, String>, f64)> + 'a {
        self.0.iter().filter(move |(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
        })
    }

    /// The sum of those samples (0 when there is none, as for a counter
    /// never incremented).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series(name, labels).map(|s| s.2).sum()
    }
}

async fn scrape(addr: SocketAddr) -> Result<Scrape, String> {
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .map_err(|e| format!("scrape {addr}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("scrape {addr}: HTTP {}", response.status()));
    }
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "Prometheus text format, got {content_type:?}"
    );
    let text = response.text().await.map_err(|e| e.to_string())?;
    Ok(Scrape::parse(&text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_the_pipeline_did() {
    let id = unique_id();
    let prefix = format!("t{id}.");
    let mut processes = Vec::new();
    for (name, database) in [
        ("payment", "payments"),
        ("inventory", "inventory"),
        ("order", "orders"),
    ] {
        let url = create_database(format!("t_{id}_{database}")).await;
        processes.push(ServiceProcess::start(
            name,
            &id,
            &url,
            &[
                ("DATABASE_MAX_CONNECTIONS", "5".to_owned()),
                ("ORDER_DEADLINE_SECS", "120".to_owned()),
            ],
        ));
    }
    for process in &processes {
        e2e::wait_serving(process.grpc, "").await;
    }
    processes
        .iter_mut()
        .for_each(ServiceProcess::assert_running);
    let (payment, inventory, order) = (
        processes[0].endpoints(),
        processes[1].endpoints(),
        processes[2].endpoints(),
    );
    let order_http = order.http;

    // Before any order: every endpoint answers, the order counters exist at 0.
    for addrs in [payment, inventory, order] {
        scrape(addrs.metrics).await.expect("scrape before");
    }
    let before = scrape(order.metrics).await.expect("scrape order");
    assert_eq!(
        before
            .series("shop_orders_created_total", &[])
            .map(|s| s.2)
            .collect::<Vec<_>>(),
        vec![0.0]
    );

    // 8 orders over gRPC (one of them sent twice with its idempotency key:
    // a replay creates nothing), 4 over REST, one GetOrder of an unknown id.
    let grpc_orders = 8;
    let rest_orders = 4;
    let placed = grpc_orders + rest_orders;
    let mut client = OrderServiceClient::new(e2e::channel(order.grpc).await);
    let mut ids = Vec::new();
    for i in 0..grpc_orders {
        let request = e2e::keyed_order_request(
            &format!("M{id}-{i}"),
            "PROD001",
            1,
            &format!("{id}-key-{i}"),
        );
        let created = client
            .create_order(request.clone())
            .await
            .expect("CreateOrder")
            .into_inner();
        if i == 0 {
            let again = client
                .create_order(request)
                .await
                .expect("CreateOrder replay")
                .into_inner();
            assert_eq!(
                again.order_id, created.order_id,
                "a replay returns the order"
            );
        }
        ids.push(created.order_id);
    }
    let http = reqwest::Client::new();
    for i in 0..rest_orders {
        let response = http
            .post(format!("http://{order_http}/api/v1/orders"))
            .json(&serde_json::json!({
                "customer_id": format!("M{id}-rest-{i}"),
                "product_id": "PROD002",
                "quantity": 1,
            }))
            .send()
            .await
            .expect("POST /api/v1/orders");
        assert_eq!(response.status(), 201);
        let body: serde_json::Value = response.json().await.expect("JSON order");
        ids.push(body["orderId"].as_str().expect("orderId").to_owned());
    }
    let missing = client
        .get_order(GetOrderRequest {
            order_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("an unknown order");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let response = http
        .get(format!(
            "http://{order_http}/api/v1/orders/{}",
            uuid::Uuid::now_v7()
        ))
        .send()
        .await
        .expect("GET unknown order");
    assert_eq!(response.status(), 404);

    // Every order is decided, and all of them confirm (enough stock and credit).
    for order_id in &ids {
        let decided = e2e::eventually(&format!("order {order_id} decided"), || {
            let mut client = client.clone();
            let order_id = order_id.clone();
            async move {
                let order = client
                    .get_order(GetOrderRequest { order_id })
                    .await
                    .ok()?
                    .into_inner();
                (order.status != OrderStatus::Pending as i32).then_some(order)
            }
        })
        .await;
        assert_eq!(decided.status, OrderStatus::Confirmed as i32, "{decided:?}");
    }

    // Counters follow commits and lag follows librdkafka's statistics
    // (every 5 s) and commits (every 1 s): poll until they all agree, or
    // fail with what still disagrees.
    let n = f64::from(placed);
    let topic = |t: &str| format!("{prefix}{t}");
    let (orders_t, payments_t, inventory_t) =
        (topic("orders"), topic("payments"), topic("inventory"));
    let created = "shop.events.v1.OrderCreated";
    let confirmed = "shop.events.v1.OrderConfirmed";
    let paid = "shop.events.v1.PaymentCompleted";
    let reserved = "shop.events.v1.InventoryUpdated";
    let start = Instant::now();
    let (order_m, payment_m, inventory_m) = loop {
        processes
            .iter_mut()
            .for_each(ServiceProcess::assert_running);
        let order_m = scrape(order.metrics).await.expect("scrape order");
        let payment_m = scrape(payment.metrics).await.expect("scrape payment");
        let inventory_m = scrape(inventory.metrics).await.expect("scrape inventory");
        let mut wrong = Vec::new();
        let m = &order_m;
        expect(
            &mut wrong,
            "order created",
            m.sum("shop_orders_created_total", &[]),
            n,
        );
        expect(
            &mut wrong,
            "order CONFIRMED",
            m.sum("shop_orders_decided_total", &[("status", "CONFIRMED")]),
            n,
        );
        expect(
            &mut wrong,
            "order CANCELLED",
            m.sum("shop_orders_decided_total", &[("status", "CANCELLED")]),
            0.0,
        );
        expect(
            &mut wrong,
            "order published OrderCreated",
            m.sum(
                "shop_events_published_total",
                &published(&orders_t, created),
            ),
            n,
        );
        expect(
            &mut wrong,
            "order published OrderConfirmed",
            m.sum(
                "shop_events_published_total",
                &published(&orders_t, confirmed),
            ),
            n,
        );
        for (t, e) in [(&payments_t, paid), (&inventory_t, reserved)] {
            expect(
                &mut wrong,
                &format!("order applied {e}"),
                m.sum(
                    "shop_events_consumed_total",
                    &[("topic", t), ("event_type", e), ("outcome", "applied")],
                ),
                n,
            );
        }
        expect(
            &mut wrong,
            "order CreateOrder OK calls (one replay)",
            m.sum(
                "shop_rpc_server_duration_seconds_count",
                &[
                    ("method", "shop.order.v1.OrderService/CreateOrder"),
                    ("code", "OK"),
                ],
            ),
            f64::from(grpc_orders + 1),
        );
        expect(
            &mut wrong,
            "order GetOrder NOT_FOUND calls",
            m.sum(
                "shop_rpc_server_duration_seconds_count",
                &[
                    ("method", "shop.order.v1.OrderService/GetOrder"),
                    ("code", "NOT_FOUND"),
                ],
            ),
            1.0,
        );
        expect(
            &mut wrong,
            "order POST /api/v1/orders 201",
            m.sum(
                "shop_http_server_duration_seconds_count",
                &[("route", "/api/v1/orders"), ("status", "201")],
            ),
            f64::from(rest_orders),
        );
        expect(
            &mut wrong,
            "order GET /api/v1/orders/{order_id} 404",
            m.sum(
                "shop_http_server_duration_seconds_count",
                &[("route", "/api/v1/orders/{order_id}"), ("status", "404")],
            ),
            1.0,
        );
        for (name, m, result, result_topic) in [
            ("payment", &payment_m, paid, &payments_t),
            ("inventory", &inventory_m, reserved, &inventory_t),
        ] {
            expect(
                &mut wrong,
                &format!("{name} applied OrderCreated"),
                m.sum(
                    "shop_events_consumed_total",
                    &[
                        ("topic", &orders_t),
                        ("event_type", created),
                        ("outcome", "applied"),
                    ],
                ),
                n,
            );
            expect(
                &mut wrong,
                &format!("{name} skipped OrderConfirmed"),
                m.sum(
                    "shop_events_consumed_total",
                    &[
                        ("topic", &orders_t),
                        ("event_type", confirmed),
                        ("outcome", "skipped"),
                    ],
                ),
                n,
            );
            expect(
                &mut wrong,
                &format!("{name} published {result}"),
                m.sum(
                    "shop_events_published_total",
                    &published(result_topic, result),
                ),
                n,
            );
        }
        for (name, m, topics) in [
            ("order", &order_m, vec![&payments_t, &inventory_t]),
            ("payment", &payment_m, vec![&orders_t]),
            ("inventory", &inventory_m, vec![&orders_t]),
        ] {
            for outcome in ["duplicate", "dead_lettered"] {
                expect(
                    &mut wrong,
                    &format!("{name} {outcome}"),
                    m.sum("shop_events_consumed_total", &[("outcome", outcome)]),
                    0.0,
                );
            }
            expect(
                &mut wrong,
                &format!("{name} outbox pending"),
                m.sum("shop_outbox_pending", &[]),
                0.0,
            );
            for t in topics {
                let lags: Vec<f64> = m
                    .series("shop_consumer_lag", &[("topic", t)])
                    .map(|s| s.2)
                    .collect();
                if lags.is_empty() {
                    wrong.push(format!("{name}: no shop_consumer_lag for {t} yet"));
                } else if lags.iter().any(|l| *l != 0.0) {
                    wrong.push(format!("{name}: shop_consumer_lag for {t} is {lags:?}"));
                }
            }
        }
        if wrong.is_empty() {
            break (order_m, payment_m, inventory_m);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "after {DEADLINE:?} the metrics still disagree:\n{}",
            wrong.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // The process and pool metrics are there in every service.
    for (name, m) in [
        ("order", &order_m),
        ("payment", &payment_m),
        ("inventory", &inventory_m),
    ] {
        assert!(
            m.sum("process_resident_memory_bytes", &[]) > 0.0,
            "{name}: process_resident_memory_bytes"
        );
        assert!(
            m.sum("process_cpu_seconds_total", &[]) > 0.0,
            "{name}: process_cpu_seconds_total (with its fraction of a second)"
        );
        for state in ["idle", "active"] {
            assert!(
                m.series("shop_db_pool_connections", &[("state", state)])
                    .count()
                    == 1,
                "{name}: shop_db_pool_connections{{state={state}}}"
            );
        }
    }
    processes
        .iter_mut()
        .for_each(ServiceProcess::assert_running);
}
