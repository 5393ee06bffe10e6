//! A plan cached while a table was nearly empty must not scan the table
//! whole once it has grown: the services' connections (`common::db::pool`)
//! price sequential scans out. Checked on payment's batch statement
//! (`store::open_run`) against a real PostgreSQL, with a plain connection
//! as the control that shows the trap is real.

use std::time::Duration;

use common::config::DbConfig;
use e2e::{create_database, unique_id};
use payment::{domain::AccountDefaults, store};
use sqlx::{Connection, PgConnection, PgPool, migrate::Migrator};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

static PAYMENT_MIGRATIONS: Migrator = sqlx::migrate!("../payment/migrations");

/// Adds `n` accounts (`account-<n>` up from the count there).
async fn add_accounts(pool: &PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO accounts (customer_id, currency, credit_limit_units)
         SELECT 'account-' || (g + (SELECT count(*) FROM accounts)), 'USD', 1000
         FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

/// Runs `open_run` on `conn` often enough that PostgreSQL caches its generic
/// plan while `accounts` holds 50 analyzed rows, then grows the table to
/// 60,050 rows (not analyzed, as autovacuum would leave it for up to a
/// minute) and returns the plan that the cached statement now runs.
async fn plan_after_growth(pool: &PgPool, conn: &mut PgConnection) -> String {
    let defaults = AccountDefaults {
        currency: "USD".into(),
        credit_limit: 1_000,
    };
    add_accounts(pool, 50).await;
    sqlx::query("ANALYZE accounts, payments")
        .execute(pool)
        .await
        .unwrap();
    for i in 0..8 {
        let customer = format!("warm-{i}");
        let mut tx = conn.begin().await.unwrap();
        store::open_run(&mut tx, &[customer.as_str()], &[Uuid::now_v7()], &defaults)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
    }
    add_accounts(pool, 60_000).await;
    let name: String = sqlx::query_scalar(
        "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%INSERT INTO accounts%'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN EXECUTE {name}('{{account-60001,account-60002}}', 'USD', 1000, '{{{}}}')",
        Uuid::now_v7()
    )))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    lines.join("\n")
}

async fn payments_database() -> (String, PgPool) {
    let url = create_database(format!("t_{}_plans", unique_id())).await;
    let pool = PgPool::connect(&url).await.unwrap();
    common::db::migrate(&pool, &PAYMENT_MIGRATIONS, &CancellationToken::new())
        .await
        .unwrap();
    (url, pool)
}

#[tokio::test]
async fn cached_plans_keep_using_the_index_after_a_table_grows() {
    // The control: a plain connection keeps scanning accounts whole.
    let (url, pool) = payments_database().await;
    let mut control = PgConnection::connect(&url).await.unwrap();
    let scanned = plan_after_growth(&pool, &mut control).await;
    assert!(scanned.contains("Seq Scan on accounts"), "{scanned}");

    // A service's connection takes the primary key.
    let (url, pool) = payments_database().await;
    let service = common::db::pool(&DbConfig {
        url: url.into(),
        max_connections: 1,
    })
    .unwrap();
    let mut conn = tokio::time::timeout(Duration::from_secs(10), service.acquire())
        .await
        .unwrap()
        .unwrap();
    let keyed = plan_after_growth(&pool, &mut conn).await;
    assert!(!keyed.contains("Seq Scan"), "{keyed}");
    assert!(keyed.contains("accounts_pkey"), "{keyed}");
}
