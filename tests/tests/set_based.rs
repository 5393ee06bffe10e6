//! Payment and inventory apply a batch's run of `OrderCreated` set-based
//! (`common::saga`, `OrderSide::created_all`): a few statements per run,
//! each order decided in memory in event order. These tests prove the
//! set-based path is taken and decides exactly as one order at a time would.
//!
//! A burst of orders (with a duplicate, a cancellation that overtakes its
//! order and one that follows it) is produced onto `orders` while payment
//! and inventory are not running yet, so that they find it as one big batch.
//! Credit and stock run out in the middle of it. An independent model
//! applies the same records one after another with the documented rules;
//! the databases and the published events must be exactly what it says.
//! Everything goes to one partition, so that the order between customers
//! (which decides who gets the last units) is fixed.

use std::collections::{BTreeMap, HashMap, HashSet};

use common::{
    config::{DbConfig, KafkaConfig},
    saga::{CANCELLED_BEFORE_PAYMENT, CANCELLED_BEFORE_RESERVATION},
    topics,
};
use e2e::{create_database, eventually, test_kafka_config, test_pipeline_config, unique_id};
use prost::Message as _;
use rdkafka::{
    Message,
    message::OwnedMessage,
    producer::{FutureProducer, FutureRecord},
};
use shop_proto::{EventName, common::Money, events};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Credit limit of every account in these tests, in minor units.
const LIMIT: i64 = 10_000;
const CUSTOMERS: [&str; 4] = ["CUST-SB-A", "CUST-SB-B", "CUST-SB-C", "CUST-SB-D"];
/// Orders per customer.
const ROUNDS: usize = 30;

// --- the burst ---------------------------------------------------------------

/// One record of the burst.
#[derive(Clone, Debug)]
enum Input {
    Created {
        order_id: String,
        customer: &'static str,
        /// Distinct products, in product order.
        lines: Vec<(&'static str, i32)>,
        total: i64,
    },
    Cancelled {
        order_id: String,
        customer: &'static str,
        reason: &'static str,
    },
}

impl Input {
    fn customer(&self) -> &'static str {
        match self {
            Input::Created { customer, .. } | Input::Cancelled { customer, .. } => customer,
        }
    }
}

/// The orders cancelled in one run after order 90, in this order: paid and
/// reserved ones, one of them twice, one that was declined or rejected,
/// one not created yet (it arrives at 95, after its cancellation), and
/// order 2, cancelled once already.
const MASS_CANCELLATION: [usize; 9] = [3, 7, 11, 3, 13, 95, 12, 2, 16];

/// Order `n` of the burst: products with little stock (PROD020 3,
/// PROD010 25, PROD009 50) asked for more often than they last, some orders
/// all-or-nothing over two of them, one with an unknown product, totals
/// that exhaust each customer's credit about halfway.
fn nth_order(n: usize, order_id: String) -> Input {
    let q = |k: usize| i32::try_from(1 + n % k).expect("small");
    let mut lines = match n % 5 {
        0 => vec![("PROD010", q(3))],
        1 => vec![("PROD020", 1)],
        2 => vec![("PROD009", 2), ("PROD010", 1)],
        3 => vec![("PROD001", q(4))],
        _ => vec![("PROD009", q(2)), ("PROD001", 1)],
    };
    if n == 57 {
        lines = vec![("PROD001", 1), ("PROD999", 1)];
    }
    // As inventory merges them: one line per product, in product order.
    lines.sort_unstable();
    Input::Created {
        order_id,
        customer: CUSTOMERS[n % CUSTOMERS.len()],
        lines,
        total: 300 + i64::try_from(n * 137 % 900).expect("small"),
    }
}

