//! The inventory database: stock levels, reservations and their items.
//!
//! Functions that take a `PgConnection` run on the caller's transaction
//! (the consume loop's); the reservation handler in [`crate::consumer`]
//! decides what to call and enqueues events in the same transaction.

use std::collections::{BTreeMap, HashMap, HashSet};

use common::{
    catalog,
    outbox::{self, OutboxEvent},
};
use shop_proto::inventory::Stock;
use sqlx::{PgConnection, PgPool, Row};
use tracing::Instrument;
use uuid::Uuid;

use crate::domain::{Line, Status};

/// Inserts a stock row for each fixture product that has none, with its
/// initial stock available; never overwrites a level already there. Each
/// row seeded is recorded in the stock ledger.
pub async fn seed_stock(pool: &PgPool) -> sqlx::Result<()> {
    let products = catalog::products();
    let ids: Vec<&str> = products.iter().map(|p| p.product_id.as_str()).collect();
    let levels: Vec<i64> = products.iter().map(|p| p.initial_stock).collect();
    sqlx::query(
        "WITH seeded AS (
             INSERT INTO stock (product_id, available)
             SELECT * FROM UNNEST($1::text[], $2::bigint[])
             ON CONFLICT (product_id) DO NOTHING
             RETURNING product_id, available
         )
         INSERT INTO stock_adjustments (product_id, delta, reason)
         SELECT product_id, available, 'seeded from the catalog' FROM seeded",
    )
    .bind(&ids)
    .bind(&levels)
    .execute(pool)
    .await?;
    Ok(())
}

/// One product's stock, if the product is known.
pub async fn get_stock(pool: &PgPool, product_id: &str) -> sqlx::Result<Option<Stock>> {
    let row: Option<StockRow> =
        sqlx::query_as("SELECT product_id, available, reserved FROM stock WHERE product_id = $1")
            .bind(product_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(Stock::from))
}

/// Sets the units available (creating the row for a new product); what is
/// reserved stays as it is. The change is recorded in the stock ledger.
pub async fn set_stock(pool: &PgPool, product_id: &str, available: i64) -> sqlx::Result<Stock> {
    let mut tx = pool.begin().await?;
    let before: Option<i64> =
        sqlx::query_scalar("SELECT available FROM stock WHERE product_id = $1 FOR UPDATE")
            .bind(product_id)
            .fetch_optional(&mut *tx)
            .await?;
    let row: StockRow = sqlx::query_as(
        "INSERT INTO stock (product_id, available) VALUES ($1, $2)
         ON CONFLICT (product_id) DO UPDATE SET available = EXCLUDED.available, updated_at = now()
         RETURNING product_id, available, reserved",
    )
    .bind(product_id)
    .bind(available)
    .fetch_one(&mut *tx)
    .await?;
    let delta = available - before.unwrap_or(0);
    if delta != 0 {
        sqlx::query(
            "INSERT INTO stock_adjustments (product_id, delta, reason) VALUES ($1, $2, 'SetStock')",
        )
        .bind(product_id)
        .bind(delta)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(row.into())
}

/// A `stock` row, without its timestamp.
#[derive(sqlx::FromRow)]
struct StockRow {
    product_id: String,
    available: i64,
    reserved: i64,
}

impl From<StockRow> for Stock {
    fn from(row: StockRow) -> Self {
        Stock {
            product_id: row.product_id,
            available: row.available,
            reserved: row.reserved,
        }
    }
}

/// True when the order already has a reservation (whatever its status).
pub async fn reservation_exists(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<bool> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM reservations WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(conn)
        .await?;
    Ok(found.is_some())
}

/// Locks the stock rows of `product_ids` until the transaction ends, always
/// in product order (so concurrent orders never deadlock on each other),
/// and returns the units available of those that exist.
pub async fn lock_stock(
    conn: &mut PgConnection,
    product_ids: &[&str],
) -> sqlx::Result<BTreeMap<String, i64>> {
    let rows: Vec<Available> = sqlx::query_as(
        "SELECT product_id, available FROM stock WHERE product_id = ANY($1)
         ORDER BY product_id FOR UPDATE",
    )
    .bind(product_ids)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.product_id, row.available))
        .collect())
}

/// The units of one product available to reserve.
#[derive(sqlx::FromRow)]
struct Available {
    product_id: String,
    available: i64,
}

