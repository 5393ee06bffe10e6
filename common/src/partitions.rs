//! Retention of `processed_events` by partition (migration 0006). The
//! table is partitioned by ranges of its v7 UUID `event_id`, which begins
//! with its creation time in Unix milliseconds, so a range of ids is a range
//! of times. The relay leader keeps the ranges ([`Retention::upkeep`]): it
//! creates them ahead of time and drops a whole partition once the newest
//! time it can hold is older than `PROCESSED_RETENTION_SECS`. Dropping a
//! table costs nothing per row, where deleting each expired row would cost
//! a statement, WAL with full-page images and vacuum work for three rows per
//! order.
//!
//! Nothing depends on the upkeep for correctness: a row whose id falls in no
//! range (a leader absent for longer than the ranges prepared ahead, an id
//! that is not v7) lands in the default partition, which the upkeep prunes
//! row by row.
//!
//! The outbox stays one table: partitioned the same way, its relay's read
//! and mark cost more than its row-by-row prune saved (BENCHMARKS.md).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use uuid::Uuid;

use crate::config::PipelineConfig;

/// Most rows one upkeep deletes from a default partition.
const DEFAULT_PRUNE_BATCH: i64 = 1_000;

/// How long the upkeep's DDL waits for its locks before it gives up until
/// the next upkeep: while it waits, the writers it conflicts with queue
/// behind it.
const LOCK_TIMEOUT: &str = "200ms";

/// Ranges prepared ahead of the current time, in spans.
const SPANS_AHEAD: u64 = 2;

/// PostgreSQL's `lock_not_available`, what `lock_timeout` raises.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// PostgreSQL's `check_violation`: rows of the default partition belong in
/// a range being attached.
const CHECK_VIOLATION: &str = "23514";

/// The table kept by partition.
const TABLE: &str = "processed_events";

/// Deletes up to `$2` rows of the default partition processed longer than
/// `$1` seconds ago.
const DEFAULT_PRUNE: &str = "DELETE FROM processed_events_default WHERE ctid = ANY(ARRAY(
     SELECT ctid FROM processed_events_default
     WHERE processed_at < now() - make_interval(secs => $1) LIMIT $2))";

/// One partition: ids created in `[from, to)`, in Unix milliseconds. Its
/// name says its range (`processed_events_<from>_<to>`), so listing them
/// needs no parsing of PostgreSQL's bound expressions.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Range {
    from: u64,
    to: u64,
}

impl Range {
    fn parse(name: &str) -> Option<Self> {
        let (from, to) = name
            .strip_prefix(TABLE)?
            .strip_prefix('_')?
            .split_once('_')?;
        Some(Self {
            from: from.parse().ok()?,
            to: to.parse().ok()?,
        })
    }

    fn name(&self) -> String {
        format!("{TABLE}_{}_{}", self.from, self.to)
    }

    fn overlaps(&self, other: &Self) -> bool {
        self.from < other.to && other.from < self.to
    }
}

/// The smallest v7 UUID created at `ms`: the bound of a range.
#[must_use]
pub fn first_id_at(ms: u64) -> Uuid {
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    Uuid::from_bytes(bytes)
}

/// `[from, to)` less the parts the `taken` ranges cover.
fn uncovered(want: Range, taken: &[Range]) -> Vec<Range> {
    let mut pieces = vec![want];
    for t in taken {
        pieces = pieces
            .into_iter()
            .flat_map(|p| {
                if !p.overlaps(t) {
                    return vec![p];
                }
                let mut left = Vec::new();
                if p.from < t.from {
                    left.push(Range {
                        from: p.from,
                        to: t.from,
                    });
                }
                if t.to < p.to {
                    left.push(Range {
                        from: t.to,
                        to: p.to,
                    });
                }
                left
            })
            .collect();
    }
    pieces
}

/// The retention of `processed_events` (`PROCESSED_RETENTION_SECS`),
/// kept by partition.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    retention: Duration,
}

/// What one upkeep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Upkeep {
    pub created: usize,
    pub dropped: usize,
    /// Rows deleted from the default partition.
    pub pruned: u64,
}

impl Upkeep {
    /// Whether it left expired rows in the default partition.
    #[must_use]
    pub fn more(&self) -> bool {
        self.pruned == DEFAULT_PRUNE_BATCH.unsigned_abs()
    }
}

impl Retention {
    #[must_use]
    pub fn new(cfg: &PipelineConfig) -> Self {
        Self {
            retention: cfg.processed_retention,
        }
    }

    /// A quarter of the retention (rows stay between 1 and 1.25 times the
    /// retention), at least a second, at most a day: a handful of
    /// partitions, whatever the retention.
    fn span_ms(&self) -> u64 {
        let quarter = u64::try_from(self.retention.as_millis() / 4).unwrap_or(u64::MAX);
        quarter.clamp(1_000, 86_400_000)
    }

    fn retention_ms(&self) -> u64 {
        u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX)
    }

    /// How often the upkeep is due: twice per partition, at least once a
    /// minute.
    #[must_use]
    pub fn every(&self) -> Duration {
        Duration::from_millis(self.span_ms() / 2).min(Duration::from_secs(60))
    }

    /// Prepares the ranges from now to two partitions ahead, drops the
    /// expired ones and prunes a batch from the default partition.
    pub async fn upkeep(&self, conn: &mut PgConnection) -> sqlx::Result<Upkeep> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut done = Upkeep::default();
        let ranges = ranges(conn).await?;
        let span = self.span_ms();
        let mut from = now_ms / span * span;
        while from < now_ms + SPANS_AHEAD * span {
            let want = Range {
                from,
                to: from + span,
            };
            for piece in uncovered(want, &ranges) {
                if create(conn, &piece).await? {
                    done.created += 1;
                }
            }
            from += span;
        }
        // Oldest first, and no further than the first one left: the ranges
        // kept are always the newest ones (what `kept_since` relies on).
        for r in &ranges {
            if r.to.saturating_add(self.retention_ms()) > now_ms || !drop_range(conn, r).await? {
                break;
            }
            done.dropped += 1;
        }
        done.pruned = sqlx::query(DEFAULT_PRUNE)
            .bind(self.retention.as_secs_f64())
            .bind(DEFAULT_PRUNE_BATCH)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        Ok(done)
    }
}