/// The burst, in the order it is produced: `ROUNDS` orders per customer,
/// interleaved; order 6 a second time under a new event id; order 70
/// cancelled before its creation arrives; order 2 (paid and reserved)
/// cancelled in the middle, after which its customer's later orders may
/// use the credit and stock given back; after order 90 a run of
/// [`MASS_CANCELLATION`] (consecutive cancellations, applied as one run).
/// `bad` adds an `OrderCreated` whose order id is not a UUID after order 30.
fn burst(bad: bool) -> Vec<Input> {
    let ids: Vec<String> = (0..ROUNDS * CUSTOMERS.len())
        .map(|_| Uuid::now_v7().to_string())
        .collect();
    let mut inputs = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        inputs.push(nth_order(n, id.clone()));
        match n {
            20 => inputs.push(Input::Cancelled {
                order_id: ids[70].clone(),
                customer: CUSTOMERS[70 % CUSTOMERS.len()],
                reason: "the customer gave up",
            }),
            30 if bad => inputs.push(Input::Created {
                order_id: "not-a-uuid".into(),
                customer: CUSTOMERS[0],
                lines: vec![("PROD001", 1)],
                total: 100,
            }),
            40 => inputs.push(nth_order(6, ids[6].clone())),
            50 => inputs.push(Input::Cancelled {
                order_id: ids[2].clone(),
                customer: CUSTOMERS[2],
                reason: "the customer changed their mind",
            }),
            90 => {
                for k in MASS_CANCELLATION {
                    inputs.push(Input::Cancelled {
                        order_id: ids[k].clone(),
                        customer: CUSTOMERS[k % CUSTOMERS.len()],
                        reason: "the sale was called off",
                    });
                }
            }
            _ => {}
        }
    }
    inputs
}

/// Produces the burst onto partition 0 of `orders`, keyed by customer.
async fn produce(producer: &FutureProducer, topic: &str, inputs: &[Input]) {
    for input in inputs {
        let event_id = Uuid::now_v7();
        let (event_type, payload) = match input {
            Input::Created {
                order_id,
                customer,
                lines,
                total,
            } => (
                events::OrderCreated::EVENT_TYPE,
                events::OrderCreated {
                    event_id: event_id.to_string(),
                    occurred_at: Some(common::time::now()),
                    order_id: order_id.clone(),
                    customer_id: (*customer).to_owned(),
                    items: lines
                        .iter()
                        .map(|(product_id, quantity)| events::OrderLine {
                            product_id: (*product_id).to_owned(),
                            quantity: *quantity,
                            unit_price: None,
                        })
                        .collect(),
                    total: Some(Money {
                        currency: "USD".into(),
                        units: *total,
                    }),
                }
                .encode_to_vec(),
            ),
            Input::Cancelled {
                order_id,
                customer,
                reason,
            } => (
                events::OrderCancelled::EVENT_TYPE,
                events::OrderCancelled {
                    event_id: event_id.to_string(),
                    occurred_at: Some(common::time::now()),
                    order_id: order_id.clone(),
                    customer_id: (*customer).to_owned(),
                    reason: (*reason).to_owned(),
                }
                .encode_to_vec(),
            ),
        };
        producer
            .send(
                FutureRecord::to(topic)
                    .partition(0)
                    .key(input.customer())
                    .payload(&payload)
                    .headers(common::kafka::event_headers(event_type, &event_id)),
                std::time::Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }
}

// --- the model: the same records, one at a time --------------------------------

/// What the two sides must end with, by the rules of `payment::domain` and
/// `inventory::domain` applied one record after another.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    /// Credit in use, by customer.
    used: BTreeMap<String, i64>,
    /// order id → (status, reason, amount).
    payments: BTreeMap<String, (String, String, i64)>,
    /// product → (available, reserved), of the products the burst names.
    stock: BTreeMap<String, (i64, i64)>,
    /// order id → (status, reason).
    reservations: BTreeMap<String, (String, String)>,
    /// (order id, product) → quantity.
    items: BTreeMap<(String, String), i64>,
    /// Events on `payments`, by key, in order, as text.
    payment_events: BTreeMap<String, Vec<String>>,
    /// Events on `inventory`, by key, in order, as text.
    inventory_events: BTreeMap<String, Vec<String>>,
}

