//! Protection of intake: floods of `CreateOrder` past the per-client rate
//! limit, the in-flight limit and a saturated database pool. Rejected calls
//! get their code (with `retry-after`) at once, accepted ones succeed, and
//! every accepted order is stored and decided; nothing rejected is stored.

use std::time::{Duration, Instant};

use e2e::{Options, Pipeline, eventually, order_request};
use futures::future::join_all;
use order::intake::Limits;
use shop_proto::order::order_service_client::OrderServiceClient;
use sqlx::Connection;
use tonic::{Code, Request};

/// A rejection must come back within this, although the accepted calls of
/// the same flood are still writing. It is a sanity bound, not a
/// performance figure: the test suite runs in parallel on two cores shared
/// with the database and the broker (debug build), and a rejection that
/// queued would wait for the 5 s connection timeout or, in the in-flight
/// test, for a table lock the test holds.
const FAST: Duration = Duration::from_secs(1);

/// An accepted call of a flood must still answer within this, below the
/// 5 s a call would queue for a connection without shedding.
const ACCEPTED_WITHIN: Duration = Duration::from_secs(3);

fn limits(max_in_flight: usize, rate_per_client: usize, queue_timeout: Duration) -> Options {
    Options {
        intake: Some(Limits {
            max_in_flight,
            rate_per_client: u32::try_from(rate_per_client).expect("rate"),
            queue_timeout,
            ..Limits::default()
        }),
        ..Options::default()
    }
}

/// The outcome of one call: its order id or its status, and how long it took.
type Outcome = (Result<String, tonic::Status>, Duration);

type Orders = OrderServiceClient<tonic::transport::Channel>;

/// How many tokens `rate` per second refill in `elapsed`, rounded up.
fn refilled(elapsed: Duration, rate: usize) -> usize {
    let ms = usize::try_from(elapsed.as_millis()).expect("test length");
    (ms * rate).div_ceil(1000)
}

/// `CreateOrder` over gRPC on `orders` (one connection shared by a whole
/// flood), as `client` (no `x-client-id` when empty).
async fn create(mut orders: Orders, client: String, customer: String) -> Outcome {
    let mut request = Request::new(order_request(&customer, "PROD014", 1));
    if !client.is_empty() {
        request
            .metadata_mut()
            .insert("x-client-id", client.parse().expect("ascii"));
    }
    let start = Instant::now();
    let result = orders
        .create_order(request)
        .await
        .map(|r| r.into_inner().order_id);
    (result, start.elapsed())
}

fn retry_after(status: &tonic::Status) -> u64 {
    status
        .metadata()
        .get("retry-after")
        .unwrap_or_else(|| panic!("no retry-after on {status:?}"))
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds")
}

async fn stored_orders(p: &Pipeline) -> Vec<String> {
    sqlx::query_scalar("SELECT order_id::text FROM orders ORDER BY order_id")
        .fetch_all(&p.orders_db)
        .await
        .expect("read orders")
}

