//! Group commit at intake (`order/src/group_commit.rs`): concurrent
//! `CreateOrder` calls are written in one transaction, and each still gets
//! its own outcome.
//!
//! Each scenario makes its requests really land in one group: it holds a
//! lock that blocks every insert into `orders`, occupies each writer with
//! one "plug" order (seen waiting on the lock in `pg_stat_activity`), sends
//! the scenario's requests together and waits until all of them are queued
//! (the `shop_order_intake_queued` gauge), then releases the lock: the first
//! writer free takes the whole queue. That it did is asserted twice: the
//! orders share one transaction id (`xmin`), and the group-size histogram
//! counted exactly one group of that size.
//!
//! The services run in this test process, so the metrics read here are this
//! process's: the scenarios run one at a time ([`SERIAL`]).

use std::{collections::HashMap, time::Duration};

use e2e::{Options, Pipeline, eventually, keyed_order_request, order_request};
use futures::future::join_all;
use prost::Message;
use rdkafka::Message as _;
use shop_proto::{
    EventName, events,
    order::{CreateOrderRequest, LineItem, Order},
};
use sqlx::Connection;
use tonic::Code;
use uuid::Uuid;

/// Writers of the pipelines here; each gets one plug order.
const WRITERS: usize = 2;

/// One scenario at a time: the metrics are the process's.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start() -> Pipeline {
    Pipeline::start_with(Options {
        group_commit: Some(order::group_commit::Settings {
            writers: WRITERS,
            group_max: 256,
            queue_max: 1024,
        }),
        // Queued requests wait for the test to release the lock: no shedding.
        intake: Some(order::intake::Limits {
            queue_timeout: Duration::from_secs(60),
            ..order::intake::Limits::default()
        }),
        ..Options::default()
    })
    .await
}

/// A whole-number value of this process's metrics (the first series of
/// that name; 0 before it exists).
fn metric(name: &str) -> usize {
    let text = common::metrics::install().render();
    let value: f64 = text
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            Some(value.parse().expect("a number"))
        })
        .unwrap_or(0.0);
    // Counts, sizes and gauges of requests: small whole numbers.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let whole = value.round() as usize;
    whole
}

/// Requests and groups the writers have taken so far (histogram sum, count).
fn groups() -> (usize, usize) {
    (
        metric("shop_order_group_size_sum"),
        metric("shop_order_group_size_count"),
    )
}

/// Sends `requests` so that those that reach the writers (`queued` of them;
/// the others are refused before) are written as one group; returns each
/// call's result, in order.
async fn in_one_group(
    p: &Pipeline,
    requests: Vec<CreateOrderRequest>,
    queued: usize,
) -> Vec<Result<Order, tonic::Status>> {
    let held = Held::start(p, requests, queued).await;
    held.release().await
}

type Call = tokio::task::JoinHandle<Result<Order, tonic::Status>>;

/// Requests queued behind writers that the lock holds.
struct Held {
    lock: sqlx::PgConnection,
    plugs: Vec<Call>,
    calls: Vec<Call>,
}