fn items_text<'a>(lines: impl IntoIterator<Item = (&'a str, i32)>) -> String {
    lines
        .into_iter()
        .map(|(p, q)| format!("{p}x{q}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[allow(clippy::too_many_lines)]
fn model(inputs: &[Input]) -> Outcome {
    let mut out = Outcome::default();
    let catalog: HashMap<String, i64> = common::catalog::products()
        .into_iter()
        .map(|p| (p.product_id, p.initial_stock))
        .collect();
    let mut lines_of: HashMap<String, Vec<(&str, i32)>> = HashMap::new();
    for input in inputs {
        match input {
            Input::Created {
                order_id,
                customer,
                lines,
                total,
            } => {
                if Uuid::parse_str(order_id).is_err() {
                    continue; // dead-lettered
                }
                let customer = (*customer).to_owned();
                let used = out.used.entry(customer.clone()).or_insert(0);
                for (product, _) in lines {
                    if let Some(units) = catalog.get(*product) {
                        out.stock
                            .entry((*product).to_owned())
                            .or_insert((*units, 0));
                    }
                }
                if !out.payments.contains_key(order_id) {
                    let (status, reason) = if *used + total <= LIMIT {
                        *used += total;
                        ("APPROVED", String::new())
                    } else {
                        (
                            "DECLINED",
                            format!(
                                "insufficient credit: order total {total} USD exceeds available credit {} USD",
                                LIMIT - *used
                            ),
                        )
                    };
                    out.payment_events
                        .entry(customer.clone())
                        .or_default()
                        .push(format!("completed {order_id} {status} {total} {reason}"));
                    out.payments
                        .insert(order_id.clone(), (status.into(), reason, *total));
                }
                if !out.reservations.contains_key(order_id) {
                    let unknown: Vec<&str> = lines
                        .iter()
                        .filter(|(p, _)| !out.stock.contains_key(*p))
                        .map(|(p, _)| *p)
                        .collect();
                    let short: Vec<String> = lines
                        .iter()
                        .filter_map(|(p, q)| {
                            let (available, _) = out.stock.get(*p)?;
                            (i64::from(*q) > *available)
                                .then(|| format!("{p} (requested {q}, available {available})"))
                        })
                        .collect();
                    let mut reasons = Vec::new();
                    match unknown.as_slice() {
                        [] => {}
                        [one] => reasons.push(format!("unknown product {one}")),
                        many => reasons.push(format!("unknown products {}", many.join(", "))),
                    }
                    if !short.is_empty() {
                        reasons.push(format!("out of stock: {}", short.join(", ")));
                    }
                    let reason = reasons.join("; ");
                    let status = if reason.is_empty() {
                        for (p, q) in lines {
                            let row = out.stock.get_mut(*p).expect("known");
                            row.0 -= i64::from(*q);
                            row.1 += i64::from(*q);
                        }
                        "RESERVED"
                    } else {
                        "REJECTED"
                    };
                    for (p, q) in lines {
                        out.items
                            .insert((order_id.clone(), (*p).to_owned()), i64::from(*q));
                    }
                    lines_of.insert(order_id.clone(), lines.clone());
                    out.inventory_events
                        .entry(customer)
                        .or_default()
                        .push(format!(
                            "updated {order_id} {status} [{}] {reason}",
                            items_text(lines.iter().copied())
                        ));
                    out.reservations
                        .insert(order_id.clone(), (status.into(), reason));
                }
            }
            Input::Cancelled {
                order_id,
                customer,
                reason,
            } => {
                match out.payments.get_mut(order_id) {
                    None => {
                        out.payments.insert(
                            order_id.clone(),
                            ("DECLINED".into(), CANCELLED_BEFORE_PAYMENT.into(), 0),
                        );
                    }
                    Some(payment) if payment.0 == "APPROVED" => {
                        *payment = ("REFUNDED".into(), (*reason).into(), payment.2);
                        *out.used.get_mut(*customer).expect("account") -= payment.2;
                        out.payment_events
                            .entry((*customer).to_owned())
                            .or_default()
                            .push(format!("refunded {order_id} {} {reason}", payment.2));
                    }
                    Some(_) => {}
                }
                match out.reservations.get_mut(order_id) {
                    None => {
                        out.reservations.insert(
                            order_id.clone(),
                            ("REJECTED".into(), CANCELLED_BEFORE_RESERVATION.into()),
                        );
                    }
                    Some(reservation) if reservation.0 == "RESERVED" => {
                        *reservation = ("RELEASED".into(), (*reason).into());
                        let lines = &lines_of[order_id];
                        for (p, q) in lines {
                            let row = out.stock.get_mut(*p).expect("known");
                            row.0 += i64::from(*q);
                            row.1 -= i64::from(*q);
                        }
                        out.inventory_events
                            .entry((*customer).to_owned())
                            .or_default()
                            .push(format!(
                                "released {order_id} [{}] {reason}",
                                items_text(lines.iter().copied())
                            ));
                    }
                    Some(_) => {}
                }
            }
        }
    }
    out
}

// --- what the services did ---------------------------------------------------

/// Starts payment and inventory in-process on their databases, consuming
/// test `id`'s topics.
fn start_sides(
    id: &str,
    payments_url: &str,
    inventory_url: &str,
    shutdown: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    common::telemetry::init_for_tests();
    let db = |url: &str| DbConfig {
        url: url.into(),
        max_connections: 5,
    };
    let mut payment_cfg = payment::Config::from_env().expect("payment config");
    payment_cfg.grpc_addr = e2e::free_addr();
    payment_cfg.metrics_addr = ([127, 0, 0, 1], 0).into();
    payment_cfg.db = db(payments_url);
    payment_cfg.kafka = test_kafka_config(id, "payment");
    payment_cfg.pipeline = test_pipeline_config();
    payment_cfg.default_credit_limit = LIMIT;
    payment_cfg.default_currency = "USD".into();

    let mut inventory_cfg = inventory::Config::from_env().expect("inventory config");
    inventory_cfg.grpc_addr = e2e::free_addr();
    inventory_cfg.metrics_addr = ([127, 0, 0, 1], 0).into();
    inventory_cfg.db = db(inventory_url);
    inventory_cfg.kafka = test_kafka_config(id, "inventory");
    inventory_cfg.pipeline = test_pipeline_config();

    let payment = payment::build(payment_cfg, shutdown.clone());
    let inventory = inventory::build(inventory_cfg, shutdown.clone());
    vec![
        tokio::spawn(async move {
            payment
                .await
                .expect("payment starts")
                .run()
                .await
                .expect("payment runs");
        }),
        tokio::spawn(async move {
            inventory
                .await
                .expect("inventory starts")
                .run()
                .await
                .expect("inventory runs");
        }),
    ]
}

/// The events of `topic` as the model writes them, by key.
fn event_texts(records: &[OwnedMessage]) -> BTreeMap<String, Vec<String>> {
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // `read_all` returns partition order, then offset order: per key (one
    // partition), the order it was published in.
    for m in records {
        let key = String::from_utf8(m.key().expect("key").to_vec()).expect("utf-8 key");
        let event_type = m
            .headers()
            .and_then(|h| common::kafka::header_str(h, "event-type"))
            .expect("event-type");
        let payload = m.payload().expect("payload");
        let items = |items: &[events::StockLine]| {
            items_text(items.iter().map(|l| (l.product_id.as_str(), l.quantity)))
        };
        let text = match event_type {
            events::PaymentCompleted::EVENT_TYPE => {
                let e = events::PaymentCompleted::decode(payload).expect("decode");
                assert_eq!(e.customer_id, key, "keyed by customer");
                let status = match events::PaymentOutcome::try_from(e.outcome) {
                    Ok(events::PaymentOutcome::Approved) => "APPROVED",
                    Ok(events::PaymentOutcome::Declined) => "DECLINED",
                    other => panic!("outcome {other:?}"),
                };
                let amount = e.amount.expect("amount");
                assert_eq!(amount.currency, "USD");
                format!(
                    "completed {} {status} {} {}",
                    e.order_id, amount.units, e.reason
                )
            }
            events::PaymentRefunded::EVENT_TYPE => {
                let e = events::PaymentRefunded::decode(payload).expect("decode");
                assert_eq!(e.customer_id, key, "keyed by customer");
                format!(
                    "refunded {} {} {}",
                    e.order_id,
                    e.amount.expect("amount").units,
                    e.reason
                )
            }
            events::InventoryUpdated::EVENT_TYPE => {
                let e = events::InventoryUpdated::decode(payload).expect("decode");
                assert_eq!(e.customer_id, key, "keyed by customer");
                let status = match events::InventoryOutcome::try_from(e.outcome) {
                    Ok(events::InventoryOutcome::Reserved) => "RESERVED",
                    Ok(events::InventoryOutcome::Rejected) => "REJECTED",
                    other => panic!("outcome {other:?}"),
                };
                format!(
                    "updated {} {status} [{}] {}",
                    e.order_id,
                    items(&e.items),
                    e.reason
                )
            }
            events::InventoryReleased::EVENT_TYPE => {
                let e = events::InventoryReleased::decode(payload).expect("decode");
                assert_eq!(e.customer_id, key, "keyed by customer");
                format!("released {} [{}] {}", e.order_id, items(&e.items), e.reason)
            }
            other => panic!("unexpected event type {other}"),
        };
        by_key.entry(key).or_default().push(text);
    }
    by_key
}

/// Waits until `db` has `rows` rows in `table` and every outbox row it
/// wrote is published (the rows and their events commit together), so that
/// a wrong number of events shows as a difference, not as a timeout.
async fn settled(db: &PgPool, table: &str, rows: usize) {
    let query = format!(
        "SELECT (SELECT count(*) FROM {table}),
                (SELECT count(*) FROM outbox WHERE published_at IS NULL)"
    );
    eventually(
        &format!("{table}: {rows} rows, all events published"),
        || async {
            let (n, pending): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(query.clone()))
                .fetch_one(db)
                .await
                .ok()?;
            (usize::try_from(n) == Ok(rows) && pending == 0).then_some(())
        },
    )
    .await;
}

/// What the databases and topics hold, in the model's terms.
async fn observed(payments: &PgPool, inventory: &PgPool, kafka: &KafkaConfig) -> Outcome {
    let used: Vec<(String, i64)> = sqlx::query_as("SELECT customer_id, used_units FROM accounts")
        .fetch_all(payments)
        .await
        .unwrap();
    let rows: Vec<(Uuid, String, String, i64)> =
        sqlx::query_as("SELECT order_id, status, reason, amount_units FROM payments")
            .fetch_all(payments)
            .await
            .unwrap();
    let stock: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT product_id, available, reserved FROM stock
         WHERE product_id IN ('PROD001', 'PROD009', 'PROD010', 'PROD020')",
    )
    .fetch_all(inventory)
    .await
    .unwrap();
    let reservations: Vec<(Uuid, String, String)> =
        sqlx::query_as("SELECT order_id, status, reason FROM reservations")
            .fetch_all(inventory)
            .await
            .unwrap();
    let items: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT order_id, product_id, quantity FROM reservation_items")
            .fetch_all(inventory)
            .await
            .unwrap();
    let read =
        |name: &str| shopctl::topic::read_all(kafka, &kafka.topic(name)).expect("read topic");
    Outcome {
        used: used.into_iter().collect(),
        payments: rows
            .into_iter()
            .map(|(id, status, reason, amount)| (id.to_string(), (status, reason, amount)))
            .collect(),
        stock: stock
            .into_iter()
            .map(|(p, available, reserved)| (p, (available, reserved)))
            .collect(),
        reservations: reservations
            .into_iter()
            .map(|(id, status, reason)| (id.to_string(), (status, reason)))
            .collect(),
        items: items
            .into_iter()
            .map(|(id, p, q)| ((id.to_string(), p), q))
            .collect(),
        payment_events: event_texts(&read(topics::PAYMENTS)),
        inventory_events: event_texts(&read(topics::INVENTORY)),
    }
}

/// A counter of the in-process metrics recorder (the services of this
/// test share it with other tests of this binary; the topic label, which
/// carries this test's prefix, tells them apart).
fn counter(name: &str, topic: &str, side: &str, event_type: &str) -> u64 {
    let text = common::metrics::install().render();
    text.lines()
        .filter(|l| {
            l.starts_with(&format!("{name}{{"))
                && l.contains(&format!("topic=\"{topic}\""))
                && l.contains(&format!("side=\"{side}\""))
                && l.contains(&format!("event_type=\"{event_type}\""))
        })
        .map(|l| {
            l.rsplit_once(' ')
                .and_then(|(_, v)| v.parse::<u64>().ok())
                .expect("counter value")
        })
        .sum()
}

/// A scenario that ran and matched the model.
struct Run {
    id: String,
    kafka: KafkaConfig,
    expected: Outcome,
    inputs: Vec<Input>,
}

/// One run of the scenario: produce the burst, start the sides, wait for
/// the model's number of results, compare everything with the model.
async fn run_burst(bad: bool) -> Run {
    let id = unique_id();
    let (payments_url, inventory_url) = tokio::join!(
        create_database(format!("t_{id}_payments")),
        create_database(format!("t_{id}_inventory")),
    );
    let kafka = test_kafka_config(&id, "test");
    let shutdown = CancellationToken::new();
    common::kafka::ensure_topics(
        &kafka,
        &[topics::ORDERS, topics::PAYMENTS, topics::INVENTORY],
        &shutdown,
    )
    .await
    .expect("topics");
    let inputs = burst(bad);
    let producer = common::kafka::producer(&kafka).expect("producer");
    produce(&producer, &kafka.topic(topics::ORDERS), &inputs).await;

    let expected = model(&inputs);
    let tasks = start_sides(&id, &payments_url, &inventory_url, &shutdown);
    let payments = PgPool::connect(&payments_url).await.unwrap();
    let inventory = PgPool::connect(&inventory_url).await.unwrap();
    let started = std::time::Instant::now();
    tokio::join!(
        settled(&payments, "payments", expected.payments.len()),
        settled(&inventory, "reservations", expected.reservations.len()),
    );
    eprintln!(
        "{} records decided in {:?}",
        inputs.len(),
        started.elapsed()
    );
    let got = observed(&payments, &inventory, &kafka).await;

    // Field by field first, for a readable failure.
    assert_eq!(got.used, expected.used, "credit in use per customer");
    assert_eq!(
        got.stock, expected.stock,
        "available and reserved per product"
    );
    assert_eq!(got.payments, expected.payments, "payment rows");
    assert_eq!(got.reservations, expected.reservations, "reservations");
    assert_eq!(got.items, expected.items, "reservation items");
    assert_eq!(
        got.payment_events, expected.payment_events,
        "payments topic"
    );
    assert_eq!(
        got.inventory_events, expected.inventory_events,
        "inventory topic"
    );
    assert_eq!(got, expected);

    shutdown.cancel();
    for task in tasks {
        task.await.expect("service task");
    }
    Run {
        id,
        kafka,
        expected,
        inputs,
    }
}

/// The scenario must exercise what it claims: credit and stock running out
/// in the middle of the burst, for every customer and the scarce products.
fn assert_scenario_bites(expected: &Outcome) {
    let status_count = |status: &str| {
        expected
            .payments
            .values()
            .filter(|(s, _, _)| s == status)
            .count()
    };
    assert!(status_count("APPROVED") >= 20, "{expected:#?}");
    assert!(status_count("DECLINED") >= 20, "{expected:#?}");
    // Order 2, then at least three of the run of cancellations.
    assert!(status_count("REFUNDED") >= 4, "{expected:#?}");
    for customer in CUSTOMERS {
        let events = &expected.payment_events[customer];
        assert!(
            events.iter().any(|e| e.contains(" APPROVED ")),
            "{customer}"
        );
        assert!(
            events.iter().any(|e| e.contains(" DECLINED ")),
            "{customer}"
        );
    }
    let rejected = |what: &str| {
        expected
            .reservations
            .values()
            .filter(|(s, r)| s == "REJECTED" && r.contains(what))
            .count()
    };
    for product in ["PROD009", "PROD010", "PROD020"] {
        assert!(rejected(product) >= 3, "{product}: {expected:#?}");
        // Some went through before it ran out.
        assert!(expected.stock[product].1 > 0, "{product}");
    }
    assert_eq!(rejected("unknown product PROD999"), 1);
    // Orders 70 and 95, each cancelled before it arrived.
    assert_eq!(rejected(CANCELLED_BEFORE_RESERVATION), 2);
    let released = expected
        .reservations
        .values()
        .filter(|(s, _)| s == "RELEASED")
        .count();
    assert!(released >= 4, "{expected:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_is_applied_set_based_exactly_as_one_order_at_a_time() {
    let Run {
        kafka,
        expected,
        inputs,
        ..
    } = run_burst(false).await;
    assert_scenario_bites(&expected);

    // Every OrderCreated went through the set-based path (none fell back
    // to one record at a time), in runs far longer than one, and so did
    // every OrderCancelled, the mass cancellation in a run of more than one.
    let created = inputs
        .iter()
        .filter(|i| matches!(i, Input::Created { .. }))
        .count() as u64;
    let cancelled = inputs.len() as u64 - created;
    let topic = kafka.topic(topics::ORDERS);
    for side in ["payment", "inventory"] {
        let count = |name: &str, event_type: &str| counter(name, &topic, side, event_type);
        let events = count(
            "shop_consumer_set_based_events_total",
            events::OrderCreated::EVENT_TYPE,
        );
        let runs = count(
            "shop_consumer_set_based_runs_total",
            events::OrderCreated::EVENT_TYPE,
        );
        eprintln!("{side}: {events} orders in {runs} set-based runs");
        assert_eq!(events, created, "{side}: every OrderCreated, set-based");
        // Three runs of cancellations split the burst into at least four.
        assert!(
            (4..=created / 10).contains(&runs),
            "{side}: {runs} runs for {created} orders"
        );
        let events = count(
            "shop_consumer_set_based_events_total",
            events::OrderCancelled::EVENT_TYPE,
        );
        let runs = count(
            "shop_consumer_set_based_runs_total",
            events::OrderCancelled::EVENT_TYPE,
        );
        eprintln!("{side}: {events} cancellations in {runs} set-based runs");
        assert_eq!(events, cancelled, "{side}: every OrderCancelled, set-based");
        assert!(
            (3..cancelled).contains(&runs),
            "{side}: {runs} runs for {cancelled} cancellations"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_record_in_a_burst_is_dead_lettered_alone_and_the_rest_decided_alike() {
    let Run {
        id,
        kafka,
        expected,
        ..
    } = run_burst(true).await;
    assert_scenario_bites(&expected);

    // The batch that held it failed as a whole, was replayed one record at
    // a time, and only the bad record was dead-lettered, once per group.
    let letters = shopctl::dlq::list(&kafka, topics::ORDERS).expect("read the DLQ");
    let mut groups: Vec<&str> = letters
        .iter()
        .map(|l| l.consumer_group.as_deref().expect("group header"))
        .collect();
    groups.sort_unstable();
    assert_eq!(
        groups,
        [
            test_kafka_config(&id, "inventory").group_id,
            test_kafka_config(&id, "payment").group_id,
        ],
        "{letters:?}"
    );
    for letter in &letters {
        let error = letter.error.as_deref().unwrap_or_default();
        assert!(error.contains("\"not-a-uuid\" is not a UUID"), "{error}");
        assert_eq!(letter.key.as_deref(), Some(CUSTOMERS[0]));
    }
    let seen: HashSet<&str> = expected.payments.keys().map(String::as_str).collect();
    assert!(!seen.contains("not-a-uuid"));
}
