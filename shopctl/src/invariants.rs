//! The invariant checker: reads all three databases and the topics and
//! reports every way in which "nothing lost, nothing stuck, nothing done
//! twice" does not hold, with the figures that describe the run.
//!
//! Run it when the pipeline is quiet (no order PENDING, relays drained);
//! the fault suite polls it until it holds or a deadline passes. It checks
//! both directions between state and events:
//!
//! - what reached the topics was applied: every event on a topic was
//!   applied exactly once by each service that acts on it (or
//!   dead-lettered), and no service applied an event that is not there;
//! - what the state implies reached the topics: every outbox row is
//!   published and its event is on the topics; every order has its
//!   `OrderCreated` and, once decided, its `OrderConfirmed` or
//!   `OrderCancelled`; every payment and reservation has the result event
//!   its status implies (a REFUNDED payment an approval and a
//!   `PaymentRefunded`, a RELEASED reservation a reservation and an
//!   `InventoryReleased`), and no order has one event twice or two that
//!   contradict each other;
//! - the sides agree: the payment and stock status order recorded for an
//!   order is what payment and inventory finally did (order applies
//!   `PaymentRefunded` and `InventoryReleased` too, so on a quiet pipeline
//!   the columns equal the other sides' statuses), money and stock are
//!   conserved (stock against inventory's ledger of adjustments: the seed
//!   and every `SetStock`).
//! - every item has its parent row (an order's items their order, a
//!   reservation's items their reservation): the writers guarantee it, no
//!   foreign key does (BENCHMARKS.md says what the keys cost).
//!
//! Outbox rows are pruned after `OUTBOX_RETENTION_SECS`, so the outbox
//! check covers the rows still there. The topics and `processed_events`
//! forget too, so the checks that pair ids with events cover the ids
//! created inside the [`Window`] both still hold; the checks of the state
//! alone cover every row.

mod published;
mod window;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use common::{config::KafkaConfig, saga, topics};

use published::{Fact, Published};
pub use window::Window;

pub struct Sources {
    pub orders: PgPool,
    pub payments: PgPool,
    pub inventory: PgPool,
    pub kafka: KafkaConfig,
}

/// One figure per service.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct PerService {
    pub order: i64,
    pub payment: i64,
    pub inventory: i64,
}

impl PerService {
    fn slot(&mut self, service: &str) -> &mut i64 {
        match service {
            "order" => &mut self.order,
            "payment" => &mut self.payment,
            _ => &mut self.inventory,
        }
    }
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
    /// Rows in each service's outbox (published rows are pruned after the
    /// retention), and how many of them were never published.
    pub outbox_rows: PerService,
    pub unpublished_outbox_rows: PerService,
    /// Outbox rows marked published whose event is on none of the topics.
    pub published_outbox_rows_not_on_topics: i64,
    /// Events a service's state implies that are not on its topic.
    pub missing_events: i64,
    /// Payment or stock statuses order recorded that disagree with what
    /// payment or inventory finally did (one per order and side).
    pub status_disagreements: i64,
    /// Where the window of paired checks starts (Unix milliseconds), and
    /// how many orders were created before it: their events may be gone
    /// from the topics, so they are checked by their state alone.
    pub window_start_ms: u64,
    pub orders_before_window: i64,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub figures: Figures,
    pub violations: Vec<String>,
}

