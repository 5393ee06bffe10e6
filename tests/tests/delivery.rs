//! Delivery guarantees that can be shown with the services in-process:
//! idempotency keys, redelivered events, records that cannot be applied,
//! dead-letter replay, and the saga deadline with compensation.

use std::time::Duration;

use e2e::{Options, Pipeline, eventually};
use prost::Message as _;
use rdkafka::{
    Message,
    message::{Header, OwnedHeaders},
    producer::FutureRecord,
};
use shop_proto::{
    EventName, events,
    order::{CreateOrderRequest, OrderStatus},
    payment::GetAccountRequest,
};
use tonic::Code;

fn order(customer: &str, product: &str, quantity: i32, key: &str) -> CreateOrderRequest {
    CreateOrderRequest {
        customer_id: customer.into(),
        product_id: product.into(),
        quantity,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

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
        .create_order(order("CUST-IDEM", "PROD001", 1, "key-1"))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .create_order(order("CUST-IDEM", "PROD001", 1, "key-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.order_id, again.order_id);
    let conflict = client
        .create_order(order("CUST-IDEM", "PROD001", 2, "key-1"))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert!(conflict.message().contains("key-1"), "{conflict:?}");

    // Ten retries racing each other with one key make one order.
    let racing = futures::future::join_all((0..10).map(|_| {
        let mut client = client.clone();
        async move {
            client
                .create_order(order("CUST-IDEM", "PROD004", 1, "key-race"))
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
    let created = p.create(order("CUST-DUP", "PROD003", 2, "")).await;
    assert_eq!(
        p.final_order(&created.order_id).await.status,
        OrderStatus::Confirmed as i32
    );
    let used = used_credit(&p, "CUST-DUP").await;
    let stock: i64 = sqlx::query_scalar("SELECT available FROM stock WHERE product_id = 'PROD003'")
        .fetch_one(&p.inventory_db)
        .await
        .unwrap();

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
    let created = p.create(order("CUST-BAD", "PROD006", 1, "")).await;
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
    let created = p.create(order("CUST-SLOW", "PROD007", 1, "")).await;
    let done = p.final_order(&created.order_id).await;
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
    let created = p.create(order("CUST-PRUNE", "PROD008", 1, "")).await;
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
                .create_order(order(customer, product, quantity, ""))
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
