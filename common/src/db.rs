//! PostgreSQL: the pool, and migrations that combine the shared tables
//! (outbox, processed events) with each service's own.

use std::time::Duration;

use sqlx::{
    PgPool,
    migrate::{Migration, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio_util::sync::CancellationToken;

use crate::{config::DbConfig, retry::Backoff};

/// Tables every service needs; versions 1..=999 are reserved for them, so
/// service migrations number from 1000.
static COMMON_MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL: {0}")]
    Url(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("shut down while waiting for the database")]
    Cancelled,
}

/// A lazily connecting pool: the service starts even while the database is
/// down, reports `NOT_SERVING`, and recovers when it returns.
pub fn pool(cfg: &DbConfig) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = cfg.url.expose().parse().map_err(DbError::Url)?;
    // Every statement of a service finds its rows by a key or an index, and
    // its plan is cached per connection. A plan made while a table was
    // nearly empty scans it whole, and keeps doing so as the table grows
    // until autovacuum analyzes it (at most once a minute per database): on
    // a fresh database at 1,000 orders/s, payment's batch statement went
    // from under a millisecond to over a second within 40 s, and the
    // pipeline fell behind for half a minute (BENCHMARKS.md). With
    // sequential scans priced out, plans take the index whatever the
    // statistics say; a statement that has no index to use still scans.
    let options = options.options([("enable_seqscan", "off")]);
    Ok(PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        // No ping before every checkout: a round trip per statement group
        // at intake. A connection that died is found by the statement that
        // uses it, and every caller already treats that as unavailability
        // (retry, or UNAVAILABLE to the client).
        .test_before_acquire(false)
        .connect_lazy_with(options))
}

/// Runs the shared and the service's migrations, retrying with backoff while
/// the database is unreachable (a service may start before its database).
pub async fn migrate(
    pool: &PgPool,
    service: &Migrator,
    shutdown: &CancellationToken,
) -> Result<(), DbError> {
    let migrator = combined(service);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match migrator.run(pool).await {
            Ok(()) => return Ok(()),
            Err(sqlx::migrate::MigrateError::Execute(e)) if is_unavailable(&e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "database unavailable; retrying migrations");
                if shutdown
                    .run_until_cancelled(tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return Err(DbError::Cancelled);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn combined(service: &Migrator) -> Migrator {
    let mut migrations: Vec<Migration> = COMMON_MIGRATIONS.iter().cloned().collect();
    migrations.extend(service.iter().cloned());
    migrations.sort_by_key(|m| m.version);
    Migrator {
        migrations: migrations.into(),
        ..Migrator::DEFAULT
    }
}

/// True for errors that mean "the database cannot be reached right now"
/// rather than "this statement is wrong": connection failures, pool
/// timeouts, and server states such as shutdown or recovery.
#[must_use]
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P: operator intervention (shutdown,
            // crash recovery); 53: insufficient resources (too many clients).
            code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
        }),
        _ => false,
    }
}

/// True for errors worth retrying on the same input: unavailability, plus
/// serialization failures and deadlocks (SQLSTATE class 40).
#[must_use]
pub fn is_transient(e: &sqlx::Error) -> bool {
    is_unavailable(e)
        || matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("40")))
}
