//! The payments database: credit accounts and one payment row per order.
//! The consumer calls these on its transaction; the gRPC API reads, and
//! sets credit limits in a transaction of its own.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use common::{
    outbox::{self, OutboxEvent},
    time::to_timestamp,
};
use shop_proto::{
    common::Money,
    payment::{Account, Payment, PaymentStatus},
};
use sqlx::{PgConnection, PgPool, Row};
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    domain::{self, AccountDefaults, Credit, Status},
    error::PaymentError,
};

/// Creates the customer's account with the defaults unless it exists.
pub async fn ensure_account(
    conn: &mut PgConnection,
    customer_id: &str,
    defaults: &AccountDefaults,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO accounts (customer_id, currency, credit_limit_units)
         VALUES ($1, $2, $3) ON CONFLICT (customer_id) DO NOTHING",
    )
    .bind(customer_id)
    .bind(&defaults.currency)
    .bind(defaults.credit_limit)
    .execute(conn)
    .await?;
    Ok(())
}

/// An account with its customer, as [`open_run`] returns it.
#[derive(Debug, sqlx::FromRow)]
struct AccountRow {
    customer_id: String,
    #[sqlx(flatten)]
    credit: Credit,
    /// The run's orders that have a payment row already (the same list on
    /// every row; NULL when there are none).
    paid: Option<Vec<Uuid>>,
}

/// What a run of new orders starts from ([`open_run`]).
#[derive(Debug, Default)]
pub struct RunStart {
    /// The run's accounts, locked until the transaction ends.
    pub accounts: Vec<(String, Credit)>,
    /// The run's orders that have a payment row already: a decision, or the
    /// marker of a cancellation that came first.
    pub paid: HashSet<Uuid>,
}

/// Opens a run of new orders in one statement (one round trip): creates
/// the accounts of `customer_ids` that do not exist with the defaults,
/// locks them all until the transaction ends (the existing ones in
/// customer order, so concurrent lockers of several accounts never
/// deadlock on each other), and finds which of `order_ids` have a payment
/// row already.
///
/// One statement sees one snapshot: an account another transaction creates
/// while this one runs is neither created nor returned (the caller fails
/// the batch, which the consume loop then replays one record at a time),
/// and a payment another transaction commits meanwhile is not in `paid`
/// ([`write_run`]'s count catches it).
pub async fn open_run(
    conn: &mut PgConnection,
    customer_ids: &[&str],
    order_ids: &[Uuid],
    defaults: &AccountDefaults,
) -> sqlx::Result<RunStart> {
    let rows: Vec<AccountRow> = sqlx::query_as(
        r#"WITH created AS (
               INSERT INTO accounts (customer_id, currency, credit_limit_units)
               SELECT customer_id, $2, $3 FROM UNNEST($1::text[]) AS c(customer_id)
               ON CONFLICT (customer_id) DO NOTHING
               RETURNING customer_id, currency, credit_limit_units, used_units
           ), existing AS (
               SELECT customer_id, currency, credit_limit_units, used_units FROM accounts
               WHERE customer_id = ANY($1)
               ORDER BY customer_id FOR UPDATE
           ), paid AS (
               SELECT array_agg(order_id) AS paid FROM payments WHERE order_id = ANY($4)
           )
           SELECT a.customer_id, a.currency, a.credit_limit_units AS "limit",
                  a.used_units AS used, paid.paid
           FROM (SELECT * FROM created UNION ALL SELECT * FROM existing) a CROSS JOIN paid"#,
    )
    .bind(customer_ids)
    .bind(&defaults.currency)
    .bind(defaults.credit_limit)
    .bind(order_ids)
    .fetch_all(conn)
    .await?;
    let mut start = RunStart::default();
    for row in rows {
        if let Some(paid) = row.paid.filter(|_| start.paid.is_empty()) {
            start.paid.extend(paid);
        }
        start.accounts.push((row.customer_id, row.credit));
    }
    Ok(start)
}

