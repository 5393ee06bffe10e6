//! Delivery guarantees that can be shown with the services in-process:
//! idempotency keys, redelivered events, records that cannot be applied,
//! dead-letter replay, and the saga deadline with compensation.

use std::{collections::HashSet, time::Duration};

use common::config::KafkaConfig;
use e2e::{Options, Pipeline, eventually, keyed_order_request, order_request};
use prost::Message as _;
use rdkafka::{
    Message,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use shop_proto::{EventName, events, order::OrderStatus, payment::GetAccountRequest};
use shopctl::invariants::{PerService, Sources};
use tokio_util::sync::CancellationToken;
use tonic::Code;

fn count_events(p: &Pipeline, topic: &str, event_type: &str) -> usize {
    p.records(topic)
        .iter()
        .filter(|m| {
            m.headers()
                .and_then(|h| common::kafka::header_str(h, "event-type"))
                == Some(event_type)
        })
        .count()
}

async fn used_credit(p: &Pipeline, customer: &str) -> i64 {
    p.payments()
        .await
        .get_account(GetAccountRequest {
            customer_id: customer.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .used
        .unwrap()
        .units
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_returns_the_original_order_and_publishes_once() {
    let p = Pipeline::start().await;
    let mut client = p.orders().await;
    let first = client
        .create_order(keyed_order_request("CUST-IDEM", "PROD001", 1, "key-1"))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .create_order(keyed_order_request("CUST-IDEM", "PROD001", 1, "key-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.order_id, again.order_id);
    let conflict = client
        .create_order(keyed_order_request("CUST-IDEM", "PROD001", 2, "key-1"))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert!(conflict.message().contains("key-1"), "{conflict:?}");

    // Ten retries racing each other with one key make one order.
    let racing = futures::future::join_all((0..10).map(|_| {
        let mut client = client.clone();
        async move {
            client
                .create_order(keyed_order_request("CUST-IDEM", "PROD004", 1, "key-race"))
                .await
                .expect("each racer gets the order")
                .into_inner()
                .order_id
        }
    }))
    .await;
    assert!(racing.iter().all(|id| id == &racing[0]), "{racing:?}");

    // REST: the Idempotency-Key header, 201 both times, 409 on a different body.
    let http = reqwest::Client::new();
    let post = |body: &'static str| {
        http.post(p.rest_url("/api/v1/orders"))
            .header("Idempotency-Key", "rest-key-1")
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };
    let body = r#"{"customer_id":"CUST-IDEM","product_id":"PROD002","quantity":1}"#;
    let a: serde_json::Value = post(body).await.unwrap().json().await.unwrap();
    let second = post(body).await.unwrap();
    assert_eq!(second.status(), 201);
    let b: serde_json::Value = second.json().await.unwrap();
    assert_eq!(a["orderId"], b["orderId"]);
    let different = post(r#"{"customer_id":"CUST-IDEM","product_id":"PROD002","quantity":5}"#)
        .await
        .unwrap();
    assert_eq!(different.status(), 409);

    // Three orders, so exactly three OrderCreated records, all confirmed.
    for id in [
        first.order_id.as_str(),
        a["orderId"].as_str().unwrap(),
        &racing[0],
    ] {
        assert_eq!(
            p.final_order(id).await.status,
            OrderStatus::Confirmed as i32
        );
    }
    assert_eq!(
        count_events(&p, "orders", events::OrderCreated::EVENT_TYPE),
        3
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&p.orders_db)
        .await
        .unwrap();
    assert_eq!(stored, 3);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivered_events_change_nothing() {
    let p = Pipeline::start().await;
    let created = p.create(order_request("CUST-DUP", "PROD003", 2)).await;
    assert_eq!(
        p.final_order(&created.order_id).await.status,
        OrderStatus::Confirmed as i32
    );
    let used = used_credit(&p, "CUST-DUP").await;
    let stock: i64 = sqlx::query_scalar("SELECT available FROM stock WHERE product_id = 'PROD003'")
        .fetch_one(&p.inventory_db)
        .await
        .unwrap();
    // The decision is committed with its OrderConfirmed in the outbox; the
    // relay publishes it a moment later.
    eventually("OrderConfirmed to be published", || async {
        (count_events(&p, "orders", events::OrderConfirmed::EVENT_TYPE) == 1).then_some(())
    })
    .await;

    // Publish every record of `orders` and `payments` a second time, as a
    // relay that crashed before marking its batch would.
    let producer = p.producer();
    let mut copies = 0;
    for topic in ["orders", "payments", "inventory"] {
        for m in p.records(topic) {
            let mut record = FutureRecord::to(m.topic())
                .payload(m.payload().unwrap())
                .key(m.key().unwrap());
            if let Some(h) = m.headers() {
                record = record.headers(h.clone());
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap();
            copies += 1;
        }
    }
    assert!(
        copies >= 4,
        "OrderCreated, OrderConfirmed, PaymentCompleted, InventoryUpdated"
    );
    eventually("payment to drop the duplicate", || async {
        (p.counter(&p.payments_db, "orders", "duplicates_suppressed")
            .await
            >= 1)
            .then_some(())
    })
    .await;
    eventually("inventory to drop the duplicate", || async {
        (p.counter(&p.inventory_db, "orders", "duplicates_suppressed")
            .await
            >= 1)
            .then_some(())
    })
    .await;
    eventually("order to drop both duplicates", || async {
        let pay = p
            .counter(&p.orders_db, "payments", "duplicates_suppressed")
            .await;
        let inv = p
            .counter(&p.orders_db, "inventory", "duplicates_suppressed")
            .await;
        (pay >= 1 && inv >= 1).then_some(())
    })
    .await;
    assert_eq!(used_credit(&p, "CUST-DUP").await, used, "no second charge");
    let stock_after: i64 =
        sqlx::query_scalar("SELECT available FROM stock WHERE product_id = 'PROD003'")
            .fetch_one(&p.inventory_db)
            .await
            .unwrap();
    assert_eq!(stock_after, stock, "no second reservation");
    assert_eq!(
        count_events(&p, "payments", events::PaymentCompleted::EVENT_TYPE),
        2,
        "original + copy, no new one"
    );
    let order = p.final_order(&created.order_id).await;
    assert_eq!(order.status, OrderStatus::Confirmed as i32);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_records_go_to_the_dlq_and_never_block() {
    let p = Pipeline::start().await;
    let producer = p.producer();
    let headers = |event_type: &str| {
        OwnedHeaders::new()
            .insert(Header {
                key: "event-type",
                value: Some(event_type),
            })
            .insert(Header {
                key: "event-id",
                value: Some(uuid::Uuid::now_v7().to_string().as_str()),
            })
    };
    // On every topic: bytes with no headers, and a known type whose bytes
    // do not decode.
    let garbage_type = [
        ("orders", events::OrderCreated::EVENT_TYPE),
        ("payments", events::PaymentCompleted::EVENT_TYPE),
        ("inventory", events::InventoryUpdated::EVENT_TYPE),
    ];
    for (topic, event_type) in garbage_type {
        let topic = p.topic(topic);
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("CUST-BAD")
                    .payload(&b"\xff\xffnot protobuf"[..]),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("CUST-BAD")
                    .payload(&b"\xff\xff\xff"[..])
                    .headers(headers(event_type)),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    // An unknown event type: logged and skipped, not dead-lettered.
    producer
        .send(
            FutureRecord::to(&p.topic("orders"))
                .key("CUST-BAD")
                .payload(&b"{}"[..])
                .headers(headers("shop.events.v9.Unheard")),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // A well-formed result for an order that does not exist.
    let stray = events::PaymentCompleted {
        event_id: uuid::Uuid::now_v7().to_string(),
        order_id: uuid::Uuid::now_v7().to_string(),
        customer_id: "CUST-BAD".into(),
        outcome: events::PaymentOutcome::Approved as i32,
        ..Default::default()
    };
    producer
        .send(
            FutureRecord::to(&p.topic("payments"))
                .key("CUST-BAD")
                .payload(&stray.encode_to_vec())
                .headers(common::kafka::event_headers(
                    events::PaymentCompleted::EVENT_TYPE,
                    &stray.event_id.parse().unwrap(),
                )),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    // The same customer's next order still goes through: nothing blocked.
    let created = p.create(order_request("CUST-BAD", "PROD006", 1)).await;
    assert_eq!(
        p.final_order(&created.order_id).await.status,
        OrderStatus::Confirmed as i32
    );

    // orders: 2 bad records, each dead-lettered by payment and by inventory.
    let kafka = p.kafka();
    let letters = eventually("dead letters on all three DLQs", || async {
        let orders = shopctl::dlq::list(&kafka, "orders").ok()?;
        let payments = shopctl::dlq::list(&kafka, "payments").ok()?;
        let inventory = shopctl::dlq::list(&kafka, "inventory").ok()?;
        (orders.len() == 4 && payments.len() == 3 && inventory.len() == 2)
            .then_some((orders, payments))
    })
    .await;
    let (orders_dlq, payments_dlq) = letters;
    for letter in orders_dlq.iter().chain(&payments_dlq) {
        assert_eq!(letter.key.as_deref(), Some("CUST-BAD"));
        assert!(
            letter
                .source_topic
                .as_deref()
                .unwrap()
                .starts_with(&format!("t{}.", p.id))
        );
        assert!(letter.source_partition.is_some() && letter.source_offset.is_some());
        assert!(letter.error.as_deref().is_some_and(|e| !e.is_empty()));
        assert!(letter.attempts.is_some());
    }
    let groups: Vec<_> = orders_dlq
        .iter()
        .filter_map(|l| l.consumer_group.clone())
        .collect();
    assert_eq!(groups.iter().filter(|g| g.ends_with("-payment")).count(), 2);
    assert_eq!(
        groups.iter().filter(|g| g.ends_with("-inventory")).count(),
        2
    );
    assert!(
        payments_dlq
            .iter()
            .any(|l| l.error.as_deref().unwrap().contains("unknown order")),
        "{payments_dlq:?}"
    );
    assert!(
        orders_dlq
            .iter()
            .any(|l| l.error.as_deref().unwrap().contains("header")),
        "{orders_dlq:?}"
    );

    // Dead letters are counted where they were written.
    assert_eq!(
        p.counter(&p.payments_db, "orders", "dead_lettered").await,
        2
    );
    assert_eq!(
        p.counter(&p.orders_db, "payments", "dead_lettered").await,
        3
    );

    // Replay sends each dead letter back once. These are still unknown
    // orders, so they are dead-lettered again (the service stays up), and
    // the next replay sends only those 3 new letters, not all 6.
    assert_eq!(
        shopctl::dlq::replay(&kafka, "payments", "replay-test")
            .await
            .unwrap(),
        3
    );
    eventually("replayed records to be dead-lettered again", || async {
        (shopctl::dlq::list(&kafka, "payments").ok()?.len() == 6).then_some(())
    })
    .await;
    assert_eq!(
        shopctl::dlq::replay(&kafka, "payments", "replay-test")
            .await
            .unwrap(),
        3
    );
    for addr in [p.order_grpc, p.payment_grpc, p.inventory_grpc] {
        assert_eq!(e2e::health(addr, "").await, Some(e2e::SERVING));
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_past_its_deadline_is_cancelled_and_compensated() {
    // Inventory never answers: the order must not stay PENDING forever.
    let p = Pipeline::start_with(Options {
        order_deadline: Duration::from_secs(2),
        run_inventory: false,
        ..Options::default()
    })
    .await;
    let (created, done) = p.place(order_request("CUST-SLOW", "PROD007", 1)).await;
    assert_eq!(done.status, OrderStatus::Cancelled as i32);
    assert_eq!(done.reason, "timed out waiting for inventory");
    // Payment had approved it; the cancellation refunds it.
    let payment = p.refunded_payment(&created.order_id).await;
    assert_eq!(payment.amount, created.total);
    assert_eq!(used_credit(&p, "CUST-SLOW").await, 0);
    assert_eq!(
        count_events(&p, "orders", events::OrderCancelled::EVENT_TYPE),
        1
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn published_outbox_rows_are_marked_then_pruned() {
    let p = Pipeline::start_with(Options {
        outbox_retention: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    let created = p.create(order_request("CUST-PRUNE", "PROD008", 1)).await;
    assert_eq!(
        p.final_order(&created.order_id).await.status,
        OrderStatus::Confirmed as i32
    );
    // OrderCreated and OrderConfirmed were published, so nothing is pending,
    // and once older than the retention they are deleted.
    for db in [&p.orders_db, &p.payments_db, &p.inventory_db] {
        eventually("published outbox rows to be pruned", || async {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(db)
                .await
                .ok()?;
            (left == 0).then_some(())
        })
        .await;
    }
    assert_eq!(
        count_events(&p, "orders", events::OrderConfirmed::EVENT_TYPE),
        1
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invariant_checker_passes_a_clean_run_and_catches_tampering() {
    let p = Pipeline::start().await;
    let mut client = p.orders().await;
    let mut ids = Vec::new();
    for (customer, product, quantity) in [
        ("CUST-C1", "PROD001", 2),
        ("CUST-C2", "PROD020", 5),
        ("CUST-C3", "PROD010", 3),
    ] {
        ids.push(
            client
                .create_order(keyed_order_request(customer, product, quantity, ""))
                .await
                .unwrap()
                .into_inner()
                .order_id,
        );
    }
    p.inventory()
        .await
        .set_stock(shop_proto::inventory::SetStockRequest {
            product_id: "PROD002".into(),
            available: 7,
        })
        .await
        .unwrap();
    for id in &ids {
        p.final_order(id).await;
    }
    let sources = p.invariant_sources();
    let report = eventually("the invariants to hold", || async {
        let report = shopctl::invariants::check(&sources).await.ok()?;
        report.ok().then_some(report)
    })
    .await;
    // One confirmed; one out of stock (PROD020 has 3); one over the credit limit.
    assert_eq!(
        (
            report.figures.orders,
            report.figures.confirmed,
            report.figures.cancelled
        ),
        (3, 1, 2)
    );

    // Each kind of damage is reported.
    sqlx::query("UPDATE stock SET available = available + 1 WHERE product_id = 'PROD001'")
        .execute(&p.inventory_db)
        .await
        .unwrap();
    sqlx::query("UPDATE payments SET amount_units = amount_units + 1 WHERE status = 'APPROVED'")
        .execute(&p.payments_db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM processed_events WHERE event_id = (SELECT event_id FROM processed_events LIMIT 1)")
        .execute(&p.orders_db)
        .await
        .unwrap();
    let report = shopctl::invariants::check(&sources).await.unwrap();
    let text = report.violations.join("\n");
    assert!(text.contains("PROD001: stocked"), "{text}");
    assert!(text.contains("charged"), "{text}");
    assert!(text.contains("order: 1 events never applied"), "{text}");
    p.stop().await;
}

// --- the checker's view of what the state implies -------------------------

/// A run the checker tests tamper with: one order confirmed, one cancelled
/// for want of stock (payment approved, then refunded), one cancelled over
/// the credit limit (stock reserved, then released). The pipeline is
/// stopped once the checker passes, so no relay or consumer repairs the
/// damage; the databases and topics stay for the checker to read.
struct SettledRun {
    sources: Sources,
    confirmed: String,
    refunded: String,
    released: String,
}

async fn settled_run() -> SettledRun {
    let p = Pipeline::start().await;
    let confirmed = p
        .create(order_request("CUST-K1", "PROD001", 2))
        .await
        .order_id;
    // PROD020 has 3 units; PROD010 three times is over a new customer's limit.
    let refunded = p
        .create(order_request("CUST-K2", "PROD020", 5))
        .await
        .order_id;
    let released = p
        .create(order_request("CUST-K3", "PROD010", 3))
        .await
        .order_id;
    for id in [&confirmed, &refunded, &released] {
        p.final_order(id).await;
    }
    p.refunded_payment(&refunded).await;
    let sources = p.invariant_sources();
    eventually("the invariants to hold", || async {
        let report = shopctl::invariants::check(&sources).await.ok()?;
        report.ok().then_some(())
    })
    .await;
    p.stop().await;
    let report = shopctl::invariants::check(&sources).await.unwrap();
    assert!(report.ok(), "{:#?}", report.violations);
    let reservation: String =
        sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = $1::uuid")
            .bind(&released)
            .fetch_one(&sources.inventory)
            .await
            .unwrap();
    assert_eq!(reservation, "RELEASED");
    SettledRun {
        sources,
        confirmed,
        refunded,
        released,
    }
}

/// Checks `sources` and returns its one violation, failing if there are
/// none or several: each tampering must be caught, and by the invariant
/// it breaks.
async fn one_violation(sources: &Sources) -> (String, shopctl::invariants::Figures) {
    let report = shopctl::invariants::check(sources).await.unwrap();
    assert_eq!(report.violations.len(), 1, "{:#?}", report.violations);
    (report.violations[0].clone(), report.figures)
}

async fn assert_clean(sources: &Sources) {
    let report = shopctl::invariants::check(sources).await.unwrap();
    assert!(report.ok(), "{:#?}", report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invariant_checker_finds_items_without_their_order_or_reservation() {
    // No foreign key keeps items with their parents (the writers do): the
    // checker is what would see one that lost it.
    let run = settled_run().await;
    let src = &run.sources;

    let orphan = uuid::Uuid::now_v7();
    let orders = (
        &src.orders,
        "DELETE FROM order_items WHERE order_id = $1",
        "INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price_units)
         VALUES ($1, 1, 'PROD001', 1, 100)",
        "order_items but no order row",
    );
    let inventory = (
        &src.inventory,
        "DELETE FROM reservation_items WHERE order_id = $1",
        "INSERT INTO reservation_items (order_id, product_id, quantity) VALUES ($1, 'PROD001', 1)",
        "reservation_items but no reservation",
    );
    for (db, delete, insert, expected) in [orders, inventory] {
        sqlx::query(insert).bind(orphan).execute(db).await.unwrap();
        let (violation, _) = one_violation(src).await;
        assert!(
            violation.contains(expected) && violation.contains(&orphan.to_string()),
            "{violation}"
        );
        sqlx::query(delete).bind(orphan).execute(db).await.unwrap();
        assert_clean(src).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invariant_checker_finds_outbox_rows_that_never_reached_a_topic() {
    let run = settled_run().await;
    let src = &run.sources;

    // An event written with its state change that the relay never sent.
    let stuck = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (topic, key, event_type, event_id, payload)
         VALUES ($1, 'CUST-K2', $2, $3, ''::bytea)",
    )
    .bind(src.kafka.topic("payments"))
    .bind(events::PaymentRefunded::EVENT_TYPE)
    .bind(stuck)
    .execute(&src.payments)
    .await
    .unwrap();
    let (violation, figures) = one_violation(src).await;
    assert!(
        violation.contains("payment outbox rows never published")
            && violation.contains(&stuck.to_string()),
        "{violation}"
    );
    assert_eq!(
        figures.unpublished_outbox_rows,
        PerService {
            order: 0,
            payment: 1,
            inventory: 0
        }
    );
    sqlx::query("DELETE FROM outbox WHERE event_id = $1")
        .bind(stuck)
        .execute(&src.payments)
        .await
        .unwrap();
    assert_clean(src).await;

    // A row marked published whose record never reached the topic.
    let lost = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (topic, key, event_type, event_id, payload, published_at)
         VALUES ($1, 'CUST-K1', $2, $3, ''::bytea, now())",
    )
    .bind(src.kafka.topic("orders"))
    .bind(events::OrderConfirmed::EVENT_TYPE)
    .bind(lost)
    .execute(&src.orders)
    .await
    .unwrap();
    let (violation, figures) = one_violation(src).await;
    assert!(
        violation.contains("order outbox rows marked published whose event is not on the topics")
            && violation.contains(&lost.to_string()),
        "{violation}"
    );
    assert_eq!(figures.published_outbox_rows_not_on_topics, 1);
    assert_eq!(figures.unpublished_outbox_rows, PerService::default());
    sqlx::query("DELETE FROM outbox WHERE event_id = $1")
        .bind(lost)
        .execute(&src.orders)
        .await
        .unwrap();
    assert_clean(src).await;
}

/// A v7 id created at `ms` (Unix milliseconds).
fn id_at(ms: u64) -> uuid::Uuid {
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1_000, 0);
    uuid::Uuid::new_v7(ts)
}

/// Records a `PaymentRefunded` about a made-up order, which only order's
/// consumer would apply (nothing about it is in the state).
async fn publish_refund(kafka: &KafkaConfig, event_id: uuid::Uuid) {
    let event = events::PaymentRefunded {
        event_id: event_id.to_string(),
        order_id: id_at(event_id_ms(event_id)).to_string(),
        customer_id: "CUST-W1".into(),
        ..Default::default()
    };
    let payload = event.encode_to_vec();
    let topic = kafka.topic("payments");
    send(
        &common::kafka::producer(kafka).unwrap(),
        FutureRecord::to(&topic)
            .key(event.customer_id.as_bytes())
            .payload(payload.as_slice())
            .headers(common::kafka::event_headers(
                events::PaymentRefunded::EVENT_TYPE,
                &event_id,
            )),
    )
    .await;
}

fn event_id_ms(id: uuid::Uuid) -> u64 {
    let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
    secs * 1_000 + u64::from(nanos) / 1_000_000
}

async fn mark_processed(db: &sqlx::PgPool, event_id: uuid::Uuid) {
    sqlx::query(
        "INSERT INTO processed_events (event_id, event_type, topic, partition, kafka_offset)
         VALUES ($1, 'shop.payment.v1.PaymentRefunded', 'w', 0, 0)",
    )
    .bind(event_id)
    .execute(db)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invariant_checker_pairs_ids_only_where_topics_and_processed_events_still_hold_them() {
    // Topics keep records for their retention.ms and each service drops its
    // processed_events partitions after PROCESSED_RETENTION_SECS: history
    // older than either is gone from one side, and must not read as lost.
    let run = settled_run().await;
    let src = &run.sources;
    let first_order = event_id_ms(run.confirmed.parse().unwrap());
    let report = shopctl::invariants::check(src).await.unwrap();
    let start = report.figures.window_start_ms;
    assert!(
        0 < start && start <= first_order,
        "the topics' retention bounds the window and this run is inside it: {start}"
    );
    assert_eq!(report.figures.orders_before_window, 0);

    // Payment's relay drops its oldest partition once expired (here by
    // hand, the migration's partition of the rows that predate it): the
    // window then starts where payment's oldest kept partition does.
    let oldest: String = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'processed_events'::regclass ORDER BY 1 LIMIT 1",
    )
    .fetch_one(&src.payments)
    .await
    .unwrap();
    assert!(oldest.starts_with("processed_events_0_"), "{oldest}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {oldest}")))
        .execute(&src.payments)
        .await
        .unwrap();
    let kept = common::partitions::kept_since(&mut src.payments.acquire().await.unwrap())
        .await
        .unwrap();
    assert!(kept > start, "{kept}");
    let report = shopctl::invariants::check(src).await.unwrap();
    assert!(report.ok(), "{:#?}", report.violations);
    assert_eq!(report.figures.window_start_ms, kept);

    // Before the window, on both sides: an event no service applied (an
    // outbox row of long ago republished) and an applied event no topic
    // holds any more. Neither is reported.
    publish_refund(&src.kafka, id_at(kept - 3_600_000)).await;
    mark_processed(&src.payments, id_at(kept - 7_200_000)).await;
    assert_clean(src).await;

    // Inside the window both are: first the unapplied event...
    let recent = uuid::Uuid::now_v7();
    publish_refund(&src.kafka, recent).await;
    let (violation, _) = one_violation(src).await;
    assert!(
        violation.contains("order: 1 events never applied"),
        "{violation}"
    );
    mark_processed(&src.orders, recent).await;
    assert_clean(src).await;
    // ...then the applied event that is on no topic.
    mark_processed(&src.payments, uuid::Uuid::now_v7()).await;
    let (violation, _) = one_violation(src).await;
    assert!(
        violation.contains("payment: 1 applied events are not on the topics"),
        "{violation}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invariant_checker_finds_events_the_state_implies_missing_from_the_topics() {
    let run = settled_run().await;
    let src = &run.sources;
    let dbs = [&src.orders, &src.payments, &src.inventory];
    for db in dbs {
        sqlx::raw_sql(
            "CREATE TABLE kept_outbox (LIKE outbox);
             CREATE TABLE kept_processed_events (LIKE processed_events);",
        )
        .execute(db)
        .await
        .unwrap();
    }
    // Each event is lost as completely as it can be: not on its topic, its
    // outbox row gone (as if pruned) and applied by no consumer. Then only
    // the state that implies it is left to show it is missing.
    for (topic, event_type, order_id, expected) in [
        (
            "payments",
            events::PaymentRefunded::EVENT_TYPE,
            &run.refunded,
            "REFUNDED payments without PaymentRefunded",
        ),
        (
            "inventory",
            events::InventoryReleased::EVENT_TYPE,
            &run.released,
            "RELEASED reservations without InventoryReleased",
        ),
        (
            "orders",
            events::OrderConfirmed::EVENT_TYPE,
            &run.confirmed,
            "CONFIRMED orders without OrderConfirmed",
        ),
        (
            "orders",
            events::OrderCancelled::EVENT_TYPE,
            &run.refunded,
            "CANCELLED orders without OrderCancelled",
        ),
        (
            "orders",
            events::OrderCreated::EVENT_TYPE,
            &run.released,
            "orders without OrderCreated",
        ),
        (
            "payments",
            events::PaymentCompleted::EVENT_TYPE,
            &run.confirmed,
            "APPROVED payments without PaymentCompleted (approved)",
        ),
        (
            "inventory",
            events::InventoryUpdated::EVENT_TYPE,
            &run.confirmed,
            "RESERVED reservations without InventoryUpdated (reserved)",
        ),
    ] {
        let lost = event_about(&src.kafka, topic, event_type, order_id);
        for db in dbs {
            sqlx::query(
                "WITH gone AS (DELETE FROM outbox WHERE event_id = $1 RETURNING *)
                 INSERT INTO kept_outbox SELECT * FROM gone",
            )
            .bind(lost)
            .execute(db)
            .await
            .unwrap();
            sqlx::query(
                "WITH gone AS (DELETE FROM processed_events WHERE event_id = $1 RETURNING *)
                 INSERT INTO kept_processed_events SELECT * FROM gone",
            )
            .bind(lost)
            .execute(db)
            .await
            .unwrap();
        }
        let tampered = Sources {
            orders: src.orders.clone(),
            payments: src.payments.clone(),
            inventory: src.inventory.clone(),
            kafka: tampered_topics(&src.kafka, Tamper::Drop(lost)).await,
        };
        let (violation, figures) = one_violation(&tampered).await;
        assert!(
            violation.contains(expected) && violation.contains(order_id.as_str()),
            "{event_type} lost: {violation}"
        );
        assert_eq!(figures.missing_events, 1);
        for db in dbs {
            sqlx::raw_sql(
                "WITH back AS (DELETE FROM kept_outbox RETURNING *)
                 INSERT INTO outbox SELECT * FROM back;
                 WITH back AS (DELETE FROM kept_processed_events RETURNING *)
                 INSERT INTO processed_events SELECT * FROM back;",
            )
            .execute(db)
            .await
            .unwrap();
        }
    }
    // Everything put back, the original run checks clean.
    assert_clean(src).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invariant_checker_finds_order_statuses_the_other_sides_contradict() {
    let run = settled_run().await;
    let src = &run.sources;

    // Order never heard of the refund, or of the release.
    for (update, order_id, expected, restore) in [
        (
            "UPDATE orders SET payment_status = 'APPROVED' WHERE order_id = $1::uuid",
            &run.refunded,
            "recorded APPROVED but payment is REFUNDED",
            "UPDATE orders SET payment_status = 'REFUNDED' WHERE order_id = $1::uuid",
        ),
        (
            "UPDATE orders SET inventory_status = 'RESERVED' WHERE order_id = $1::uuid",
            &run.released,
            "recorded RESERVED but inventory is RELEASED",
            "UPDATE orders SET inventory_status = 'RELEASED' WHERE order_id = $1::uuid",
        ),
    ] {
        sqlx::query(update)
            .bind(order_id)
            .execute(&src.orders)
            .await
            .unwrap();
        let (violation, figures) = one_violation(src).await;
        assert!(
            violation.contains(expected) && violation.contains(order_id.as_str()),
            "{violation}"
        );
        assert_eq!(figures.status_disagreements, 1);
        sqlx::query(restore)
            .bind(order_id)
            .execute(&src.orders)
            .await
            .unwrap();
        assert_clean(src).await;
    }

    // Payment lost its decision on an order (the declined one: no money
    // moved, so only the missing row shows).
    sqlx::raw_sql("CREATE TABLE kept_payments (LIKE payments)")
        .execute(&src.payments)
        .await
        .unwrap();
    sqlx::query(
        "WITH gone AS (DELETE FROM payments WHERE order_id = $1::uuid RETURNING *)
         INSERT INTO kept_payments SELECT * FROM gone",
    )
    .bind(&run.released)
    .execute(&src.payments)
    .await
    .unwrap();
    let (violation, _) = one_violation(src).await;
    assert!(
        violation.contains("decided orders payment never decided")
            && violation.contains(run.released.as_str()),
        "{violation}"
    );
    sqlx::raw_sql("INSERT INTO payments SELECT * FROM kept_payments")
        .execute(&src.payments)
        .await
        .unwrap();
    assert_clean(src).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invariant_checker_finds_an_order_decided_twice() {
    let run = settled_run().await;
    let src = &run.sources;
    // A second OrderConfirmed (its own event id) for the confirmed order,
    // then one for the cancelled order. No consumer acts on OrderConfirmed,
    // so only the events themselves can show it.
    for (order_id, expected) in [
        (&run.confirmed, "orders with more than one OrderConfirmed"),
        (
            &run.refunded,
            "orders with both OrderConfirmed and OrderCancelled",
        ),
    ] {
        let event = events::OrderConfirmed {
            event_id: uuid::Uuid::now_v7().to_string(),
            occurred_at: None,
            order_id: order_id.clone(),
            customer_id: "CUST-K1".into(),
        };
        let tampered = Sources {
            orders: src.orders.clone(),
            payments: src.payments.clone(),
            inventory: src.inventory.clone(),
            kafka: tampered_topics(&src.kafka, Tamper::Confirm(event)).await,
        };
        let (violation, _) = one_violation(&tampered).await;
        assert!(
            violation.contains(expected) && violation.contains(order_id.as_str()),
            "{violation}"
        );
    }
}

/// The event id of the one record of `event_type` about `order_id` on a
/// topic of the run.
fn event_about(kafka: &KafkaConfig, topic: &str, event_type: &str, order_id: &str) -> uuid::Uuid {
    let ids: HashSet<uuid::Uuid> = shopctl::topic::read_all(kafka, &kafka.topic(topic))
        .unwrap()
        .iter()
        .filter(|m| header(m, "event-type") == Some(event_type))
        // Every event starts with event_id, occurred_at, order_id and
        // customer_id (fields 1 to 4), so each decodes as OrderConfirmed
        // far enough to tell its order.
        .filter(|m| {
            events::OrderConfirmed::decode(m.payload().unwrap_or_default())
                .is_ok_and(|e| e.order_id == order_id)
        })
        .filter_map(|m| header(m, "event-id")?.parse().ok())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "{event_type} of {order_id} on {topic}: {ids:?}"
    );
    ids.into_iter().next().unwrap()
}

fn header<'a>(m: &'a rdkafka::message::OwnedMessage, key: &str) -> Option<&'a str> {
    m.headers().and_then(|h| common::kafka::header_str(h, key))
}

/// What [`tampered_topics`] does to the copy.
enum Tamper {
    /// Leaves out the records of this event id.
    Drop(uuid::Uuid),
    /// Adds this `OrderConfirmed` to `orders`.
    Confirm(events::OrderConfirmed),
}

/// Copies the run's topics to topics under a new prefix, changed by
/// `tamper`, and returns the settings that read the copies: the topics as
/// they would be had the event never been published, or been published
/// too.
async fn tampered_topics(kafka: &KafkaConfig, tamper: Tamper) -> KafkaConfig {
    let copy = KafkaConfig {
        topic_prefix: format!("{}copy{}.", kafka.topic_prefix, e2e::unique_id()),
        ..kafka.clone()
    };
    common::kafka::ensure_topics(&copy, &common::topics::ALL, &CancellationToken::new())
        .await
        .unwrap();
    let producer = common::kafka::producer(&copy).unwrap();
    let lost = match &tamper {
        Tamper::Drop(id) => Some(id.to_string()),
        Tamper::Confirm(_) => None,
    };
    for name in common::topics::ALL {
        let to = copy.topic(name);
        for m in shopctl::topic::read_all(kafka, &kafka.topic(name)).unwrap() {
            if lost.is_some() && header(&m, "event-id") == lost.as_deref() {
                continue;
            }
            let mut record = FutureRecord::<[u8], [u8]>::to(&to).partition(m.partition());
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            if let Some(payload) = m.payload() {
                record = record.payload(payload);
            }
            if let Some(headers) = m.headers() {
                record = record.headers(headers.clone());
            }
            send(&producer, record).await;
        }
    }
    if let Tamper::Confirm(event) = tamper {
        let to = copy.topic("orders");
        let id: uuid::Uuid = event.event_id.parse().unwrap();
        let payload = event.encode_to_vec();
        send(
            &producer,
            FutureRecord::to(&to)
                .key(event.customer_id.as_bytes())
                .payload(payload.as_slice())
                .headers(common::kafka::event_headers(
                    events::OrderConfirmed::EVENT_TYPE,
                    &id,
                )),
        )
        .await;
    }
    copy
}

async fn send(producer: &FutureProducer, record: FutureRecord<'_, [u8], [u8]>) {
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}
