//! The orders database: catalog, orders and their items. Every write that
//! causes an event enqueues it in the outbox in the same transaction.

use std::collections::BTreeMap;

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
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    domain::{Price, PricedLine, Status},
    error::OrderError,
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

/// An order to insert, already validated and priced.
pub struct Insert<'a> {
    pub customer_id: &'a str,
    pub lines: &'a [PricedLine],
    pub currency: &'a str,
    pub total: i64,
    pub idempotency: Option<(&'a str, &'a [u8])>,
    pub deadline: std::time::Duration,
    pub orders_topic: String,
}

/// Stores a new PENDING order and its `OrderCreated` event. With an
/// idempotency key already used for the same request, returns that order
/// instead and writes nothing. Runs on the one connection the caller got
/// (see [`crate::api::OrderApi::create`] on shedding).
pub async fn create_order(conn: &mut PgConnection, new: Insert<'_>) -> Result<Order, OrderError> {
    if let Some((key, hash)) = new.idempotency
        && let Some(existing) = by_idempotency_key(conn, key, hash).await?
    {
        return Ok(existing);
    }
    let order_id = Uuid::now_v7();
    let mut tx = conn.begin().await?;
    let inserted: Option<DateTime<Utc>> = sqlx::query_scalar(
        "INSERT INTO orders (order_id, customer_id, status, currency, total_units,
                             idempotency_key, request_hash, deadline_at)
         VALUES ($1, $2, 'PENDING', $3, $4, $5, $6, now() + make_interval(secs => $7))
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING created_at",
    )
    .bind(order_id)
    .bind(new.customer_id)
    .bind(new.currency)
    .bind(new.total)
    .bind(new.idempotency.map(|(k, _)| k))
    .bind(new.idempotency.map(|(_, h)| h))
    .bind(new.deadline.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(created_at) = inserted else {
        // A concurrent request with the same key won the race.
        drop(tx);
        // Only the key can conflict (order ids are fresh UUIDs).
        let (key, hash) = new.idempotency.ok_or(sqlx::Error::RowNotFound)?;
        return by_idempotency_key(conn, key, hash)
            .await?
            .ok_or_else(|| OrderError::IdempotencyConflict(key.to_owned()));
    };
    // validate() caps an order at MAX_LINES lines, far below i32::MAX.
    let line_count = i32::try_from(new.lines.len()).expect("line count fits in i32");
    let line_nos: Vec<i32> = (1..=line_count).collect();
    let products: Vec<&str> = new.lines.iter().map(|l| l.product_id.as_str()).collect();
    let quantities: Vec<i32> = new.lines.iter().map(|l| l.quantity).collect();
    let prices: Vec<i64> = new.lines.iter().map(|l| l.unit_price).collect();
    sqlx::query(
        "INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price_units)
         SELECT $1, * FROM UNNEST($2::int[], $3::text[], $4::int[], $5::bigint[])",
    )
    .bind(order_id)
    .bind(&line_nos)
    .bind(&products)
    .bind(&quantities)
    .bind(&prices)
    .execute(&mut *tx)
    .await?;
    let money = |units| Money {
        currency: new.currency.to_owned(),
        units,
    };
    let event_id = Uuid::now_v7();
    let event = events::OrderCreated {
        event_id: event_id.to_string(),
        occurred_at: Some(common::time::now()),
        order_id: order_id.to_string(),
        customer_id: new.customer_id.to_owned(),
        items: new
            .lines
            .iter()
            .map(|l| events::OrderLine {
                product_id: l.product_id.clone(),
                quantity: l.quantity,
                unit_price: Some(money(l.unit_price)),
            })
            .collect(),
        total: Some(money(new.total)),
    };
    let outgoing = OutboxEvent::new(new.orders_topic, new.customer_id, event_id, &event);
    outbox::enqueue(&mut tx, &[outgoing]).await?;
    tx.commit().await?;
    common::metrics::order_created();
    // Built from what was written rather than read back: one round trip less.
    Ok(to_proto(
        OrderRow {
            order_id,
            customer_id: new.customer_id.to_owned(),
            status: Status::Pending,
            reason: String::new(),
            currency: new.currency.to_owned(),
            total: new.total,
            created_at,
            updated_at: created_at,
        },
        new.lines
            .iter()
            .map(|l| ItemRow {
                product_id: l.product_id.clone(),
                quantity: l.quantity,
                unit_price_units: l.unit_price,
            })
            .collect(),
    ))
}

async fn by_idempotency_key(
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