impl Held {
    async fn start(p: &Pipeline, requests: Vec<CreateOrderRequest>, queued: usize) -> Self {
        let mut lock = sqlx::PgConnection::connect(&orders_url(p))
            .await
            .expect("connect");
        sqlx::raw_sql("BEGIN; LOCK TABLE orders IN EXCLUSIVE MODE")
            .execute(&mut lock)
            .await
            .expect("lock orders");
        // A connection carries at most MAX_CONCURRENT_STREAMS calls at once
        // (the rest would wait in the client, never reaching the queue):
        // enough connections for every call (the plugs and the requests)
        // to be in the server together.
        let per_connection = common::grpc::MAX_CONCURRENT_STREAMS as usize;
        let mut connections = Vec::new();
        for _ in 0..(WRITERS + requests.len()).div_ceil(per_connection) {
            connections.push(p.orders().await);
        }
        let mut next_call = 0;
        let mut send = |request: CreateOrderRequest| {
            let mut orders = connections[next_call / per_connection].clone();
            next_call += 1;
            tokio::spawn(async move {
                orders
                    .create_order(request)
                    .await
                    .map(tonic::Response::into_inner)
            })
        };
        // One plug per writer, each alone in its group, held by the lock.
        let plugs: Vec<Call> = (0..WRITERS)
            .map(|i| send(order_request(&format!("PLUG{i}"), "PROD001", 1)))
            .collect();
        eventually("every writer to wait on the lock", || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%INSERT INTO orders%'",
            )
            .fetch_one(&p.orders_db)
            .await
            .ok()?;
            (usize::try_from(waiting).ok()? == WRITERS).then_some(())
        })
        .await;
        let calls: Vec<Call> = requests.into_iter().map(send).collect();
        eventually("the requests to queue behind the busy writers", || async {
            (metric("shop_order_intake_queued") == queued).then_some(())
        })
        .await;
        Self { lock, plugs, calls }
    }

    /// Lets the writers go; each call's result, in order.
    async fn release(mut self) -> Vec<Result<Order, tonic::Status>> {
        sqlx::raw_sql("COMMIT")
            .execute(&mut self.lock)
            .await
            .expect("unlock");
        for plug in join_all(self.plugs).await {
            plug.expect("plug task").expect("plug order accepted");
        }
        join_all(self.calls)
            .await
            .into_iter()
            .map(|r| r.expect("call task"))
            .collect()
    }
}

fn orders_url(p: &Pipeline) -> String {
    let url = e2e::admin_url();
    let (base, _) = url.rsplit_once('/').expect("URL has a database");
    format!("{base}/t_{}_orders", p.id)
}

/// How many transactions wrote these orders, from the `xmin` of their
/// items: rows nothing updates afterwards. (An `orders` row's `xmin` moves to
/// the saga's transaction once a result is recorded, and the set-based saga
/// records many orders' results in one.)
async fn transactions(p: &Pipeline, ids: &[Uuid]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM order_items WHERE order_id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(&p.orders_db)
    .await
    .expect("xmin")
}

fn uuid(order: &Order) -> Uuid {
    order.order_id.parse().expect("a UUID")
}