impl Report {
    #[must_use]
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// How many examples a violation that concerns many rows names.
const EXAMPLES: usize = 5;

/// A count as the figures hold it. A collection in memory cannot have more
/// than `i64::MAX` elements, so the fallback is never taken.
fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Reports a violation that concerns several rows as one line: how many,
/// what, and the first few (sorted, so the report is stable).
fn push_grouped(v: &mut Vec<String>, what: &str, mut items: Vec<String>) {
    if items.is_empty() {
        return;
    }
    items.sort();
    let shown = items
        .iter()
        .take(EXAMPLES)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let more = match items.len().checked_sub(EXAMPLES) {
        Some(rest) if rest > 0 => format!(" and {rest} more"),
        _ => String::new(),
    };
    v.push(format!("{} {what}: {shown}{more}", items.len()));
}

// --- rows ------------------------------------------------------------------

/// A status column: TEXT with a CHECK on these names, decoded by sqlx and
/// shown (in the report) by its stored name.
macro_rules! status {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
        #[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
        enum $name {
            $($variant),*
        }

        impl $name {
            fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

status!(
    /// `orders.status`.
    OrderStatus { Pending => "PENDING", Confirmed => "CONFIRMED", Cancelled => "CANCELLED" }
);
status!(
    /// `payments.status`, and what order recorded of it.
    PaymentStatus { Approved => "APPROVED", Declined => "DECLINED", Refunded => "REFUNDED" }
);
status!(
    /// `reservations.status`, and what order recorded of it.
    ReservationStatus { Reserved => "RESERVED", Rejected => "REJECTED", Released => "RELEASED" }
);

#[derive(sqlx::FromRow)]
struct OrderRow {
    order_id: Uuid,
    status: OrderStatus,
    total_units: i64,
    /// What order recorded from payment and inventory (NULL until told).
    payment_status: Option<PaymentStatus>,
    inventory_status: Option<ReservationStatus>,
}

#[derive(sqlx::FromRow)]
struct PaymentRow {
    order_id: Uuid,
    status: PaymentStatus,
    amount_units: i64,
    reason: String,
}

impl PaymentRow {
    /// The row payment writes when an order's cancellation overtakes its
    /// creation. It publishes nothing, so order never hears of it.
    fn is_early_cancellation(&self) -> bool {
        self.status == PaymentStatus::Declined && self.reason == saga::CANCELLED_BEFORE_PAYMENT
    }
}

#[derive(sqlx::FromRow)]
struct ReservationRow {
    order_id: Uuid,
    status: ReservationStatus,
    reason: String,
}

impl ReservationRow {
    /// Inventory's counterpart of [`PaymentRow::is_early_cancellation`].
    fn is_early_cancellation(&self) -> bool {
        self.status == ReservationStatus::Rejected
            && self.reason == saga::CANCELLED_BEFORE_RESERVATION
    }
}

#[derive(sqlx::FromRow)]
struct ConfirmedQuantity {
    product_id: String,
    quantity: i64,
}

#[derive(sqlx::FromRow)]
struct StockRow {
    product_id: String,
    available: i64,
    reserved: i64,
    /// Sum of the product's stock adjustments.
    stocked: i64,
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    event_type: String,
    event_id: Uuid,
    published: bool,
}

#[derive(sqlx::FromRow)]
struct CounterRow {
    topic: String,
    name: String,
    value: i64,
}

/// What one service's database holds about delivery.
struct Delivery {
    service: &'static str,
    outbox: Vec<OutboxRow>,
    processed: HashSet<Uuid>,
    counters: Vec<CounterRow>,
}

impl Delivery {
    async fn load(service: &'static str, pool: &PgPool) -> sqlx::Result<Self> {
        Ok(Self {
            service,
            outbox: sqlx::query_as(
                "SELECT event_type, event_id, published_at IS NOT NULL AS published FROM outbox",
            )
            .fetch_all(pool)
            .await?,
            processed: sqlx::query_scalar("SELECT event_id FROM processed_events")
                .fetch_all(pool)
                .await?
                .into_iter()
                .collect(),
            counters: sqlx::query_as("SELECT topic, name, value FROM consumer_counters")
                .fetch_all(pool)
                .await?,
        })
    }
}

/// The dead-letter topics: how many letters each holds, and which event
/// ids each consumer group dead-lettered.
#[derive(Default)]
struct DeadLetters {
    count_by_topic: HashMap<String, usize>,
    ids_by_group: HashMap<String, HashSet<Uuid>>,
}

impl DeadLetters {
    fn read(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        let mut dead = Self::default();
        for name in topics::ALL {
            let letters = crate::dlq::list(cfg, name)?;
            dead.count_by_topic.insert(cfg.topic(name), letters.len());
            for d in letters {
                if let (Some(group), Some(id)) = (
                    d.consumer_group,
                    d.event_id.and_then(|id| Uuid::parse_str(&id).ok()),
                ) {
                    dead.ids_by_group.entry(group).or_default().insert(id);
                }
            }
        }
        Ok(dead)
    }

    fn total(&self) -> usize {
        self.count_by_topic.values().sum()
    }

    /// Event ids dead-lettered by `service`'s consumer group.
    fn of(&self, service: &str) -> HashSet<Uuid> {
        self.ids_by_group
            .iter()
            .filter(|(group, _)| group.ends_with(service))
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect()
    }
}

/// Everything the checker reads from the databases.
struct State {
    orders: Vec<OrderRow>,
    payments: Vec<PaymentRow>,
    credit_in_use: i64,
    reservations: Vec<ReservationRow>,
    confirmed_quantities: Vec<ConfirmedQuantity>,
    stock: Vec<StockRow>,
    delivery: Vec<Delivery>,
    /// Orders named by `order_items` rows but absent from `orders`.
    orphan_order_items: Vec<Uuid>,
    /// Orders named by `reservation_items` rows but absent from `reservations`.
    orphan_reservation_items: Vec<Uuid>,
}

impl State {
    async fn load(src: &Sources) -> sqlx::Result<Self> {
        Ok(Self {
            orders: sqlx::query_as(
                "SELECT order_id, status, total_units, payment_status, inventory_status
                 FROM orders",
            )
            .fetch_all(&src.orders)
            .await?,
            payments: sqlx::query_as("SELECT order_id, status, amount_units, reason FROM payments")
                .fetch_all(&src.payments)
                .await?,
            credit_in_use: sqlx::query_scalar(
                "SELECT COALESCE(SUM(used_units), 0)::bigint FROM accounts",
            )
            .fetch_one(&src.payments)
            .await?,
            reservations: sqlx::query_as("SELECT order_id, status, reason FROM reservations")
                .fetch_all(&src.inventory)
                .await?,
            confirmed_quantities: sqlx::query_as(
                "SELECT i.product_id, SUM(i.quantity)::bigint AS quantity FROM order_items i
                 JOIN orders o USING (order_id) WHERE o.status = 'CONFIRMED'
                 GROUP BY i.product_id",
            )
            .fetch_all(&src.orders)
            .await?,
            stock: sqlx::query_as(
                "SELECT s.product_id, s.available, s.reserved,
                        COALESCE((SELECT SUM(delta) FROM stock_adjustments a
                                  WHERE a.product_id = s.product_id), 0)::bigint AS stocked
                 FROM stock s",
            )
            .fetch_all(&src.inventory)
            .await?,
            delivery: vec![
                Delivery::load("payment", &src.payments).await?,
                Delivery::load("inventory", &src.inventory).await?,
                Delivery::load("order", &src.orders).await?,
            ],
            orphan_order_items: sqlx::query_scalar(
                "SELECT DISTINCT i.order_id FROM order_items i
                 WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = i.order_id)",
            )
            .fetch_all(&src.orders)
            .await?,
            orphan_reservation_items: sqlx::query_scalar(
                "SELECT DISTINCT i.order_id FROM reservation_items i
                 WHERE NOT EXISTS (SELECT 1 FROM reservations r WHERE r.order_id = i.order_id)",
            )
            .fetch_all(&src.inventory)
            .await?,
        })
    }
}

/// Distinct event ids now on the three topics (for example to show that
/// outbox rows seen pending earlier were published since).
pub async fn published_event_ids(kafka: &KafkaConfig) -> anyhow::Result<HashSet<Uuid>> {
    let kafka = kafka.clone();
    let published = tokio::task::spawn_blocking(move || Published::read(&kafka)).await??;
    Ok(published.event_ids)
}

pub async fn check(src: &Sources) -> anyhow::Result<Report> {
    // The databases first, then the topics: on a quiet pipeline events only
    // get added, so whatever the state implies is on the topics by then.
    let window = Window::find(&src.kafka, [&src.orders, &src.payments, &src.inventory]).await?;
    let state = State::load(src).await?;
    let kafka = src.kafka.clone();
    let (published, dead) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        Ok((Published::read(&kafka)?, DeadLetters::read(&kafka)?))
    })
    .await??;

