//! Retention of `processed_events` by partition (`common::partitions`) on a
//! real PostgreSQL: the upkeep prepares ranges ahead, drops expired
//! partitions, prunes the default partition, and the migration that
//! introduced the partitions keeps every existing row.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    config::PipelineConfig,
    partitions::{self, Retention},
};
use e2e::{create_database, eventually, unique_id};
use sqlx::{PgPool, migrate::Migrator};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

static COMMON_MIGRATIONS: Migrator = sqlx::migrate!("../common/migrations");

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A fresh database with the shared tables only (outbox, processed events).
async fn database(name: &str) -> PgPool {
    let url = create_database(format!("t_{}_{name}", unique_id())).await;
    PgPool::connect(&url).await.unwrap()
}

async fn migrate(pool: &PgPool) {
    common::db::migrate(pool, &Migrator::DEFAULT, &CancellationToken::new())
        .await
        .unwrap();
}

async fn insert_processed(pool: &PgPool, event_id: Uuid) {
    sqlx::query(
        "INSERT INTO processed_events (event_id, event_type, topic, partition, kafka_offset)
         VALUES ($1, 'e', 't', 0, 0)",
    )
    .bind(event_id)
    .execute(pool)
    .await
    .unwrap();
}

/// The partition a row of `table` with this event id lives in.
async fn partition_of(pool: &PgPool, table: &str, event_id: Uuid) -> Option<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT tableoid::regclass::text FROM {table} WHERE event_id = $1"
    )))
    .bind(event_id)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// The `[from, to)` ranges (Unix ms) of `table`'s partitions, from their names.
async fn ranges(pool: &PgPool, table: &str) -> Vec<(u64, u64)> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = $1::text::regclass",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    names
        .iter()
        .filter_map(|n| {
            let (from, to) = n.strip_prefix(table)?.strip_prefix('_')?.split_once('_')?;
            Some((from.parse().ok()?, to.parse().ok()?))
        })
        .collect()
}

/// Processed events kept `secs`.
fn retention(secs: u64) -> Retention {
    Retention::new(&PipelineConfig {
        processed_retention: Duration::from_secs(secs),
        ..PipelineConfig::default()
    })
}

#[tokio::test]
async fn upkeep_prepares_ranges_ahead_and_drops_expired_ones() {
    let pool = database("retention").await;
    migrate(&pool).await;
    // Partitions of a second.
    let kept = retention(2);
    let mut conn = pool.acquire().await.unwrap();
    let done = kept.upkeep(&mut conn).await.unwrap();
    assert!(done.created >= 2, "{done:?}");
    // Ranges cover from now to at least one more partition ahead.
    let now = now_ms();
    let r = ranges(&pool, "processed_events").await;
    for t in [now, now + 1_000] {
        assert!(
            r.iter().any(|&(f, to)| f <= t && t < to),
            "{t} not in {r:?}"
        );
    }

    // Rows written now land in a prepared range, not the default partition.
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    insert_processed(&pool, first).await;
    let home = partition_of(&pool, "processed_events", first)
        .await
        .unwrap();
    assert!(home.starts_with("processed_events_1"), "{home}");
    let home_to: u64 = home.rsplit('_').next().unwrap().parse().unwrap();

    // Not before it expired: an upkeep within the retention keeps it.
    kept.upkeep(&mut conn).await.unwrap();
    if now_ms() < home_to + 2_000 {
        assert!(
            partition_of(&pool, "processed_events", first)
                .await
                .is_some()
        );
    }
    eventually("the partition to expire and go", || async {
        kept.upkeep(&mut *pool.acquire().await.ok()?).await.ok()?;
        partition_of(&pool, "processed_events", first)
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(now_ms() >= home_to + 2_000, "dropped only once expired");
    // Everything from the oldest range left on is kept, and that is after
    // the dropped range (what the invariant checker pairs with the topics).
    let kept_since = partitions::kept_since(&mut conn).await.unwrap();
    assert!(kept_since >= home_to, "{kept_since} < {home_to}");
    assert!(kept_since <= now_ms());
    // An id of a dropped range is still recorded (in the default
    // partition), and new ones find a range.
    insert_processed(&pool, second).await;
    assert!(
        partition_of(&pool, "processed_events", second)
            .await
            .is_some()
    );
    let later = Uuid::now_v7();
    insert_processed(&pool, later).await;
    assert!(
        partition_of(&pool, "processed_events", later)
            .await
            .unwrap()
            .starts_with("processed_events_1")
    );
}

#[tokio::test]
async fn rows_outside_every_range_go_to_the_default_partition_and_are_pruned() {
    let pool = database("retention").await;
    migrate(&pool).await;
    // The default 7 days.
    let kept = Retention::new(&PipelineConfig::default());
    let mut conn = pool.acquire().await.unwrap();
    kept.upkeep(&mut conn).await.unwrap();
    // Ids of no range prepared (30 days ahead), processed 8 and 6 days ago.
    let ahead = common::partitions::first_id_at(now_ms() + 30 * 86_400_000).as_u128();
    let [expired, recent] = [1, 2].map(|n| Uuid::from_u128(ahead + n));
    insert_processed(&pool, expired).await;
    insert_processed(&pool, recent).await;
    sqlx::query(
        "UPDATE processed_events SET processed_at = now() - CASE WHEN event_id = $1
             THEN interval '8 days' ELSE interval '6 days' END",
    )
    .bind(expired)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        partition_of(&pool, "processed_events", expired)
            .await
            .as_deref(),
        Some("processed_events_default")
    );

    let done = kept.upkeep(&mut conn).await.unwrap();
    assert_eq!(done.pruned, 1);
    assert_eq!(partition_of(&pool, "processed_events", expired).await, None);
    assert_eq!(
        partition_of(&pool, "processed_events", recent)
            .await
            .as_deref(),
        Some("processed_events_default")
    );
}

#[tokio::test]
async fn partitioning_an_existing_database_keeps_its_rows() {
    let pool = database("retention").await;
    let before = Migrator {
        migrations: COMMON_MIGRATIONS
            .iter()
            .filter(|m| m.version <= 5)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ..Migrator::DEFAULT
    };
    before.run(&pool).await.unwrap();
    let applied = Uuid::now_v7();
    // An id from a clock a day ahead: above the bound the migration takes.
    let ahead = common::partitions::first_id_at(now_ms() + 86_400_000);
    insert_processed(&pool, applied).await;
    insert_processed(&pool, ahead).await;

    migrate(&pool).await;
    let old = partition_of(&pool, "processed_events", applied)
        .await
        .unwrap();
    assert!(old.starts_with("processed_events_0_"), "{old}");
    assert_eq!(
        partition_of(&pool, "processed_events", ahead)
            .await
            .as_deref(),
        Some("processed_events_default")
    );
    // A redelivered event still meets its row, wherever it is.
    for id in [applied, ahead] {
        let again = sqlx::query(
            "INSERT INTO processed_events (event_id, event_type, topic, partition, kafka_offset)
             VALUES ($1, 'e', 't', 0, 0) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
        assert_eq!(again.rows_affected(), 0);
    }
}
