//! The orders database: catalog, orders and their items. Every write that
//! causes an event enqueues it in the outbox in the same transaction.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use chrono::{DateTime, Utc};
use common::{
    catalog,
    outbox::{self, OutboxEvent},
    time::to_timestamp,
};
use shop_proto::{
    common::Money,
    events,
    order::{Order, OrderItem, OrderStatus},
};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    domain::{Price, PricedLine, Status},
    error::OrderError,
    idempotency::Stored,
};

/// Inserts the fixture's products that are missing; never overwrites.
pub async fn seed_catalog(pool: &PgPool) -> sqlx::Result<()> {
    let products = catalog::products();
    let ids: Vec<&str> = products.iter().map(|p| p.product_id.as_str()).collect();
    let names: Vec<&str> = products.iter().map(|p| p.name.as_str()).collect();
    let currencies: Vec<&str> = products.iter().map(|p| p.currency.as_str()).collect();
    let prices: Vec<i64> = products.iter().map(|p| p.price_units).collect();
    sqlx::query(
        "INSERT INTO products (product_id, name, currency, price_units)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[])
         ON CONFLICT (product_id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&names)
    .bind(&currencies)
    .bind(&prices)
    .execute(pool)
    .await?;
    Ok(())
}

/// The whole catalog (it is small and read on every order).
pub async fn load_catalog(pool: &PgPool) -> sqlx::Result<BTreeMap<String, Price>> {
    let rows: Vec<ProductRow> =
        sqlx::query_as("SELECT product_id, currency, price_units FROM products")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|p| {
            let price = Price {
                currency: p.currency,
                units: p.price_units,
            };
            (p.product_id, price)
        })
        .collect())
}

/// A `products` row, without the display name.
#[derive(sqlx::FromRow)]
struct ProductRow {
    product_id: String,
    currency: String,
    price_units: i64,
}

/// An order to write, already validated and priced, with its
/// `OrderCreated` event and the trace context of the request that placed it
/// (captured in the request's span: the writer that stores it serves many).
pub struct Pending {
    pub order_id: Uuid,
    pub customer_id: String,
    pub lines: Vec<PricedLine>,
    pub currency: String,
    pub total: i64,
    /// The idempotency key and the request's hash, if the caller sent a key.
    pub idempotency: Option<(String, Vec<u8>)>,
    /// Caused by the request's span: the row continues its trace.
    pub event: OutboxEvent,
}

impl Pending {
    /// A new order with a fresh id and its `OrderCreated` for `orders_topic`.
    #[must_use]
    pub fn new(
        customer_id: String,
        lines: Vec<PricedLine>,
        currency: String,
        total: i64,
        idempotency: Option<(String, Vec<u8>)>,
        orders_topic: String,
        cause: &tracing::Span,
    ) -> Self {
        let order_id = Uuid::now_v7();
        let money = |units| Money {
            currency: currency.clone(),
            units,
        };
        let event_id = Uuid::now_v7();
        let created = events::OrderCreated {
            event_id: event_id.to_string(),
            occurred_at: Some(common::time::now()),
            order_id: order_id.to_string(),
            customer_id: customer_id.clone(),
            items: lines
                .iter()
                .map(|l| events::OrderLine {
                    product_id: l.product_id.clone(),
                    quantity: l.quantity,
                    unit_price: Some(money(l.unit_price)),
                })
                .collect(),
            total: Some(money(total)),
        };
        let event =
            OutboxEvent::new(orders_topic, &customer_id, event_id, &created).caused_by(cause);
        Self {
            order_id,
            customer_id,
            lines,
            currency,
            total,
            idempotency,
            event,
        }
    }

    /// The key and request hash, borrowed.
    #[must_use]
    pub fn key(&self) -> Option<(&str, &[u8])> {
        self.idempotency
            .as_ref()
            .map(|(k, h)| (k.as_str(), h.as_slice()))
    }

    /// The API view of this order as written at `created_at`: built from
    /// what was written rather than read back (no round trip).
    #[must_use]
    pub fn to_order(&self, created_at: DateTime<Utc>) -> Order {
        to_proto(
            OrderRow {
                order_id: self.order_id,
                customer_id: self.customer_id.clone(),
                status: Status::Pending,
                reason: String::new(),
                currency: self.currency.clone(),
                total: self.total,
                created_at,
                updated_at: created_at,
            },
            self.lines
                .iter()
                .map(|l| ItemRow {
                    product_id: l.product_id.clone(),
                    quantity: l.quantity,
                    unit_price_units: l.unit_price,
                })
                .collect(),
        )
    }
}