    let mut r = Report::default();
    r.figures.window_start_ms = window.start_ms;
    orders_and_money(&state, &mut r);
    sides_agree(&state, &mut r);
    stock(&state, &mut r);
    items_have_parents(&state, &mut r);
    outboxes_published(&state, &published, window, &mut r);
    state_implies_events(&state, &published, window, &mut r);
    no_event_twice(&published, &mut r);
    events_applied(&state, &published, &dead, window, &mut r);
    Ok(r)
}

/// Every order is decided; approved payments add up to the confirmed
/// totals and to the credit in use.
fn orders_and_money(s: &State, r: &mut Report) {
    let (f, v) = (&mut r.figures, &mut r.violations);
    f.orders = count(s.orders.len());
    for o in &s.orders {
        match o.status {
            OrderStatus::Confirmed => {
                f.confirmed += 1;
                f.confirmed_total_units += o.total_units;
            }
            OrderStatus::Cancelled => f.cancelled += 1,
            OrderStatus::Pending => {
                f.pending += 1;
                v.push(format!("order {} is still {}", o.order_id, o.status));
            }
        }
    }
    for p in &s.payments {
        match p.status {
            PaymentStatus::Approved => f.charged_units += p.amount_units,
            PaymentStatus::Refunded => f.refunded_payments += 1,
            PaymentStatus::Declined => {}
        }
    }
    f.released_reservations = count(
        s.reservations
            .iter()
            .filter(|r| r.status == ReservationStatus::Released)
            .count(),
    );
    if s.credit_in_use != f.charged_units {
        v.push(format!(
            "credit in use {} != approved, unrefunded payments {}",
            s.credit_in_use, f.charged_units
        ));
    }
    if f.charged_units != f.confirmed_total_units {
        v.push(format!(
            "charged {} != total of confirmed orders {}",
            f.charged_units, f.confirmed_total_units
        ));
    }
}