fn assert_one_group_of(before: (usize, usize), size: usize) {
    let after = groups();
    assert_eq!(
        after.1 - before.1,
        WRITERS + 1,
        "the plugs' groups and one more"
    );
    assert_eq!(
        after.0 - before.0,
        WRITERS + size,
        "the plugs and one group of {size}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_orders_are_one_transaction_stored_once_with_one_event_each() {
    const N: usize = 200;
    let _serial = SERIAL.lock().await;
    let p = start().await;
    let requests: Vec<CreateOrderRequest> = (0..N)
        .map(|i| {
            let customer = format!("G{i}");
            if i % 3 == 0 {
                CreateOrderRequest {
                    customer_id: customer,
                    items: vec![
                        LineItem {
                            product_id: "PROD002".into(),
                            quantity: 1,
                        },
                        LineItem {
                            product_id: "PROD005".into(),
                            quantity: i32::try_from(i % 4 + 1).expect("small"),
                        },
                    ],
                    ..Default::default()
                }
            } else {
                order_request(&customer, "PROD014", 1)
            }
        })
        .collect();
    let before = groups();
    let results = in_one_group(&p, requests.clone(), N).await;
    assert_one_group_of(before, N);

    let created: Vec<Order> = results
        .into_iter()
        .map(|r| r.expect("every order accepted"))
        .collect();
    let ids: Vec<Uuid> = created.iter().map(uuid).collect();
    assert_eq!(transactions(&p, &ids).await, 1, "one transaction wrote all");
    // Each answer is its own request's order, and is what was stored.
    for (request, order) in requests.iter().zip(&created) {
        assert_eq!(order.customer_id, request.customer_id);
        let asked: Vec<(String, i32)> = if request.items.is_empty() {
            vec![(request.product_id.clone(), request.quantity)]
        } else {
            request
                .items
                .iter()
                .map(|i| (i.product_id.clone(), i.quantity))
                .collect()
        };
        let answered: Vec<(String, i32)> = order
            .items
            .iter()
            .map(|i| (i.product_id.clone(), i.quantity))
            .collect();
        assert_eq!(answered, asked);
        let stored: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT product_id, quantity, unit_price_units FROM order_items
             WHERE order_id = $1 ORDER BY line_no",
        )
        .bind(uuid(order))
        .fetch_all(&p.orders_db)
        .await
        .expect("items");
        let expected: Vec<(String, i32, i64)> = order
            .items
            .iter()
            .map(|i| {
                let price = i.unit_price.as_ref().expect("unit price").units;
                (i.product_id.clone(), i.quantity, price)
            })
            .collect();
        assert_eq!(stored, expected, "items of {}", order.order_id);
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE order_id = ANY($1)")
        .bind(&ids)
        .fetch_one(&p.orders_db)
        .await
        .expect("count");
    assert_eq!(stored, i64::try_from(N).expect("N"));

    // One OrderCreated per order on the topic (plus the plugs'), none twice.
    let per_order = eventually("every OrderCreated to be published", || async {
        let mut per_order: HashMap<String, usize> = HashMap::new();
        for record in p.records("orders") {
            let headers = record.headers()?;
            if common::kafka::header_str(headers, "event-type")
                != Some(events::OrderCreated::EVENT_TYPE)
            {
                continue;
            }
            let event = events::OrderCreated::decode(record.payload()?).expect("decodes");
            *per_order.entry(event.order_id).or_default() += 1;
        }
        (per_order.len() >= N + WRITERS).then_some(per_order)
    })
    .await;
    assert_eq!(per_order.len(), N + WRITERS);
    assert!(
        per_order.values().all(|n| *n == 1),
        "an event published twice"
    );
    for order in &created {
        assert!(per_order.contains_key(&order.order_id));
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_and_bad_requests_in_one_group_each_get_their_own_answer() {
    let _serial = SERIAL.lock().await;
    let p = start().await;
    // A key already stored before the group.
    let old = p
        .create(keyed_order_request("OLD", "PROD003", 1, "k-old"))
        .await;
    let requests = vec![
        // 0, 1: one key, the same request twice.
        keyed_order_request("SAME", "PROD001", 1, "k-same"),
        keyed_order_request("SAME", "PROD001", 1, "k-same"),
        // 2, 3: one key, two different requests.
        keyed_order_request("DIFF", "PROD002", 1, "k-diff"),
        keyed_order_request("DIFF", "PROD002", 2, "k-diff"),
        // 4, 5: the stored key, the same request and another.
        keyed_order_request("OLD", "PROD003", 1, "k-old"),
        keyed_order_request("OLD", "PROD003", 5, "k-old"),
        // 6, 7: refused before the queue.
        order_request("BAD", "PROD001", 0),
        order_request("BAD", "PROD999", 1),
        // 8..11: plain orders.
        order_request("P1", "PROD004", 1),
        order_request("P2", "PROD004", 1),
        order_request("P3", "PROD004", 1),
    ];
    let before = groups();
    let r = in_one_group(&p, requests, 9).await;
    assert_one_group_of(before, 9);

    let same = r[0].as_ref().expect("first of the same request");
    let again = r[1].as_ref().expect("second of the same request");
    assert_eq!(same.order_id, again.order_id, "one key, one order");
    let diff: Vec<_> = r[2..4].iter().collect();
    assert_eq!(diff.iter().filter(|r| r.is_ok()).count(), 1, "{diff:?}");
    let conflict = diff
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("one fails");
    assert_eq!(conflict.code(), Code::AlreadyExists, "{conflict:?}");
    assert_eq!(r[4].as_ref().expect("replay").order_id, old.order_id);
    assert_eq!(r[5].as_ref().unwrap_err().code(), Code::AlreadyExists);
    assert_eq!(r[6].as_ref().unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(r[7].as_ref().unwrap_err().code(), Code::NotFound);
    let mut new: Vec<Uuid> = vec![uuid(same)];
    new.push(uuid(diff.iter().find_map(|r| r.as_ref().ok()).expect("ok")));
    for result in &r[8..] {
        new.push(uuid(result.as_ref().expect("a plain order")));
    }
    assert_eq!(transactions(&p, &new).await, 1, "one transaction");

    // Exactly one order per key, and one OrderCreated per order written.
    let per_key: Vec<(String, i64)> = sqlx::query_as(
        "SELECT idempotency_key, count(*) FROM orders
         WHERE idempotency_key IS NOT NULL GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&p.orders_db)
    .await
    .expect("keys");
    let expected: Vec<(String, i64)> = ["k-diff", "k-old", "k-same"]
        .into_iter()
        .map(|k| (k.to_owned(), 1))
        .collect();
    assert_eq!(per_key, expected);
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&p.orders_db)
        .await
        .expect("count");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE event_type = $1")
        .bind(events::OrderCreated::EVENT_TYPE)
        .fetch_one(&p.orders_db)
        .await
        .expect("count");
    let expected = i64::try_from(1 + WRITERS + new.len()).expect("small");
    assert_eq!((orders, events), (expected, expected));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_the_database_refuses_fails_alone_and_the_group_is_replayed() {
    let _serial = SERIAL.lock().await;
    let p = start().await;
    // Valid for the service (a key of up to 128 characters), refused by
    // PostgreSQL (text cannot hold NUL): the group's lookup fails.
    let mut requests: Vec<CreateOrderRequest> = (0..5)
        .map(|i| order_request(&format!("R{i}"), "PROD006", 1))
        .collect();
    requests.insert(2, keyed_order_request("R-BAD", "PROD006", 1, "bad\0key"));
    let before = groups();
    let r = in_one_group(&p, requests, 6).await;
    assert_one_group_of(before, 6);

    let refused = r[2].as_ref().expect_err("refused by the database");
    assert_eq!(refused.code(), Code::Internal, "{refused:?}");
    assert!(!refused.message().contains("0x00"), "no internals leak");
    let ids: Vec<Uuid> = r
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, result)| uuid(result.as_ref().expect("the others are accepted")))
        .collect();
    assert_eq!(
        transactions(&p, &ids).await,
        5,
        "replayed one per transaction"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE customer_id LIKE 'R%'")
        .fetch_one(&p.orders_db)
        .await
        .expect("count");
    assert_eq!(stored, 5);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_queued_when_shutdown_starts_are_written_and_answered() {
    const N: usize = 20;
    let _serial = SERIAL.lock().await;
    let p = start().await;
    let orders_db = p.orders_db.clone();
    let requests = (0..N)
        .map(|i| order_request(&format!("S{i}"), "PROD007", 1))
        .collect();
    let held = Held::start(&p, requests, N).await;
    // SIGTERM's path: the servers stop accepting and wait for these calls,
    // which wait for the writers, which wait for the lock.
    let mut stopping = Box::pin(tokio::time::timeout(Duration::from_secs(60), p.stop()));
    // Polled once: the shutdown token is cancelled now, before the release.
    assert!(futures::poll!(&mut stopping).is_pending(), "calls are held");
    let (results, stopped) = tokio::join!(held.release(), stopping);
    stopped.expect("shutdown completes once the calls are answered");
    let ids: Vec<Uuid> = results
        .iter()
        .map(|r| uuid(r.as_ref().expect("accepted before shutdown, so written")))
        .collect();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE order_id = ANY($1)")
        .bind(&ids)
        .fetch_one(&orders_db)
        .await
        .expect("count");
    assert_eq!(stored, i64::try_from(N).expect("N"));
}