/// Since when (Unix milliseconds) every row is still in the table: the
/// lower bound of the oldest range, or 0 while no range exists (nothing was
/// dropped; the partition of the rows older than the migration is the range
/// from 0). The upkeep drops ranges oldest first, and prunes from the
/// default partition only rows processed longer than the retention ago,
/// whose ids lie below every range not yet expired: no row created since
/// this time was removed. The invariant checker compares the table with
/// the topics from there on.
pub async fn kept_since(conn: &mut PgConnection) -> sqlx::Result<u64> {
    Ok(ranges(conn).await?.first().map_or(0, |r| r.from))
}

/// The table's partitions with a range in their name, in range order.
async fn ranges(conn: &mut PgConnection) -> sqlx::Result<Vec<Range>> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = $1::text::regclass",
    )
    .bind(TABLE)
    .fetch_all(&mut *conn)
    .await?;
    let mut ranges: Vec<Range> = names.iter().filter_map(|n| Range::parse(n)).collect();
    ranges.sort_by_key(|r| r.from);
    Ok(ranges)
}

/// Creates the partition apart and attaches it, which locks the parent
/// less than `CREATE TABLE … PARTITION OF` would (writers go on). False
/// when a lock was not had in time, or rows that belong in the range are
/// in the default partition already (they stay there).
async fn create(conn: &mut PgConnection, range: &Range) -> sqlx::Result<bool> {
    let name = range.name();
    let ddl = format!(
        "CREATE TABLE {name} (LIKE {TABLE} INCLUDING DEFAULTS);
         ALTER TABLE {TABLE} ATTACH PARTITION {name}
             FOR VALUES FROM ('{}') TO ('{}')",
        first_id_at(range.from),
        first_id_at(range.to),
    );
    run_ddl(conn, &name, "created", ddl).await
}

/// Drops an expired partition; false when its lock was not had in time.
async fn drop_range(conn: &mut PgConnection, range: &Range) -> sqlx::Result<bool> {
    let name = range.name();
    let ddl = format!("DROP TABLE {name}");
    run_ddl(conn, &name, "dropped", ddl).await
}

/// Runs `ddl` on partition `name` in a transaction that waits at most
/// [`LOCK_TIMEOUT`] for its locks. False when it gave up (see
/// [`given_up`]): nothing changed, the next upkeep tries again.
async fn run_ddl(
    conn: &mut PgConnection,
    name: &str,
    done: &'static str,
    ddl: String,
) -> sqlx::Result<bool> {
    let mut tx = conn.begin().await?;
    let outcome = sqlx::raw_sql(AssertSqlSafe(format!(
        "SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; {ddl}"
    )))
    .execute(&mut *tx)
    .await;
    match outcome {
        Ok(_) => {
            tx.commit().await?;
            tracing::debug!(partition = name, done);
            Ok(true)
        }
        Err(e) if given_up(&e) => {
            tracing::info!(partition = name, error = %e, "partition left as it is until the next upkeep");
            drop(tx.rollback().await);
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// A lock not had in time, or rows in the default partition that belong
/// in the range being attached (`check_violation`): both leave things as
/// they are until the next upkeep.
fn given_up(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(sqlx::error::DatabaseError::code)
        .is_some_and(|c| c == LOCK_NOT_AVAILABLE || c == CHECK_VIOLATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_bound_is_the_first_v7_id_of_its_millisecond() {
        let id = Uuid::now_v7();
        let (secs, nanos) = id.get_timestamp().expect("v7").to_unix();
        let ms = secs * 1_000 + u64::from(nanos / 1_000_000);
        assert!(first_id_at(ms) <= id);
        assert!(id < first_id_at(ms + 1));
    }

    #[test]
    fn names_round_trip_and_others_are_ignored() {
        let r = Range {
            from: 1_795_749_300_000,
            to: 1_795_750_200_000,
        };
        assert_eq!(Range::parse(&r.name()), Some(r));
        assert_eq!(Range::parse("processed_events_default"), None);
        assert_eq!(Range::parse("outbox_1_2"), None);
        assert_eq!(
            Range::parse("processed_events_0_17"),
            Some(Range { from: 0, to: 17 })
        );
    }

    #[test]
    fn uncovered_leaves_the_gaps_around_taken_ranges() {
        let want = Range { from: 0, to: 100 };
        let taken = [Range { from: 0, to: 30 }, Range { from: 50, to: 60 }];
        assert_eq!(
            uncovered(want, &taken),
            vec![Range { from: 30, to: 50 }, Range { from: 60, to: 100 }]
        );
        assert!(uncovered(Range { from: 10, to: 20 }, &[Range { from: 0, to: 30 }]).is_empty());
    }

    #[test]
    fn spans_are_a_quarter_of_the_retention_within_bounds() {
        let kept = |secs| Retention {
            retention: Duration::from_secs(secs),
        };
        assert_eq!(kept(3_600).span_ms(), 900_000);
        assert_eq!(kept(1).span_ms(), 1_000);
        assert_eq!(kept(7 * 86_400).span_ms(), 86_400_000);
        assert_eq!(kept(7 * 86_400).every(), Duration::from_secs(60));
    }
}