/// Per decided order: payment and inventory decided it, their outcome fits
/// the order's status, and what order recorded of each side is what that
/// side finally did.
fn sides_agree(s: &State, r: &mut Report) {
    let (f, v) = (&mut r.figures, &mut r.violations);
    let orders: HashSet<Uuid> = s.orders.iter().map(|o| o.order_id).collect();
    let payments: HashMap<Uuid, &PaymentRow> = s.payments.iter().map(|p| (p.order_id, p)).collect();
    let reservations: HashMap<Uuid, &ReservationRow> =
        s.reservations.iter().map(|r| (r.order_id, r)).collect();
    for p in &s.payments {
        if !orders.contains(&p.order_id) {
            v.push(format!("payment for unknown order {}", p.order_id));
        }
    }
    for r in &s.reservations {
        if !orders.contains(&r.order_id) {
            v.push(format!("reservation for unknown order {}", r.order_id));
        }
    }

    let mut undecided: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
    let mut disagree: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for o in &s.orders {
        let id = o.order_id;
        let payment = payments.get(&id).copied();
        let reservation = reservations.get(&id).copied();
        match o.status {
            OrderStatus::Confirmed => {
                let paid = payment.map(|p| (p.status.as_str(), p.amount_units));
                if paid != Some((PaymentStatus::Approved.as_str(), o.total_units)) {
                    v.push(format!("confirmed order {id} has payment {paid:?}"));
                }
                let reserved = reservation.map(|r| r.status.as_str());
                if reserved != Some(ReservationStatus::Reserved.as_str()) {
                    v.push(format!("confirmed order {id} has reservation {reserved:?}"));
                }
            }
            OrderStatus::Cancelled => {
                if payment.is_some_and(|p| p.status == PaymentStatus::Approved) {
                    v.push(format!("cancelled order {id} is still charged"));
                }
                if reservation.is_some_and(|r| r.status == ReservationStatus::Reserved) {
                    v.push(format!("cancelled order {id} still holds stock"));
                }
            }
            OrderStatus::Pending => continue, // undecided: reported above, the rest may follow
        }

        // Order records the first result of each side and then the
        // compensation (REFUNDED, RELEASED) its cancellation caused, so once
        // quiet it holds the other side's final status. The exception is a
        // cancellation that overtook the creation: that side published no
        // result, so order recorded none (and that is reported below).
        let sides = [
            (
                "payment",
                "payments",
                o.payment_status.map(PaymentStatus::as_str),
                payment.map(|p| (p.status.as_str(), p.is_early_cancellation())),
            ),
            (
                "inventory",
                "reservations",
                o.inventory_status.map(ReservationStatus::as_str),
                reservation.map(|r| (r.status.as_str(), r.is_early_cancellation())),
            ),
        ];
        for (side, table, recorded, actual) in sides {
            let Some((status, early)) = actual else {
                undecided
                    .entry((side, table))
                    .or_default()
                    .push(id.to_string());
                continue;
            };
            let expected = (!early).then_some(status);
            if recorded != expected {
                disagree.entry(side).or_default().push(format!(
                    "{id} recorded {} but {side} is {status}",
                    recorded.unwrap_or("nothing")
                ));
            }
        }
    }
    for ((side, table), ids) in undecided {
        push_grouped(
            v,
            &format!("decided orders {side} never decided (no row in `{table}`)"),
            ids,
        );
    }
    for (side, items) in disagree {
        f.status_disagreements += count(items.len());
        push_grouped(
            v,
            &format!("orders whose recorded {side} status is not what {side} finally did"),
            items,
        );
    }

    // A cancellation applied before its order's creation leaves a marker
    // row; both events share a key, so a marker means order was broken.
    let early = s.payments.iter().filter(|p| p.is_early_cancellation());
    let early_stock = s.reservations.iter().filter(|r| r.is_early_cancellation());
    let (early, early_stock) = (early.count(), early_stock.count());
    if early + early_stock > 0 {
        v.push(format!(
            "{early} payments and {early_stock} reservations saw OrderCancelled before OrderCreated"
        ));
    }
}

