//! Retention by partition (`common::partitions`) on a real PostgreSQL: the
//! upkeep prepares ranges ahead, drops expired partitions (never an outbox
//! partition with a pending row), prunes the default partitions, and the
//! migrations that introduced the partitions keep every existing row.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{config::PipelineConfig, partitions::Retention};
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

async fn insert_outbox(pool: &PgPool, event_id: Uuid, published: bool) {
    sqlx::query(
        "INSERT INTO outbox (topic, key, event_type, event_id, payload, published_at)
         VALUES ('t', 'k', 'e', $1, ''::bytea, CASE WHEN $2 THEN now() END)",
    )
    .bind(event_id)
    .bind(published)
    .execute(pool)
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

/// Both tables kept `secs` (partitions of a second).
fn retention(secs: u64) -> Retention {
    Retention::new(&PipelineConfig {
        outbox_retention: Duration::from_secs(secs),
        processed_retention: Duration::from_secs(secs),
        ..PipelineConfig::default()
    })
}

#[tokio::test]
async fn upkeep_prepares_ranges_ahead_and_drops_expired_ones_unless_pending() {
    let pool = database("retention").await;
    migrate(&pool).await;
    let kept = retention(2);
    let mut conn = pool.acquire().await.unwrap();
    let (outbox, processed) = kept.upkeep(&mut conn).await.unwrap();
    assert!(
        outbox.created >= 2 && processed.created >= 2,
        "{outbox:?} {processed:?}"
    );
    // Ranges cover from now to at least one more span (1 s) ahead.
    let now = now_ms();
    for table in ["outbox", "processed_events"] {
        let r = ranges(&pool, table).await;
        for t in [now, now + 1_000] {
            assert!(
                r.iter().any(|&(f, to)| f <= t && t < to),
                "{table}: {t} not in {r:?}"
            );
        }
    }

    // Rows written now land in a prepared range, not the default partition.
    let (pending, published, applied) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    insert_outbox(&pool, pending, false).await;
    insert_outbox(&pool, published, true).await;
    insert_processed(&pool, applied).await;
    let home = partition_of(&pool, "outbox", pending).await.unwrap();
    assert!(home.starts_with("outbox_1"), "{home}");
    assert_eq!(
        partition_of(&pool, "outbox", published).await.as_ref(),
        Some(&home)
    );
    assert!(
        partition_of(&pool, "processed_events", applied)
            .await
            .unwrap()
            .starts_with("processed_events_1")
    );

    // Once expired, the processed events' partition goes; the outbox's stays
    // while a row in it is pending.
    eventually(
        "the processed events' partition to expire and go",
        || async {
            kept.upkeep(&mut *pool.acquire().await.ok()?).await.ok()?;
            partition_of(&pool, "processed_events", applied)
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    let home_to: u64 = home.rsplit('_').next().unwrap().parse().unwrap();
    assert!(now_ms() >= home_to + 2_000, "expired by now");
    kept.upkeep(&mut conn).await.unwrap();
    assert_eq!(
        partition_of(&pool, "outbox", pending).await,
        Some(home.clone())
    );
    assert_eq!(
        partition_of(&pool, "outbox", published).await,
        Some(home.clone())
    );

    sqlx::query("UPDATE outbox SET published_at = now() WHERE event_id = $1")
        .bind(pending)
        .execute(&pool)
        .await
        .unwrap();
    let (outbox, _) = kept.upkeep(&mut conn).await.unwrap();
    assert!(outbox.dropped >= 1, "{outbox:?}");
    assert_eq!(partition_of(&pool, "outbox", pending).await, None);
    assert_eq!(partition_of(&pool, "outbox", published).await, None);
}

#[tokio::test]
async fn rows_outside_every_range_go_to_the_default_partition_and_are_pruned() {
    let pool = database("retention").await;
    migrate(&pool).await;
    // The outbox kept an hour, processed events the default 7 days.
    let kept = Retention::new(&PipelineConfig {
        outbox_retention: Duration::from_secs(3_600),
        ..PipelineConfig::default()
    });
    let mut conn = pool.acquire().await.unwrap();
    kept.upkeep(&mut conn).await.unwrap();
    // Ids of no range prepared (30 days ahead): in the outbox one published
    // two hours ago and one pending; events processed 8 and 6 days ago.
    let ahead = common::partitions::first_id_at(now_ms() + 30 * 86_400_000).as_u128();
    let [old, pending, expired, recent] = [1, 2, 3, 4].map(|n| Uuid::from_u128(ahead + n));
    insert_outbox(&pool, old, true).await;
    insert_outbox(&pool, pending, false).await;
    insert_processed(&pool, expired).await;
    insert_processed(&pool, recent).await;
    sqlx::query("UPDATE outbox SET published_at = now() - interval '2 hours' WHERE event_id = $1")
        .bind(old)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE processed_events SET processed_at = now() - CASE WHEN event_id = $1
             THEN interval '8 days' ELSE interval '6 days' END",
    )
    .bind(expired)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        partition_of(&pool, "outbox", old).await.as_deref(),
        Some("outbox_default")
    );
    assert_eq!(
        partition_of(&pool, "processed_events", expired)
            .await
            .as_deref(),
        Some("processed_events_default")
    );

    let (outbox, processed) = kept.upkeep(&mut conn).await.unwrap();
    assert_eq!((outbox.pruned, processed.pruned), (1, 1));
    assert_eq!(partition_of(&pool, "outbox", old).await, None);
    assert_eq!(
        partition_of(&pool, "outbox", pending).await.as_deref(),
        Some("outbox_default")
    );
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
    let (published, pending, applied) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    // An id from a clock a day ahead: above the bound the migration takes.
    let ahead = common::partitions::first_id_at(now_ms() + 86_400_000);
    insert_outbox(&pool, published, true).await;
    insert_outbox(&pool, pending, false).await;
    insert_outbox(&pool, ahead, false).await;
    insert_processed(&pool, applied).await;

    migrate(&pool).await;
    let old = partition_of(&pool, "outbox", published).await.unwrap();
    assert!(old.starts_with("outbox_0_"), "{old}");
    assert_eq!(partition_of(&pool, "outbox", pending).await, Some(old));
    assert_eq!(
        partition_of(&pool, "outbox", ahead).await.as_deref(),
        Some("outbox_default")
    );
    assert!(
        partition_of(&pool, "processed_events", applied)
            .await
            .unwrap()
            .starts_with("processed_events_0_")
    );
    // The relay's read still finds what is pending, in id order, and the
    // ids go on from the sequence.
    let pending_ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT event_id FROM outbox WHERE published_at IS NULL ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(pending_ids, vec![pending, ahead]);
    let next = Uuid::now_v7();
    insert_outbox(&pool, next, false).await;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    // A redelivered event still meets its row.
    let again = sqlx::query(
        "INSERT INTO processed_events (event_id, event_type, topic, partition, kafka_offset)
         VALUES ($1, 'e', 't', 0, 0) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(applied)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(again.rows_affected(), 0);
}