/// The account, locked until the transaction ends.
pub async fn lock_account(
    conn: &mut PgConnection,
    customer_id: &str,
) -> sqlx::Result<Option<Credit>> {
    account(conn, customer_id, true).await
}

async fn account(
    conn: &mut PgConnection,
    customer_id: &str,
    lock: bool,
) -> sqlx::Result<Option<Credit>> {
    let sql = if lock {
        r#"SELECT currency, credit_limit_units AS "limit", used_units AS used FROM accounts
           WHERE customer_id = $1 FOR UPDATE"#
    } else {
        r#"SELECT currency, credit_limit_units AS "limit", used_units AS used FROM accounts
           WHERE customer_id = $1"#
    };
    sqlx::query_as(sql)
        .bind(customer_id)
        .fetch_optional(conn)
        .await
}

/// Sets the credit in use (the caller holds the account's lock).
pub async fn set_used(conn: &mut PgConnection, customer_id: &str, used: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE accounts SET used_units = $2, updated_at = now() WHERE customer_id = $1")
        .bind(customer_id)
        .bind(used)
        .execute(conn)
        .await?;
    Ok(())
}

/// A customer's account; one that does not exist yet is shown as it would
/// be created (default limit, nothing used) without creating it.
pub async fn get_account(
    pool: &PgPool,
    customer_id: &str,
    defaults: &AccountDefaults,
) -> Result<Account, PaymentError> {
    let mut conn = pool.acquire().await?;
    let credit = account(&mut conn, customer_id, false)
        .await?
        .unwrap_or_else(|| Credit::new(defaults));
    Ok(account_view(customer_id, &credit))
}

/// Sets a customer's credit limit, creating the account (in the default
/// currency) if needed. The limit must be in the account's currency.
pub async fn set_credit_limit(
    pool: &PgPool,
    customer_id: &str,
    limit: Option<&Money>,
    defaults: &AccountDefaults,
) -> Result<Account, PaymentError> {
    let mut tx = pool.begin().await?;
    ensure_account(&mut tx, customer_id, defaults).await?;
    // Just ensured, and accounts are never deleted.
    let mut credit = lock_account(&mut tx, customer_id)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    credit.limit = domain::validate_limit(limit, &credit.currency)?;
    sqlx::query(
        "UPDATE accounts SET credit_limit_units = $2, updated_at = now() WHERE customer_id = $1",
    )
    .bind(customer_id)
    .bind(credit.limit)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(account_view(customer_id, &credit))
}

/// An account as the API shows it: limit, used, and `limit - used`.
#[must_use]
pub fn account_view(customer_id: &str, credit: &Credit) -> Account {
    let money = |units| {
        Some(Money {
            currency: credit.currency.clone(),
            units,
        })
    };
    Account {
        customer_id: customer_id.to_owned(),
        credit_limit: money(credit.limit),
        used: money(credit.used),
        available: money(credit.available()),
    }
}

/// A payment row as the consumer needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PaymentRow {
    pub customer_id: String,
    pub currency: String,
    #[sqlx(rename = "amount_units")]
    pub amount: i64,
    pub status: Status,
}

/// The order's payment, locked until the transaction ends.
pub async fn lock_payment(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> sqlx::Result<Option<PaymentRow>> {
    sqlx::query_as(
        "SELECT customer_id, currency, amount_units, status FROM payments
         WHERE order_id = $1 FOR UPDATE",
    )
    .bind(order_id)
    .fetch_optional(conn)
    .await
}

/// A payment decision to record.
pub struct NewPayment<'a> {
    pub order_id: Uuid,
    pub customer_id: &'a str,
    pub currency: &'a str,
    pub amount: i64,
    pub status: Status,
    pub reason: &'a str,
}

