//! The invariant checker: reads all three databases and the topics and
//! reports every way in which "nothing lost, nothing done twice" does not
//! hold, with the figures that describe the run.
//!
//! Run it when the pipeline is quiet (no order PENDING); the fault suite
//! polls it until it holds or a deadline passes. Stock is checked against
//! inventory's ledger of adjustments (the seed and every `SetStock`).

use std::collections::{HashMap, HashSet};

use rdkafka::Message;
use serde::Serialize;
use shop_proto::{EventName, events};
use sqlx::PgPool;
use uuid::Uuid;

use common::{config::KafkaConfig, kafka, saga, topics};

pub struct Sources {
    pub orders: PgPool,
    pub payments: PgPool,
    pub inventory: PgPool,
    pub kafka: KafkaConfig,
}

/// What the checker counted.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub orders: i64,
    pub confirmed: i64,
    pub cancelled: i64,
    pub pending: i64,
    pub confirmed_total_units: i64,
    pub charged_units: i64,
    pub refunded_payments: i64,
    pub released_reservations: i64,
    /// Records on the three topics, and how many repeated an event id
    /// already on the topic (outbox republished after a crash).
    pub event_records: usize,
    pub duplicate_records: usize,
    /// Redeliveries the consumers recognised and dropped.
    pub duplicates_suppressed: i64,
    pub dead_letters: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub figures: Figures,
    pub violations: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