/// Every accepted order, and nothing else, is stored; each is decided.
async fn assert_exactly_stored_and_decided(p: &Pipeline, mut accepted: Vec<String>) {
    accepted.sort();
    assert_eq!(stored_orders(p).await, accepted, "stored ≠ accepted");
    let n = i64::try_from(accepted.len()).expect("count");
    eventually("every accepted order to be decided", || async {
        let decided: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE status <> 'PENDING'")
                .fetch_one(&p.orders_db)
                .await
                .ok()?;
        (decided == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_flood_past_the_client_rate_is_rejected_fast_and_others_are_unaffected() {
    const RATE: usize = 20;
    let p = Pipeline::start_with(limits(0, RATE, Duration::from_secs(5))).await;
    // The connection is opened before the clock starts.
    let orders = p.orders().await;
    let flood = (0..200).map(|i| create(orders.clone(), "flooder".into(), format!("F{i}")));
    let others = (0..5).map(|i| create(orders.clone(), "bystander".into(), format!("B{i}")));
    let start = Instant::now();
    let (flood, others) = tokio::join!(join_all(flood), join_all(others));
    let elapsed = start.elapsed();

    let mut accepted = Vec::new();
    let mut rejected = 0;
    for (result, took) in flood {
        match result {
            Ok(id) => {
                assert!(took < ACCEPTED_WITHIN, "an accepted call took {took:?}");
                accepted.push(id);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("rate limit"), "{status:?}");
                assert!((1..=2).contains(&retry_after(&status)), "{status:?}");
                assert!(took < FAST, "a rejection took {took:?}");
                rejected += 1;
            }
        }
    }
    // The burst (one second's worth), plus what refilled during the flood.
    let refilled = refilled(elapsed, RATE);
    assert!(
        accepted.len() >= RATE && accepted.len() <= RATE + refilled + 1,
        "{} accepted in {elapsed:?}",
        accepted.len()
    );
    assert_eq!(accepted.len() + rejected, 200);
    // Another client id has its own budget.
    for (result, _) in others {
        accepted.push(result.expect("a bystander's call is not limited by the flooder's"));
    }
    // Reads are never limited.
    let mut orders = p.orders().await;
    for _ in 0..(2 * RATE) {
        orders
            .get_order(shop_proto::order::GetOrderRequest {
                order_id: accepted[0].clone(),
            })
            .await
            .expect("GetOrder is not rate limited");
    }
    assert_exactly_stored_and_decided(&p, accepted).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_flood_keyed_by_peer_gets_429_with_retry_after() {
    const RATE: usize = 10;
    let p = Pipeline::start_with(limits(0, RATE, Duration::from_secs(5))).await;
    let http = reqwest::Client::new();
    // No x-client-id: every call comes from 127.0.0.1, one client.
    let calls = (0..100).map(|i| {
        let http = http.clone();
        let url = p.rest_url("/api/v1/orders");
        async move {
            let start = Instant::now();
            let response = http
                .post(url)
                .json(&serde_json::json!({
                    "customer_id": format!("R{i}"), "product_id": "PROD014", "quantity": 1
                }))
                .send()
                .await
                .expect("POST");
            let took = start.elapsed();
            let status = response.status().as_u16();
            let retry = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().expect("ascii").to_owned());
            let body: serde_json::Value = response.json().await.expect("JSON body");
            (status, retry, body, took)
        }
    });
    let start = Instant::now();
    let outcomes = join_all(calls).await;
    let elapsed = start.elapsed();
    let mut accepted = Vec::new();
    for (status, retry, body, took) in outcomes {
        match status {
            201 => {
                assert!(retry.is_none());
                accepted.push(body["orderId"].as_str().expect("orderId").to_owned());
            }
            429 => {
                let secs: u64 = retry.expect("Retry-After on 429").parse().expect("secs");
                assert!((1..=2).contains(&secs));
                assert_eq!(body["code"], 8, "{body}");
                assert!(took < FAST, "a rejection took {took:?}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let refilled = refilled(elapsed, RATE);
    assert!(
        accepted.len() >= RATE && accepted.len() <= RATE + refilled + 1,
        "{} accepted in {elapsed:?}",
        accepted.len()
    );
    // The same peer with its own x-client-id is another client.
    let response = http
        .post(p.rest_url("/api/v1/orders"))
        .header("x-client-id", "tenant-b")
        .json(&serde_json::json!({"customer_id": "RB", "product_id": "PROD014", "quantity": 1}))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 201);
    let body: serde_json::Value = response.json().await.expect("JSON");
    accepted.push(body["orderId"].as_str().expect("orderId").to_owned());
    assert_exactly_stored_and_decided(&p, accepted).await;
    p.stop().await;
}

/// Holds a lock that makes every order insert wait, until committed.
async fn block_inserts(p: &Pipeline) -> sqlx::PgConnection {
    let url = e2e::admin_url();
    let (base, _) = url.rsplit_once('/').expect("URL has a database");
    let mut conn = sqlx::PgConnection::connect(&format!("{base}/t_{}_orders", p.id))
        .await
        .expect("connect");
    sqlx::raw_sql("BEGIN; LOCK TABLE orders IN EXCLUSIVE MODE")
        .execute(&mut conn)
        .await
        .expect("lock orders");
    conn
}

async fn unblock_inserts(mut conn: sqlx::PgConnection) {
    sqlx::raw_sql("COMMIT")
        .execute(&mut conn)
        .await
        .expect("unlock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_flight_limit_rejects_at_once_while_the_admitted_calls_wait() {
    let p = Pipeline::start_with(limits(2, 0, Duration::from_secs(30))).await;
    let lock = block_inserts(&p).await;
    // Different client ids: no rate limit is involved, only the in-flight count.
    let orders = p.orders().await;
    let calls: Vec<_> = (0..30)
        .map(|i| create(orders.clone(), format!("client-{i}"), format!("I{i}")))
        .collect();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let run = async {
        join_all(calls.into_iter().map(|call| {
            let done_tx = done_tx.clone();
            async move {
                let outcome = call.await;
                let _ = done_tx.send(outcome.0.is_ok());
                outcome
            }
        }))
        .await
    };
    let watch = async {
        // The two admitted calls hold their slots on the lock; the other 28
        // must all come back, rejected, while it is held.
        for _ in 0..28 {
            let ok = tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
                .await
                .expect("28 calls answered while two are held")
                .expect("sender alive");
            assert!(!ok, "a third call was admitted past INTAKE_MAX_IN_FLIGHT=2");
        }
        unblock_inserts(lock).await;
    };
    let (outcomes, ()) = tokio::join!(run, watch);
    let mut accepted = Vec::new();
    for (result, took) in outcomes {
        match result {
            Ok(id) => accepted.push(id),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("in flight"), "{status:?}");
                assert_eq!(retry_after(&status), 1);
                assert!(took < FAST, "a rejection took {took:?}");
            }
        }
    }
    assert_eq!(accepted.len(), 2, "exactly the two admitted calls succeed");
    // Slots are given back: the next call is admitted.
    let (next, _) = create(orders, "later".into(), "L".into()).await;
    accepted.push(next.expect("admitted once the slots are free"));
    assert_exactly_stored_and_decided(&p, accepted).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_pool_sheds_with_unavailable_instead_of_queueing() {
    const QUEUE: Duration = Duration::from_millis(200);
    let p = Pipeline::start_with(limits(0, 0, QUEUE)).await;
    let lock = block_inserts(&p).await;
    // The first call finds the writer idle and waits on the lock with it
    // (the writer runs before the API lets calls in: started after them, it
    // took every queued call as one group and nothing was shed); the rest
    // queue for the writer and are shed at the queue timeout.
    let orders = p.orders().await;
    let calls = (0..20).map(|i| create(orders.clone(), format!("c{i}"), format!("S{i}")));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let run = join_all(calls.map(|call| {
        let done_tx = done_tx.clone();
        async move {
            let outcome = call.await;
            let _ = done_tx.send(());
            outcome
        }
    }));
    let watch = async {
        for _ in 0..15 {
            tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
                .await
                .expect("calls beyond the pool answered while the pool is held")
                .expect("sender alive");
        }
        unblock_inserts(lock).await;
    };
    let (outcomes, ()) = tokio::join!(run, watch);
    let mut accepted = Vec::new();
    let mut shed = 0;
    for (result, took) in outcomes {
        match result {
            Ok(id) => accepted.push(id),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(status.message().contains("overloaded"), "{status:?}");
                assert_eq!(retry_after(&status), 1);
                assert!(took >= QUEUE, "shed before the queue timeout: {took:?}");
                assert!(took < QUEUE + FAST, "shedding took {took:?}");
                shed += 1;
            }
        }
    }
    assert!(shed >= 15, "only {shed} of 20 calls were shed");
    assert_exactly_stored_and_decided(&p, accepted).await;
    p.stop().await;
}

/// Past `INTAKE_MAX_PENDING` undecided orders, `CreateOrder` is shed with
/// `UNAVAILABLE` and `retry-after` (gRPC) or 503 (REST), and nothing shed is
/// stored; a bad request still gets its own error. Once the orders are
/// decided (here: cancelled at their deadline, since inventory does not
/// run), intake accepts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn intake_sheds_past_the_pending_bound_until_orders_are_decided() {
    const MAX_PENDING: usize = 3;
    let p = Pipeline::start_with(Options {
        run_inventory: false,
        // Long enough that none is cancelled before the bound is tested.
        order_deadline: Duration::from_secs(10),
        intake: Some(Limits {
            max_pending: MAX_PENDING as u64,
            ..Limits::default()
        }),
        ..Options::default()
    })
    .await;
    let orders = p.orders().await;
    let mut accepted = Vec::new();
    for i in 0..MAX_PENDING {
        // The estimate errs high until the next count (backlog::REFRESH) when a count
        // ran while an order was being written: below the bound a call is
        // admitted, at once or after that count.
        let id = eventually("an order below the pending bound", || {
            let orders = orders.clone();
            async move {
                let (result, _) = create(orders, String::new(), format!("P{i}")).await;
                result.ok()
            }
        })
        .await;
        accepted.push(id);
    }
    let (result, took) = create(orders.clone(), String::new(), "P-over".into()).await;
    let status = result.expect_err("past the pending bound");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("waiting to be decided"),
        "{status:?}"
    );
    assert_eq!(retry_after(&status), 1, "{status:?}");
    assert!(took < FAST, "a rejection took {took:?}");
    let response = reqwest::Client::new()
        .post(p.rest_url("/api/v1/orders"))
        .json(&serde_json::json!({"customer_id": "P-rest", "product_id": "PROD014", "quantity": 1}))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .map(reqwest::header::HeaderValue::as_bytes),
        Some(&b"1"[..])
    );
    let mut bad = orders.clone();
    let status = bad
        .create_order(order_request("P-bad", "PROD014", 0))
        .await
        .expect_err("quantity 0");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut sorted = accepted.clone();
    sorted.sort();
    assert_eq!(
        stored_orders(&p).await,
        sorted,
        "only the admitted are stored"
    );

    // The deadline sweeper cancels them; the count follows within its
    // refresh, and intake opens again once fewer than the bound wait.
    let reopened = eventually("intake to accept once the orders are decided", || {
        let orders = orders.clone();
        async move {
            let (result, _) = create(orders, String::new(), "P-after".into()).await;
            result.ok()
        }
    })
    .await;
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders WHERE status = 'PENDING' AND order_id::text <> $1",
    )
    .bind(&reopened)
    .fetch_one(&p.orders_db)
    .await
    .expect("count");
    // Admission needs the last count plus what was admitted since to be
    // below the bound, and pending orders only decrease here (nothing else
    // is admitted), so fewer than the bound were pending when it reopened.
    assert!(
        usize::try_from(pending).expect("count") < MAX_PENDING,
        "intake reopened with {pending} other orders still pending"
    );
    p.stop().await;
}