/// The stored orders of these idempotency keys: one lookup for a group.
pub async fn stored_keys(
    conn: &mut PgConnection,
    keys: &[&str],
) -> sqlx::Result<HashMap<String, Stored>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, Uuid, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT idempotency_key, order_id, request_hash FROM orders
         WHERE idempotency_key = ANY($1)",
    )
    .bind(keys)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(key, order_id, request_hash)| {
            let stored = Stored {
                order_id,
                request_hash,
            };
            (key, stored)
        })
        .collect())
}

/// Writes new PENDING orders, their items and their `OrderCreated` events in
/// one statement (so one round trip and one implicit transaction, whatever
/// the number of orders), each event with its own request's trace context.
/// Returns the orders written, with their creation time: an order whose key
/// another transaction inserted first, or whose id is already there (an
/// earlier attempt of this very group that did commit although its
/// connection failed), is skipped (`ON CONFLICT DO NOTHING`) along with its
/// items and event, for the caller to resolve.
///
/// One statement rather than `BEGIN`, three inserts and `COMMIT`: on a
/// loaded machine every round trip waits for both processes to be
/// scheduled, and intake latency is mostly those waits. The items' foreign
/// key is checked at the end of the statement, when the orders are there.
pub async fn insert_orders(
    conn: &mut PgConnection,
    orders: &[&Pending],
    deadline: Duration,
) -> sqlx::Result<HashMap<Uuid, DateTime<Utc>>> {
    if orders.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<Uuid> = orders.iter().map(|o| o.order_id).collect();
    let customers: Vec<&str> = orders.iter().map(|o| o.customer_id.as_str()).collect();
    let currencies: Vec<&str> = orders.iter().map(|o| o.currency.as_str()).collect();
    let totals: Vec<i64> = orders.iter().map(|o| o.total).collect();
    let keys: Vec<Option<&str>> = orders.iter().map(|o| o.key().map(|(k, _)| k)).collect();
    let hashes: Vec<Option<&[u8]>> = orders.iter().map(|o| o.key().map(|(_, h)| h)).collect();
    let lines = orders.iter().flat_map(|o| {
        // validate() caps an order at MAX_LINES lines, far below i32::MAX.
        (1..).zip(&o.lines).map(move |(no, l)| (o.order_id, no, l))
    });
    let (mut item_orders, mut line_nos, mut products, mut quantities, mut prices) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (order_id, no, line) in lines {
        item_orders.push(order_id);
        line_nos.push(no);
        products.push(line.product_id.as_str());
        quantities.push(line.quantity);
        prices.push(line.unit_price);
    }
    // Every event has its request's context (Pending::new): no default.
    let no_cause = common::trace_context::Carrier::default();
    let events = outbox::Columns::of(orders.iter().map(|o| &o.event), &no_cause);
    // The outbox's $1..$7 are outbox::Columns; its $8 pairs each event
    // with its order (one OrderCreated per order, in the same order).
    let query = events.bind(sqlx::query(
        "WITH o AS (
             INSERT INTO orders (order_id, customer_id, status, currency, total_units,
                                 idempotency_key, request_hash, deadline_at)
             SELECT id, customer, 'PENDING', currency, total, key, hash,
                    now() + make_interval(secs => $14)
             FROM UNNEST($8::uuid[], $9::text[], $10::text[], $11::bigint[], $12::text[],
                         $13::bytea[]) AS o(id, customer, currency, total, key, hash)
             ON CONFLICT DO NOTHING
             RETURNING order_id, created_at
         ), items AS (
             INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price_units)
             SELECT * FROM UNNEST($15::uuid[], $16::int[], $17::text[], $18::int[], $19::bigint[])
                      AS l(order_id, line_no, product_id, quantity, price)
             WHERE l.order_id IN (SELECT order_id FROM o)
         ), events AS (
             INSERT INTO outbox (topic, key, event_type, event_id, payload, traceparent,
                                 tracestate)
             SELECT topic, key, event_type, event_id, payload, traceparent, tracestate
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::uuid[], $5::bytea[],
                         $6::text[], $7::text[], $8::uuid[])
                  WITH ORDINALITY AS e(topic, key, event_type, event_id, payload,
                                       traceparent, tracestate, order_id, n)
             WHERE e.order_id IN (SELECT order_id FROM o)
             ORDER BY n
         )
         SELECT order_id, created_at FROM o",
    ));
    let written = query
        .bind(&ids)
        .bind(&customers)
        .bind(&currencies)
        .bind(&totals)
        .bind(&keys)
        .bind(&hashes)
        .bind(deadline.as_secs_f64())
        .bind(&item_orders)
        .bind(&line_nos)
        .bind(&products)
        .bind(&quantities)
        .bind(&prices)
        .fetch_all(conn)
        .await?;
    written
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// The creation time of those of these orders that exist.
pub async fn created_at(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> sqlx::Result<HashMap<Uuid, DateTime<Utc>>> {
    let rows: Vec<(Uuid, DateTime<Utc>)> =
        sqlx::query_as("SELECT order_id, created_at FROM orders WHERE order_id = ANY($1)")
            .bind(order_ids)
            .fetch_all(conn)
            .await?;
    Ok(rows.into_iter().collect())
}

/// The order stored under `key` when `hash` is the same request, an
/// `IdempotencyConflict` when it is not, `None` when there is none.
pub async fn by_idempotency_key(
    conn: &mut PgConnection,
    key: &str,
    hash: &[u8],
) -> Result<Option<Order>, OrderError> {
    let found: Option<KeyedRow> =
        sqlx::query_as("SELECT order_id, request_hash FROM orders WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
    match found {
        None => Ok(None),
        Some(row) if row.request_hash.as_deref() != Some(hash) => {
            Err(OrderError::IdempotencyConflict(key.to_owned()))
        }
        Some(row) => Ok(load(conn, row.order_id).await?),
    }
}

/// The order an idempotency key names, and the hash of its request.
#[derive(sqlx::FromRow)]
struct KeyedRow {
    order_id: Uuid,
    request_hash: Option<Vec<u8>>,
}

/// An `orders` row.
#[derive(sqlx::FromRow)]
struct OrderRow {
    order_id: Uuid,
    customer_id: String,
    status: Status,
    reason: String,
    currency: String,
    #[sqlx(rename = "total_units")]
    total: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// Tells the order's watchers (on every order replica, see [`crate::watch`])
/// that these orders changed. Call it in the transaction that changes them:
/// PostgreSQL delivers the notification when, and only if, it commits.
/// Notifying an order twice in one transaction delivers it once.
pub async fn notify_changed(conn: &mut PgConnection, order_ids: &[Uuid]) -> sqlx::Result<()> {
    if order_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_notify($1, id::text) FROM UNNEST($2::uuid[]) AS id")
        .bind(crate::watch::CHANNEL)
        .bind(order_ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Reads an order with its items.
pub async fn load(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Option<Order>> {
    let row: Option<OrderRow> = sqlx::query_as(
        "SELECT order_id, customer_id, status, reason, currency, total_units, created_at, updated_at
         FROM orders WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let items: Vec<ItemRow> = sqlx::query_as(
        "SELECT product_id, quantity, unit_price_units FROM order_items
         WHERE order_id = $1 ORDER BY line_no",
    )
    .bind(order_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(to_proto(row, items)))
}

/// An `order_items` row, without the order id and line number.
#[derive(sqlx::FromRow)]
struct ItemRow {
    product_id: String,
    quantity: i32,
    unit_price_units: i64,
}

/// The API view of an order row and its items.
fn to_proto(row: OrderRow, items: Vec<ItemRow>) -> Order {
    let money = |units| Money {
        currency: row.currency.clone(),
        units,
    };
    let status = match row.status {
        Status::Pending => OrderStatus::Pending,
        Status::Confirmed => OrderStatus::Confirmed,
        Status::Cancelled => OrderStatus::Cancelled,
    };
    Order {
        order_id: row.order_id.to_string(),
        customer_id: row.customer_id,
        items: items
            .into_iter()
            .map(|item| OrderItem {
                product_id: item.product_id,
                quantity: item.quantity,
                unit_price: Some(money(item.unit_price_units)),
                line_total: Some(money(item.unit_price_units * i64::from(item.quantity))),
            })
            .collect(),
        total: Some(money(row.total)),
        status: status as i32,
        reason: row.reason,
        created_at: Some(to_timestamp(row.created_at)),
        updated_at: Some(to_timestamp(row.updated_at)),
    }
}