pub async fn check(src: &Sources) -> anyhow::Result<Report> {
    let mut r = Report::default();
    let v = &mut r.violations;
    let f = &mut r.figures;

    // --- orders -----------------------------------------------------------
    let orders: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT order_id, status, total_units FROM orders")
            .fetch_all(&src.orders)
            .await?;
    f.orders = orders.len() as i64;
    for (id, status, total) in &orders {
        match status.as_str() {
            "CONFIRMED" => {
                f.confirmed += 1;
                f.confirmed_total_units += total;
            }
            "CANCELLED" => f.cancelled += 1,
            _ => {
                f.pending += 1;
                v.push(format!("order {id} is still {status}"));
            }
        }
    }
    let order_status: HashMap<Uuid, (&str, i64)> = orders
        .iter()
        .map(|(id, s, t)| (*id, (s.as_str(), *t)))
        .collect();

    // --- payments ---------------------------------------------------------
    let payments: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT order_id, status, amount_units FROM payments")
            .fetch_all(&src.payments)
            .await?;
    let mut paid: HashMap<Uuid, (&str, i64)> = HashMap::new();
    for (id, status, amount) in &payments {
        paid.insert(*id, (status.as_str(), *amount));
        match status.as_str() {
            "APPROVED" => f.charged_units += amount,
            "REFUNDED" => f.refunded_payments += 1,
            _ => {}
        }
        if !order_status.contains_key(id) {
            v.push(format!("payment for unknown order {id}"));
        }
    }
    let used: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(used_units), 0)::bigint FROM accounts")
        .fetch_one(&src.payments)
        .await?;
    if used != f.charged_units {
        v.push(format!(
            "credit in use {used} != approved, unrefunded payments {}",
            f.charged_units
        ));
    }
    if f.charged_units != f.confirmed_total_units {
        v.push(format!(
            "charged {} != total of confirmed orders {}",
            f.charged_units, f.confirmed_total_units
        ));
    }

    // --- reservations -----------------------------------------------------
    let reservations: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT order_id, status FROM reservations")
            .fetch_all(&src.inventory)
            .await?;
    let reserved: HashMap<Uuid, &str> = reservations
        .iter()
        .map(|(id, s)| (*id, s.as_str()))
        .collect();
    f.released_reservations = reservations.iter().filter(|(_, s)| s == "RELEASED").count() as i64;

    for (id, (status, total)) in &order_status {
        let payment = paid.get(id).map(|p| p.0);
        let reservation = reserved.get(id).copied();
        match *status {
            "CONFIRMED" => {
                if paid.get(id) != Some(&("APPROVED", *total)) {
                    v.push(format!(
                        "confirmed order {id} has payment {:?}",
                        paid.get(id)
                    ));
                }
                if reservation != Some("RESERVED") {
                    v.push(format!(
                        "confirmed order {id} has reservation {reservation:?}"
                    ));
                }
            }
            "CANCELLED" => {
                if payment == Some("APPROVED") {
                    v.push(format!("cancelled order {id} is still charged"));
                }
                if reservation == Some("RESERVED") {
                    v.push(format!("cancelled order {id} still holds stock"));
                }
            }
            _ => {}
        }
    }

    // --- per-customer order ---------------------------------------------
    // A cancellation applied before its order's creation leaves a marker
    // row; both events share a key, so a marker means order was broken.
    let early: i64 = sqlx::query_scalar("SELECT count(*) FROM payments WHERE reason = $1")
        .bind(saga::CANCELLED_BEFORE_PAYMENT)
        .fetch_one(&src.payments)
        .await?;
    let early_stock: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reservations WHERE reason = $1")
            .bind(saga::CANCELLED_BEFORE_RESERVATION)
            .fetch_one(&src.inventory)
            .await?;
    if early + early_stock > 0 {
        v.push(format!(
            "{early} payments and {early_stock} reservations saw OrderCancelled before OrderCreated"
        ));
    }

    // --- stock ------------------------------------------------------------
    let confirmed_qty: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT i.product_id, SUM(i.quantity)::bigint FROM order_items i
         JOIN orders o USING (order_id) WHERE o.status = 'CONFIRMED' GROUP BY i.product_id",
    )
    .fetch_all(&src.orders)
    .await?
    .into_iter()
    .collect();
    let stock: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT s.product_id, s.available, s.reserved,
                COALESCE((SELECT SUM(delta) FROM stock_adjustments a
                          WHERE a.product_id = s.product_id), 0)::bigint
         FROM stock s",
    )
    .fetch_all(&src.inventory)
    .await?;
    for (product, available, reserved, stocked) in stock {
        let sold = confirmed_qty.get(&product).copied().unwrap_or(0);
        if stocked != available + sold {
            v.push(format!(
                "{product}: stocked {stocked} != available {available} + confirmed {sold}"
            ));
        }
        if reserved != sold {
            v.push(format!(
                "{product}: reserved {reserved} != confirmed {sold}"
            ));
        }
    }

    // --- events -----------------------------------------------------------
    let mut dlq_ids_by_group: HashMap<String, HashSet<String>> = HashMap::new();
    let mut dlq_count_by_topic: HashMap<String, usize> = HashMap::new();
    for name in topics::ALL {
        let dead = crate::dlq::list(&src.kafka, name)?;
        f.dead_letters += dead.len();
        dlq_count_by_topic.insert(src.kafka.topic(name), dead.len());
        for d in dead {
            if let (Some(group), Some(id)) = (d.consumer_group, d.event_id) {
                dlq_ids_by_group.entry(group).or_default().insert(id);
            }
        }
    }
    let mut approvals: HashMap<String, HashSet<String>> = HashMap::new();
    let mut acted: HashMap<&str, HashSet<String>> = HashMap::new();
    for name in topics::ALL {
        let topic = src.kafka.topic(name);
        let records = crate::topic::read_all(&src.kafka, &topic)?;
        let mut seen = HashSet::new();
        for m in &records {
            let h = |k| m.headers().and_then(|hs| kafka::header_str(hs, k));
            let (Some(event_type), Some(event_id)) =
                (h(kafka::header::EVENT_TYPE), h(kafka::header::EVENT_ID))
            else {
                continue; // garbage injected on purpose: the DLQ covers it
            };
            f.event_records += 1;
            if !seen.insert(event_id.to_owned()) {
                f.duplicate_records += 1;
                continue;
            }
            if event_type == events::PaymentCompleted::EVENT_TYPE
                && let Ok(e) = <events::PaymentCompleted as prost::Message>::decode(
                    m.payload().unwrap_or_default(),
                )
                && e.outcome == events::PaymentOutcome::Approved as i32
            {
                approvals
                    .entry(e.order_id)
                    .or_default()
                    .insert(event_id.to_owned());
            }
            let acts = match event_type {
                t if t == events::OrderCreated::EVENT_TYPE
                    || t == events::OrderCancelled::EVENT_TYPE =>
                {
                    &["payment", "inventory"][..]
                }
                t if t == events::PaymentCompleted::EVENT_TYPE
                    || t == events::PaymentRefunded::EVENT_TYPE
                    || t == events::InventoryUpdated::EVENT_TYPE
                    || t == events::InventoryReleased::EVENT_TYPE =>
                {
                    &["order"][..]
                }
                _ => &[][..],
            };
            for service in acts {
                acted
                    .entry(service)
                    .or_default()
                    .insert(event_id.to_owned());
            }
        }
    }
    for (order, ids) in &approvals {
        if ids.len() > 1 {
            v.push(format!(
                "order {order} approved by {} payment events",
                ids.len()
            ));
        }
    }

    // Every valid event was applied exactly once by each service that acts
    // on it, unless it was dead-lettered (accounted for below).
    for (service, pool) in [
        ("payment", &src.payments),
        ("inventory", &src.inventory),
        ("order", &src.orders),
    ] {
        let processed: HashSet<String> =
            sqlx::query_scalar::<_, Uuid>("SELECT event_id FROM processed_events")
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|id| id.to_string())
                .collect();
        let dead = dlq_ids_by_group
            .iter()
            .filter(|(group, _)| group.ends_with(service))
            .flat_map(|(_, ids)| ids.iter().cloned())
            .collect::<HashSet<_>>();
        let expected = acted.remove(service).unwrap_or_default();
        let missing = expected
            .iter()
            .filter(|id| !processed.contains(*id) && !dead.contains(*id))
            .count();
        if missing > 0 {
            v.push(format!("{service}: {missing} events never applied"));
        }
        let unexpected = processed.difference(&expected).count();
        if unexpected > 0 {
            v.push(format!(
                "{service}: {unexpected} applied events are not on the topics"
            ));
        }
        let counters: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT topic, name, value FROM consumer_counters")
                .fetch_all(pool)
                .await?;
        for (_, name, value) in counters {
            if name == "duplicates_suppressed" {
                f.duplicates_suppressed += value;
            }
        }
    }

    // Every dead letter was counted by the consumer that wrote it.
    let mut counted: HashMap<String, i64> = HashMap::new();
    for pool in [&src.payments, &src.inventory, &src.orders] {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT topic, value FROM consumer_counters WHERE name = 'dead_lettered'",
        )
        .fetch_all(pool)
        .await?;
        for (topic, value) in rows {
            *counted.entry(topic).or_default() += value;
        }
    }
    for (topic, on_dlq) in dlq_count_by_topic {
        let by_consumers = counted.get(&topic).copied().unwrap_or(0);
        if by_consumers != on_dlq as i64 {
            v.push(format!(
                "{topic}: {on_dlq} dead letters on the DLQ but consumers counted {by_consumers}"
            ));
        }
    }
    Ok(r)
}