/// Moves `lines` from available to reserved (`sign` 1) or back (`sign`
/// -1) in one statement; the rows must be locked already and each product
/// must appear once. Returns how many rows changed. (A run's net units move
/// in [`write_run`]'s statement.)
async fn move_stock(conn: &mut PgConnection, lines: &[Line], sign: i64) -> sqlx::Result<u64> {
    let ids: Vec<&str> = lines.iter().map(|l| l.product_id.as_str()).collect();
    let quantities: Vec<i64> = lines.iter().map(|l| sign * i64::from(l.quantity)).collect();
    let done = sqlx::query(
        "UPDATE stock s
         SET available = s.available - r.quantity, reserved = s.reserved + r.quantity,
             updated_at = now()
         FROM UNNEST($1::text[], $2::bigint[]) AS r(product_id, quantity)
         WHERE s.product_id = r.product_id",
    )
    .bind(&ids)
    .bind(&quantities)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// available -= q, reserved += q for each line.
pub async fn take_stock(conn: &mut PgConnection, lines: &[Line]) -> sqlx::Result<u64> {
    move_stock(conn, lines, 1).await
}

/// available += q, reserved -= q for each line.
pub async fn give_back_stock(conn: &mut PgConnection, lines: &[Line]) -> sqlx::Result<u64> {
    move_stock(conn, lines, -1).await
}

/// A reservation to insert.
pub struct NewReservation<'a> {
    pub order_id: Uuid,
    pub customer_id: &'a str,
    pub status: Status,
    pub reason: &'a str,
    pub lines: &'a [Line],
}

/// Inserts a reservation and its items. Returns false, writing nothing, when
/// the order has one already (a concurrent delivery of the same order got
/// there first; its transaction has committed by the time this returns).
pub async fn insert_reservation(
    conn: &mut PgConnection,
    new: NewReservation<'_>,
) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO reservations (order_id, customer_id, status, reason)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(new.order_id)
    .bind(new.customer_id)
    .bind(new.status)
    .bind(new.reason)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(false);
    }
    if !new.lines.is_empty() {
        let ids: Vec<&str> = new.lines.iter().map(|l| l.product_id.as_str()).collect();
        let quantities: Vec<i64> = new.lines.iter().map(|l| i64::from(l.quantity)).collect();
        sqlx::query(
            "INSERT INTO reservation_items (order_id, product_id, quantity)
             SELECT $1, * FROM UNNEST($2::text[], $3::bigint[])",
        )
        .bind(new.order_id)
        .bind(&ids)
        .bind(&quantities)
        .execute(conn)
        .await?;
    }
    Ok(true)
}

/// What a run of new orders starts from ([`open_run`]).
#[derive(Debug, Default)]
pub struct RunStart {
    /// The units available of the run's products that exist, their rows
    /// locked until the transaction ends.
    pub available: BTreeMap<String, i64>,
    /// The run's orders that have a reservation already (whatever its
    /// status).
    pub reserved: HashSet<Uuid>,
}

/// A row of [`open_run`]'s statement: a locked product (none when no
/// product of the run exists) and the run's reserved orders (the same list
/// on every row, NULL when there are none).
#[derive(sqlx::FromRow)]
struct RunStartRow {
    product_id: Option<String>,
    available: Option<i64>,
    reserved: Option<Vec<Uuid>>,
}

/// Opens a run of new orders in one statement (one round trip): locks the
/// stock rows of `product_ids` until the transaction ends, in product order
/// as [`lock_stock`] does, and finds which of `order_ids` have a
/// reservation already. A reservation another transaction commits while
/// this statement runs is not in `reserved` (one statement, one snapshot):
/// [`write_run`]'s count catches it.
pub async fn open_run(
    conn: &mut PgConnection,
    product_ids: &[&str],
    order_ids: &[Uuid],
) -> sqlx::Result<RunStart> {
    let rows: Vec<RunStartRow> = sqlx::query_as(
        "WITH locked AS (
             SELECT product_id, available FROM stock WHERE product_id = ANY($1)
             ORDER BY product_id FOR UPDATE
         ), reserved AS (
             SELECT array_agg(order_id) AS reserved FROM reservations WHERE order_id = ANY($2)
         )
         SELECT locked.product_id, locked.available, reserved.reserved
         FROM reserved LEFT JOIN locked ON true",
    )
    .bind(product_ids)
    .bind(order_ids)
    .fetch_all(conn)
    .await?;
    let mut start = RunStart::default();
    for row in rows {
        if let Some(reserved) = row.reserved.filter(|_| start.reserved.is_empty()) {
            start.reserved.extend(reserved);
        }
        if let (Some(product_id), Some(available)) = (row.product_id, row.available) {
            start.available.insert(product_id, available);
        }
    }
    Ok(start)
}

