//! `WatchOrder` over gRPC and as Server-Sent Events over REST: the current
//! state at once, each change, the end after the final state; late
//! watchers, many watchers, a watcher on another order replica, a lost
//! listening connection, and shutdown with watchers still open.

use std::time::Duration;

use e2e::{DEADLINE, Options, Pipeline, order_request};
use futures::future::join_all;
use shop_proto::order::{Order, OrderStatus, WatchOrderRequest};
use tonic::{Code, Streaming};

fn watch_request(order_id: &str) -> WatchOrderRequest {
    WatchOrderRequest {
        order_id: order_id.to_owned(),
    }
}

async fn open_watch(p: &Pipeline, order_id: &str) -> Streaming<Order> {
    p.orders()
        .await
        .watch_order(watch_request(order_id))
        .await
        .expect("WatchOrder")
        .into_inner()
}

/// Every state a stream sends until it ends (bounded by [`DEADLINE`]).
async fn collect(mut stream: Streaming<Order>) -> Vec<Order> {
    let mut states = Vec::new();
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(until, stream.message()).await {
            Err(elapsed) => panic!("the watch did not end ({elapsed}); got {states:?}"),
            Ok(Err(failed)) => panic!("the watch failed: {failed}; got {states:?}"),
            Ok(Ok(None)) => return states,
            Ok(Ok(Some(order))) => states.push(order),
        }
    }
}