/// Records the order's payment unless it already has one; returns whether
/// this call wrote it. A concurrent writer of the same order makes this
/// wait for its transaction, then return `false` if it committed.
pub async fn insert_payment(conn: &mut PgConnection, p: &NewPayment<'_>) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "INSERT INTO payments (order_id, customer_id, currency, amount_units, status, reason)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(p.order_id)
    .bind(p.customer_id)
    .bind(p.currency)
    .bind(p.amount)
    .bind(p.status)
    .bind(p.reason)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Writes a run's results in one statement (one round trip): the orders'
/// payments, skipping orders that have one already, the credit in use of
/// the accounts that changed (the caller holds their locks), and the
/// events. Returns how many payments it wrote: fewer than given means
/// another transaction recorded one of these orders meanwhile (it waited
/// for that transaction, as [`insert_payment`] does), and the caller must
/// roll back, since the other writes rest on decisions made without it.
pub async fn write_run(
    conn: &mut PgConnection,
    new: &[NewPayment<'_>],
    used: &[(&str, i64)],
    events: &[OutboxEvent],
) -> sqlx::Result<u64> {
    let ids: Vec<Uuid> = new.iter().map(|p| p.order_id).collect();
    let customers: Vec<&str> = new.iter().map(|p| p.customer_id).collect();
    let currencies: Vec<&str> = new.iter().map(|p| p.currency).collect();
    let amounts: Vec<i64> = new.iter().map(|p| p.amount).collect();
    let statuses: Vec<&str> = new.iter().map(|p| p.status.as_str()).collect();
    let reasons: Vec<&str> = new.iter().map(|p| p.reason).collect();
    let (accounts, used): (Vec<&str>, Vec<i64>) = used.iter().copied().unzip();
    let write = outbox::EventWrite::of(events);
    // $1..$7 are the outbox's columns (outbox::Columns).
    let query = write.query(concat!(
        "WITH paid AS (
             INSERT INTO payments (order_id, customer_id, currency, amount_units, status, reason)
             SELECT * FROM UNNEST($8::uuid[], $9::text[], $10::text[], $11::bigint[],
                                  $12::text[], $13::text[])
             ON CONFLICT (order_id) DO NOTHING
             RETURNING 1
         ), credit AS (
             UPDATE accounts a SET used_units = u.used, updated_at = now()
             FROM UNNEST($14::text[], $15::bigint[]) AS u(customer_id, used)
             WHERE a.customer_id = u.customer_id
         ), events AS (",
        common::outbox_insert_unnest!(),
        ")
         SELECT count(*) FROM paid",
    ));
    let written: i64 = query
        .bind(&ids)
        .bind(&customers)
        .bind(&currencies)
        .bind(&amounts)
        .bind(&statuses)
        .bind(&reasons)
        .bind(&accounts)
        .bind(&used)
        .fetch_one(conn)
        .instrument(write.span())
        .await?
        .try_get(0)?;
    Ok(u64::try_from(written).unwrap_or(0))
}

/// Marks a payment refunded (the caller holds the row's lock).
pub async fn mark_refunded(
    conn: &mut PgConnection,
    order_id: Uuid,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE payments SET status = 'REFUNDED', reason = $2, updated_at = now()
         WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// A payment of a run of cancellations, with its account's credit in use
/// when it is approved ([`open_refunds`]).
#[derive(Debug, sqlx::FromRow)]
struct RefundRow {
    order_id: Uuid,
    #[sqlx(flatten)]
    payment: PaymentRow,
    account_currency: Option<String>,
    used_units: Option<i64>,
}

/// What a run of cancellations starts from ([`open_refunds`]).
#[derive(Debug, Default)]
pub struct RefundStart {
    /// The run's orders that have a payment row, locked.
    pub payments: HashMap<Uuid, PaymentRow>,
    /// Currency and credit in use of the accounts that paid for the
    /// approved ones, locked.
    pub accounts: HashMap<String, (String, i64)>,
}

/// Opens a run of cancellations in one statement (one round trip): locks
/// the payments of `order_ids` in order id order, then the accounts that
/// paid for the approved ones in customer order, until the transaction
/// ends. The same locks in the same order as [`lock_payment`] then
/// [`lock_account`] take one order at a time.
pub async fn open_refunds(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> sqlx::Result<RefundStart> {
    let rows: Vec<RefundRow> = sqlx::query_as(
        "WITH p AS (
             SELECT order_id, customer_id, currency, amount_units, status FROM payments
             WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE
         ), a AS (
             SELECT customer_id, currency, used_units FROM accounts
             WHERE customer_id IN (SELECT customer_id FROM p WHERE status = 'APPROVED')
             ORDER BY customer_id FOR UPDATE
         )
         SELECT p.order_id, p.customer_id, p.currency, p.amount_units, p.status,
                a.currency AS account_currency, a.used_units
         FROM p LEFT JOIN a USING (customer_id)",
    )
    .bind(order_ids)
    .fetch_all(conn)
    .await?;
    let mut start = RefundStart::default();
    for row in rows {
        if let (Some(currency), Some(used)) = (row.account_currency, row.used_units) {
            start
                .accounts
                .insert(row.payment.customer_id.clone(), (currency, used));
        }
        start.payments.insert(row.order_id, row.payment);
    }
    Ok(start)
}

/// Writes a run's refunds in one statement (one round trip): the payments
/// refunded with their reasons, the credit in use of the accounts that
/// changed (the caller holds the locks of both, [`open_refunds`]), and the
/// events.
pub async fn write_refunds(
    conn: &mut PgConnection,
    refunds: &[(Uuid, &str)],
    used: &[(&str, i64)],
    events: &[OutboxEvent],
) -> sqlx::Result<()> {
    let (ids, reasons): (Vec<Uuid>, Vec<&str>) = refunds.iter().copied().unzip();
    let (accounts, used): (Vec<&str>, Vec<i64>) = used.iter().copied().unzip();
    let write = outbox::EventWrite::of(events);
    // $1..$7 are the outbox's columns (outbox::Columns).
    let query = write.query(concat!(
        "WITH refunded AS (
             UPDATE payments p SET status = 'REFUNDED', reason = r.reason, updated_at = now()
             FROM UNNEST($8::uuid[], $9::text[]) AS r(order_id, reason)
             WHERE p.order_id = r.order_id
         ), credit AS (
             UPDATE accounts a SET used_units = u.used, updated_at = now()
             FROM UNNEST($10::text[], $11::bigint[]) AS u(customer_id, used)
             WHERE a.customer_id = u.customer_id
         ), events AS (",
        common::outbox_insert_unnest!(),
        ")
         SELECT 1",
    ));
    query
        .bind(&ids)
        .bind(&reasons)
        .bind(&accounts)
        .bind(&used)
        .execute(conn)
        .instrument(write.span())
        .await?;
    Ok(())
}

/// A payment row as the API shows it.
#[derive(sqlx::FromRow)]
struct PaymentRecord {
    order_id: Uuid,
    customer_id: String,
    currency: String,
    amount_units: i64,
    status: Status,
    reason: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// Reads an order's payment as the API shows it.
pub async fn load_payment(pool: &PgPool, order_id: Uuid) -> sqlx::Result<Option<Payment>> {
    let row: Option<PaymentRecord> = sqlx::query_as(
        "SELECT order_id, customer_id, currency, amount_units, status, reason, created_at, updated_at
         FROM payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|p| {
        let status = match p.status {
            Status::Approved => PaymentStatus::Approved,
            Status::Declined => PaymentStatus::Declined,
            Status::Refunded => PaymentStatus::Refunded,
        };
        Payment {
            order_id: p.order_id.to_string(),
            customer_id: p.customer_id,
            amount: Some(Money {
                currency: p.currency,
                units: p.amount_units,
            }),
            status: status as i32,
            reason: p.reason,
            created_at: Some(to_timestamp(p.created_at)),
            updated_at: Some(to_timestamp(p.updated_at)),
        }
    }))
}