/// What [`write_run`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunWritten {
    /// Reservations inserted.
    pub reservations: u64,
    /// Stock rows whose units moved.
    pub stock_rows: u64,
}

/// Writes a run's results in one statement (one round trip): the
/// reservations, skipping orders that have one already, the items of those
/// inserted, the net units each product gave (`taken`: one entry per
/// product, rows locked by the caller), and the events. Fewer reservations
/// written than given means another transaction recorded one of these
/// orders meanwhile (the insert waited for it); the caller must then roll
/// back, since the decisions after that order rest on stock it did not
/// take.
pub async fn write_run(
    conn: &mut PgConnection,
    new: &[NewReservation<'_>],
    taken: &[(&str, i64)],
    events: &[OutboxEvent],
) -> sqlx::Result<RunWritten> {
    let ids: Vec<Uuid> = new.iter().map(|r| r.order_id).collect();
    let customers: Vec<&str> = new.iter().map(|r| r.customer_id).collect();
    let statuses: Vec<&str> = new.iter().map(|r| r.status.as_str()).collect();
    let reasons: Vec<&str> = new.iter().map(|r| r.reason).collect();
    let lines = || {
        new.iter()
            .flat_map(|r| r.lines.iter().map(move |l| (r.order_id, l)))
    };
    let item_orders: Vec<Uuid> = lines().map(|(order_id, _)| order_id).collect();
    let item_products: Vec<&str> = lines().map(|(_, l)| l.product_id.as_str()).collect();
    let item_quantities: Vec<i64> = lines().map(|(_, l)| i64::from(l.quantity)).collect();
    let (products, units): (Vec<&str>, Vec<i64>) = taken.iter().copied().unzip();
    let write = outbox::EventWrite::of(events);
    // $1..$7 are the outbox's columns (outbox::Columns).
    let query = write.query(concat!(
        "WITH reserved AS (
             INSERT INTO reservations (order_id, customer_id, status, reason)
             SELECT * FROM UNNEST($8::uuid[], $9::text[], $10::text[], $11::text[])
             ON CONFLICT (order_id) DO NOTHING
             RETURNING order_id
         ), items AS (
             INSERT INTO reservation_items (order_id, product_id, quantity)
             SELECT * FROM UNNEST($12::uuid[], $13::text[], $14::bigint[])
                      AS i(order_id, product_id, quantity)
             WHERE i.order_id IN (SELECT order_id FROM reserved)
         ), moved AS (
             UPDATE stock s
             SET available = s.available - t.quantity, reserved = s.reserved + t.quantity,
                 updated_at = now()
             FROM UNNEST($15::text[], $16::bigint[]) AS t(product_id, quantity)
             WHERE s.product_id = t.product_id
             RETURNING 1
         ), events AS (",
        common::outbox_insert_unnest!(),
        ")
         SELECT (SELECT count(*) FROM reserved), (SELECT count(*) FROM moved)",
    ));
    let row = query
        .bind(&ids)
        .bind(&customers)
        .bind(&statuses)
        .bind(&reasons)
        .bind(&item_orders)
        .bind(&item_products)
        .bind(&item_quantities)
        .bind(&products)
        .bind(&units)
        .fetch_one(conn)
        .instrument(write.span())
        .await?;
    let count = |i: usize| -> sqlx::Result<u64> {
        let n: i64 = row.try_get(i)?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    Ok(RunWritten {
        reservations: count(0)?,
        stock_rows: count(1)?,
    })
}

/// A reservation as the consumer needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReservationRow {
    pub customer_id: String,
    pub status: Status,
}

/// Locks an order's reservation until the transaction ends.
pub async fn lock_reservation(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> sqlx::Result<Option<ReservationRow>> {
    sqlx::query_as("SELECT customer_id, status FROM reservations WHERE order_id = $1 FOR UPDATE")
        .bind(order_id)
        .fetch_optional(conn)
        .await
}

/// The items of a reservation, in product order.
pub async fn reservation_items(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Vec<Line>> {
    // Stored as BIGINT; written from i32 quantities, so the cast holds.
    sqlx::query_as(
        "SELECT product_id, quantity::int4 AS quantity FROM reservation_items
         WHERE order_id = $1 ORDER BY product_id",
    )
    .bind(order_id)
    .fetch_all(conn)
    .await
}

/// A reservation of a run of cancellations and one of its items (none
/// when it holds no stock), as [`open_releases`] reads them.
#[derive(sqlx::FromRow)]
struct ReleaseRow {
    order_id: Uuid,
    #[sqlx(flatten)]
    reservation: ReservationRow,
    product_id: Option<String>,
    quantity: Option<i32>,
}

/// A reservation of a run of cancellations with its items in product
/// order (those of a RESERVED one: the stock to give back).
#[derive(Debug)]
pub struct Held {
    pub reservation: ReservationRow,
    pub lines: Vec<Line>,
}

/// Opens a run of cancellations in one statement (one round trip): locks
/// the reservations of `order_ids` in order id order until the
/// transaction ends, as [`lock_reservation`] does one at a time, and reads
/// the items of the RESERVED ones. The caller then locks their stock rows
/// ([`lock_stock`]): reservations before stock, like one order at a time.
pub async fn open_releases(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> sqlx::Result<HashMap<Uuid, Held>> {
    // Stored as BIGINT; written from i32 quantities, so the cast holds.
    let rows: Vec<ReleaseRow> = sqlx::query_as(
        "WITH r AS (
             SELECT order_id, customer_id, status FROM reservations
             WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE
         )
         SELECT r.order_id, r.customer_id, r.status, i.product_id, i.quantity::int4 AS quantity
         FROM r LEFT JOIN reservation_items i
              ON i.order_id = r.order_id AND r.status = 'RESERVED'
         ORDER BY r.order_id, i.product_id",
    )
    .bind(order_ids)
    .fetch_all(conn)
    .await?;
    let mut held: HashMap<Uuid, Held> = HashMap::new();
    for row in rows {
        let entry = held.entry(row.order_id).or_insert_with(|| Held {
            reservation: row.reservation,
            lines: Vec::new(),
        });
        if let (Some(product_id), Some(quantity)) = (row.product_id, row.quantity) {
            entry.lines.push(Line {
                product_id,
                quantity,
            });
        }
    }
    Ok(held)
}

/// Writes a run's releases in one statement (one round trip): the units
/// each product gets back (`given`: one entry per product, rows locked by
/// the caller), the reservations RELEASED with their reasons, and the
/// events. Returns how many stock rows changed.
pub async fn write_releases(
    conn: &mut PgConnection,
    released: &[(Uuid, &str)],
    given: &[(&str, i64)],
    events: &[OutboxEvent],
) -> sqlx::Result<u64> {
    let (ids, reasons): (Vec<Uuid>, Vec<&str>) = released.iter().copied().unzip();
    let (products, units): (Vec<&str>, Vec<i64>) = given.iter().copied().unzip();
    let write = outbox::EventWrite::of(events);
    // $1..$7 are the outbox's columns (outbox::Columns).
    let query = write.query(concat!(
        "WITH released AS (
             UPDATE reservations r SET status = 'RELEASED', reason = x.reason, updated_at = now()
             FROM UNNEST($8::uuid[], $9::text[]) AS x(order_id, reason)
             WHERE r.order_id = x.order_id
         ), moved AS (
             UPDATE stock s
             SET available = s.available + g.quantity, reserved = s.reserved - g.quantity,
                 updated_at = now()
             FROM UNNEST($10::text[], $11::bigint[]) AS g(product_id, quantity)
             WHERE s.product_id = g.product_id
             RETURNING 1
         ), events AS (",
        common::outbox_insert_unnest!(),
        ")
         SELECT count(*) FROM moved",
    ));
    let moved: i64 = query
        .bind(&ids)
        .bind(&reasons)
        .bind(&products)
        .bind(&units)
        .fetch_one(conn)
        .instrument(write.span())
        .await?
        .try_get(0)?;
    Ok(u64::try_from(moved).unwrap_or(0))
}

/// Marks a reservation RELEASED with the order's cancel reason.
pub async fn mark_released(
    conn: &mut PgConnection,
    order_id: Uuid,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE reservations SET status = 'RELEASED', reason = $2, updated_at = now()
         WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}