/// The shape every watch has: consecutive states differ, only the last is
/// final, and statuses never go back.
fn assert_well_formed(states: &[Order]) {
    assert!(!states.is_empty(), "a watch sends the current state first");
    for pair in states.windows(2) {
        assert_ne!(pair[0], pair[1], "a state is sent only when it changed");
        assert_eq!(pair[0].status, OrderStatus::Pending as i32, "{states:?}");
        let at = |o: &Order| o.updated_at.as_ref().map(|t| (t.seconds, t.nanos));
        assert!(at(&pair[0]) <= at(&pair[1]), "{states:?}");
    }
    let last = states.last().expect("not empty");
    assert_ne!(last.status, OrderStatus::Pending as i32, "{states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_watch_follows_an_order_to_its_final_state_and_ends() {
    let p = Pipeline::start().await;
    let created = p.create(order_request("CUST001", "PROD001", 1)).await;
    let states = collect(open_watch(&p, &created.order_id).await).await;
    assert_well_formed(&states);
    let last = states.last().unwrap();
    assert_eq!(last.status, OrderStatus::Confirmed as i32, "{states:?}");
    assert_eq!(last.order_id, created.order_id);
    assert_eq!(last.items, created.items);
    // What GetOrder says now is what the watch ended with.
    assert_eq!(&p.final_order(&created.order_id).await, last);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_that_arrives_after_the_final_state_gets_it_once() {
    let p = Pipeline::start().await;
    let (_, decided) = p.place(order_request("CUST001", "PROD002", 1)).await;
    let states = collect(open_watch(&p, &decided.order_id).await).await;
    assert_eq!(states, vec![decided.clone()]);

    // The same over REST: one event, then the response ends.
    let events = sse_events(&p, &decided.order_id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "message");
    assert_eq!(events[0].1["status"], "ORDER_STATUS_CONFIRMED");
    assert_eq!(events[0].1["orderId"], decided.order_id.as_str());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timed_out_order_is_watched_from_pending_to_cancelled() {
    // No inventory: the deadline sweeper cancels the order.
    let p = Pipeline::start_with(Options {
        run_inventory: false,
        order_deadline: Duration::from_secs(3),
        ..Options::default()
    })
    .await;
    let created = p.create(order_request("CUST001", "PROD001", 1)).await;
    let stream = open_watch(&p, &created.order_id).await;
    let states = collect(stream).await;
    assert_well_formed(&states);
    assert_eq!(states[0].status, OrderStatus::Pending as i32, "{states:?}");
    let last = states.last().unwrap();
    assert_eq!(last.status, OrderStatus::Cancelled as i32);
    assert_eq!(last.reason, "timed out waiting for inventory");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_or_unknown_order_ids_are_plain_errors() {
    let p = Pipeline::start().await;
    let mut client = p.orders().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let status = client
        .watch_order(watch_request(&unknown))
        .await
        .expect_err("unknown order");
    assert_eq!(status.code(), Code::NotFound, "{status}");
    let status = client
        .watch_order(watch_request("not-a-uuid"))
        .await
        .expect_err("bad id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");

    let http = reqwest::Client::new();
    for (id, code) in [(unknown.as_str(), 404), ("not-a-uuid", 400)] {
        let response = http
            .get(p.rest_url(&format!("/api/v1/orders/{id}/events")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), code);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["message"].is_string(), "{body}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_follows_a_rest_order_to_its_final_state() {
    let p = Pipeline::start().await;
    let http = reqwest::Client::new();
    let created: serde_json::Value = http
        .post(p.rest_url("/api/v1/orders"))
        .json(
            &serde_json::json!({"customer_id": "CUST002", "product_id": "PROD003", "quantity": 1}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let order_id = created["orderId"].as_str().unwrap();
    let events = sse_events(&p, order_id).await;
    assert!(!events.is_empty());
    for (name, order) in &events {
        assert_eq!(name, "message", "{events:?}");
        assert_eq!(order["orderId"], order_id);
    }
    let (_, last) = events.last().unwrap();
    assert_eq!(last["status"], "ORDER_STATUS_CONFIRMED", "{events:?}");
    for (_, order) in &events[..events.len() - 1] {
        assert_eq!(order["status"], "ORDER_STATUS_PENDING", "{events:?}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_watchers_of_one_order_all_see_it_decided() {
    let p = Pipeline::start().await;
    let created = p.create(order_request("CUST003", "PROD001", 1)).await;
    let streams = join_all((0..50).map(|_| open_watch(&p, &created.order_id))).await;
    let all = join_all(streams.into_iter().map(collect)).await;
    for states in &all {
        assert_well_formed(states);
        assert_eq!(states.last().unwrap().status, OrderStatus::Confirmed as i32);
    }
    p.stop().await;
}

/// A second order replica on the same database and consumer group: a
/// watcher connected to it hears of the change the first replica makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_on_another_replica_gets_the_changes() {
    // No inventory: the first replica's deadline sweeper cancels the order.
    let p = Pipeline::start_with(Options {
        run_inventory: false,
        order_deadline: Duration::from_secs(3),
        ..Options::default()
    })
    .await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut cfg = order::Config::from_env().expect("order config");
    cfg.grpc_addr = e2e::free_addr();
    cfg.http_addr = e2e::free_addr();
    cfg.metrics_addr = e2e::free_addr();
    // This replica sweeps once at start, before the order exists: the
    // cancellation is the first replica's.
    cfg.sweep_interval = Duration::from_secs(3600);
    let (base, _) = e2e::admin_url()
        .rsplit_once('/')
        .map(|(b, d)| (b.to_owned(), d.to_owned()))
        .unwrap();
    cfg.db = common::config::DbConfig {
        url: format!("{base}/t_{}_orders", p.id).into(),
        max_connections: 5,
    };
    cfg.kafka = e2e::test_kafka_config(&p.id, "order");
    cfg.kafka.brokers.clone_from(&p.brokers);
    cfg.pipeline = e2e::test_pipeline_config();
    let replica = order::build(cfg, shutdown.clone()).await.expect("replica");
    let replica_grpc = replica.grpc_addr();
    let running = tokio::spawn(replica.run());
    e2e::wait_serving(replica_grpc, "").await;

    let created = p.create(order_request("CUST001", "PROD001", 1)).await;
    let mut client = shop_proto::order::order_service_client::OrderServiceClient::new(
        e2e::channel(replica_grpc).await,
    );
    let stream = client
        .watch_order(watch_request(&created.order_id))
        .await
        .expect("WatchOrder on the replica")
        .into_inner();
    let states = collect(stream).await;
    assert_well_formed(&states);
    let last = states.last().unwrap();
    assert_eq!(last.status, OrderStatus::Cancelled as i32, "{states:?}");
    assert_eq!(last.reason, "timed out waiting for inventory");
    shutdown.cancel();
    running.await.unwrap().expect("replica stopped cleanly");
    p.stop().await;
}

/// The listening connection is killed and cannot come back at once; a
/// change committed while no one listens (its notification is lost) still
/// reaches the watcher: after reconnecting, the listener has every watcher
/// re-read its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_made_while_the_listener_is_down_is_not_lost() {
    let p = Pipeline::start_with(Options {
        run_inventory: false,
        ..Options::default()
    })
    .await;
    let created = p.create(order_request("CUST001", "PROD001", 1)).await;
    let mut stream = open_watch(&p, &created.order_id).await;
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.status, OrderStatus::Pending as i32);

    // One connection held for the test: new ones are refused below.
    let mut conn = p.orders_db.acquire().await.unwrap();
    let database = format!("t_{}_orders", p.id);
    let listening =
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query ILIKE 'LISTEN%'";
    // The listener connects in the background after start-up (slowly when
    // many tests start at once): wait for it before shutting the door.
    let mut tries = 0;
    while sqlx::query_scalar::<_, i64>(listening)
        .bind(&database)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
        == 0
    {
        tries += 1;
        assert!(tries < 600, "the listener never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let limit = |n: i32| format!("ALTER DATABASE \"{database}\" CONNECTION LIMIT {n}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(limit(0)))
        .execute(&mut *conn)
        .await
        .unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND query ILIKE 'LISTEN%') AS t",
    )
    .bind(&database)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(killed, 1, "one listening connection per order process");
    let mut tries = 0;
    while sqlx::query_scalar::<_, i64>(listening)
        .bind(&database)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
        > 0
    {
        tries += 1;
        assert!(tries < 100, "the killed listener is still there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The change, with its notification, while nobody listens.
    let id: uuid::Uuid = created.order_id.parse().unwrap();
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    sqlx::query(
        "UPDATE orders SET status = 'CANCELLED', reason = 'changed while not listening',
         updated_at = now() WHERE order_id = $1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await
    .unwrap();
    order::store::notify_changed(&mut conn, &[id])
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut *conn).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(limit(-1)))
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);

    let rest = collect(stream).await;
    let last = rest.last().expect("the final state after the reconnection");
    assert_eq!(last.status, OrderStatus::Cancelled as i32, "{rest:?}");
    assert_eq!(last.reason, "changed while not listening");
    p.stop().await;
}

/// Watchers of orders that never finish do not hold shutdown up: their
/// streams end with UNAVAILABLE (watch again elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_ends_open_watches_with_unavailable() {
    let p = Pipeline::start_with(Options {
        run_inventory: false,
        ..Options::default()
    })
    .await;
    let created = p.create(order_request("CUST001", "PROD001", 1)).await;
    let mut stream = open_watch(&p, &created.order_id).await;
    assert!(stream.message().await.unwrap().is_some());
    let http = reqwest::Client::new();
    let mut sse = http
        .get(p.rest_url(&format!("/api/v1/orders/{}/events", created.order_id)))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    assert!(sse.chunk().await.unwrap().is_some());

    tokio::time::timeout(Duration::from_secs(30), p.stop())
        .await
        .expect("shutdown does not wait for watchers");
    let ended = loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended}");
    let mut rest = String::new();
    while let Ok(Some(chunk)) = sse.chunk().await {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(rest.contains("event: error"), "{rest}");
    assert!(rest.contains("\"code\":14"), "{rest}");
}

/// Reads a whole SSE response: (event name, JSON data) per event.
async fn sse_events(p: &Pipeline, order_id: &str) -> Vec<(String, serde_json::Value)> {
    let mut response = reqwest::Client::new()
        .get(p.rest_url(&format!("/api/v1/orders/{order_id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "{:?}",
        response.headers()
    );
    let mut text = String::new();
    let read = async {
        while let Some(chunk) = response.chunk().await.expect("SSE body") {
            text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("the SSE response ends after the final state");
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .filter_map(|block| {
            let mut name = "message".to_owned();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    v.trim().clone_into(&mut name);
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            // Comment-only blocks (keep-alive) carry no data.
            (!data.is_empty()).then(|| (name, serde_json::from_str(&data).expect("JSON data")))
        })
        .collect()
}