/// Stock is conserved: the ledger equals available + sold, and what is
/// still reserved is exactly what confirmed orders hold.
fn stock(s: &State, r: &mut Report) {
    let v = &mut r.violations;
    let sold: HashMap<&str, i64> = s
        .confirmed_quantities
        .iter()
        .map(|c| (c.product_id.as_str(), c.quantity))
        .collect();
    for row in &s.stock {
        let product = &row.product_id;
        let sold = sold.get(product.as_str()).copied().unwrap_or(0);
        if row.stocked != row.available + sold {
            v.push(format!(
                "{product}: stocked {} != available {} + confirmed {sold}",
                row.stocked, row.available
            ));
        }
        if row.reserved != sold {
            v.push(format!(
                "{product}: reserved {} != confirmed {sold}",
                row.reserved
            ));
        }
    }
}

/// Every item row has its parent row (no foreign key enforces it).
fn items_have_parents(s: &State, r: &mut Report) {
    for (what, ids) in [
        (
            "orders with order_items but no order row",
            &s.orphan_order_items,
        ),
        (
            "orders with reservation_items but no reservation",
            &s.orphan_reservation_items,
        ),
    ] {
        push_grouped(
            &mut r.violations,
            what,
            ids.iter().map(ToString::to_string).collect(),
        );
    }
}

/// Every outbox row was published, and every row marked published inside
/// the window is on the topics. (Event ids are unique across topics, so the
/// check does not depend on the topic prefix the rows were written with.)
fn outboxes_published(s: &State, published: &Published, window: Window, r: &mut Report) {
    let (f, v) = (&mut r.figures, &mut r.violations);
    for d in &s.delivery {
        let pending: Vec<String> = d
            .outbox
            .iter()
            .filter(|row| !row.published)
            .map(|row| format!("{} {}", row.event_type, row.event_id))
            .collect();
        let lost: Vec<String> = d
            .outbox
            .iter()
            .filter(|row| {
                row.published
                    && window.holds(&row.event_id)
                    && !published.event_ids.contains(&row.event_id)
            })
            .map(|row| format!("{} {}", row.event_type, row.event_id))
            .collect();
        *f.outbox_rows.slot(d.service) = count(d.outbox.len());
        *f.unpublished_outbox_rows.slot(d.service) = count(pending.len());
        f.published_outbox_rows_not_on_topics += count(lost.len());
        push_grouped(
            v,
            &format!("{} outbox rows never published", d.service),
            pending,
        );
        push_grouped(
            v,
            &format!(
                "{} outbox rows marked published whose event is not on the topics",
                d.service
            ),
            lost,
        );
    }
}

/// Every event a service's state implies about an order of the window is
/// on that service's topic.
fn state_implies_events(s: &State, published: &Published, window: Window, r: &mut Report) {
    r.figures.orders_before_window = count(
        s.orders
            .iter()
            .filter(|o| !window.holds(&o.order_id))
            .count(),
    );
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut need = |whose: &str, order_id: Uuid, fact: Fact| {
        if window.holds(&order_id) && published.count(order_id, fact) == 0 {
            missing
                .entry(format!(
                    "{whose} without {} on topic `{}`",
                    fact.describe(),
                    fact.topic()
                ))
                .or_default()
                .push(order_id.to_string());
        }
    };
    for o in &s.orders {
        need("orders", o.order_id, Fact::OrderCreated);
        match o.status {
            OrderStatus::Confirmed => need("CONFIRMED orders", o.order_id, Fact::OrderConfirmed),
            OrderStatus::Cancelled => need("CANCELLED orders", o.order_id, Fact::OrderCancelled),
            OrderStatus::Pending => {}
        }
    }
    for p in &s.payments {
        match p.status {
            PaymentStatus::Approved => need("APPROVED payments", p.order_id, Fact::PaymentApproved),
            PaymentStatus::Declined if !p.is_early_cancellation() => {
                need("DECLINED payments", p.order_id, Fact::PaymentDeclined);
            }
            PaymentStatus::Refunded => {
                need("REFUNDED payments", p.order_id, Fact::PaymentApproved);
                need("REFUNDED payments", p.order_id, Fact::PaymentRefunded);
            }
            PaymentStatus::Declined => {}
        }
    }
    for res in &s.reservations {
        match res.status {
            ReservationStatus::Reserved => {
                need("RESERVED reservations", res.order_id, Fact::StockReserved);
            }
            ReservationStatus::Rejected if !res.is_early_cancellation() => {
                need("REJECTED reservations", res.order_id, Fact::StockRejected);
            }
            ReservationStatus::Released => {
                need("RELEASED reservations", res.order_id, Fact::StockReserved);
                need("RELEASED reservations", res.order_id, Fact::StockReleased);
            }
            ReservationStatus::Rejected => {}
        }
    }
    for (what, ids) in missing {
        r.figures.missing_events += count(ids.len());
        push_grouped(&mut r.violations, &what, ids);
    }
}

/// No order has the same kind of event under two event ids (each is
/// written once, in the transaction that made the decision), nor two that
/// contradict each other.
fn no_event_twice(published: &Published, r: &mut Report) {
    let mut repeated: BTreeMap<Fact, Vec<String>> = BTreeMap::new();
    for (&(order_id, fact), &n) in &published.facts {
        if n > 1 {
            repeated
                .entry(fact)
                .or_default()
                .push(format!("{order_id} ({n})"));
        }
    }
    for (fact, items) in repeated {
        push_grouped(
            &mut r.violations,
            &format!("orders with more than one {}", fact.describe()),
            items,
        );
    }
    let mut contradicted: BTreeMap<(Fact, Fact), Vec<String>> = BTreeMap::new();
    for (a, b) in [
        (Fact::OrderConfirmed, Fact::OrderCancelled),
        (Fact::PaymentApproved, Fact::PaymentDeclined),
        (Fact::StockReserved, Fact::StockRejected),
    ] {
        for &(order_id, fact) in published.facts.keys() {
            if fact == a && published.count(order_id, b) > 0 {
                contradicted
                    .entry((a, b))
                    .or_default()
                    .push(order_id.to_string());
            }
        }
    }
    for ((a, b), ids) in contradicted {
        push_grouped(
            &mut r.violations,
            &format!("orders with both {} and {}", a.describe(), b.describe()),
            ids,
        );
    }
}

/// Every valid event of the window was applied exactly once by each service
/// that acts on it, unless it was dead-lettered, and every event applied in
/// the window is on the topics; every dead letter was counted by the
/// consumer that wrote it.
fn events_applied(
    s: &State,
    published: &Published,
    dead: &DeadLetters,
    window: Window,
    r: &mut Report,
) {
    let (f, v) = (&mut r.figures, &mut r.violations);
    f.event_records = published.records;
    f.duplicate_records = published.duplicates;
    f.dead_letters = dead.total();
    let mut counted: HashMap<&str, i64> = HashMap::new();
    for d in &s.delivery {
        let expected = published.acted.get(d.service).cloned().unwrap_or_default();
        let dead_here = dead.of(d.service);
        let missing = expected
            .iter()
            .filter(|id| window.holds(id) && !d.processed.contains(id) && !dead_here.contains(id))
            .count();
        if missing > 0 {
            v.push(format!("{}: {missing} events never applied", d.service));
        }
        let unexpected = d
            .processed
            .iter()
            .filter(|id| window.holds(id) && !expected.contains(id))
            .count();
        if unexpected > 0 {
            v.push(format!(
                "{}: {unexpected} applied events are not on the topics",
                d.service
            ));
        }
        for c in &d.counters {
            match c.name.as_str() {
                "duplicates_suppressed" => f.duplicates_suppressed += c.value,
                "dead_lettered" => *counted.entry(c.topic.as_str()).or_default() += c.value,
                _ => {}
            }
        }
    }
    let mut by_topic: Vec<_> = dead.count_by_topic.iter().collect();
    by_topic.sort();
    for (topic, &on_dlq) in by_topic {
        let by_consumers = counted.get(topic.as_str()).copied().unwrap_or(0);
        if by_consumers != count(on_dlq) {
            v.push(format!(
                "{topic}: {on_dlq} dead letters on the DLQ but consumers counted {by_consumers}"
            ));
        }
    }
}
