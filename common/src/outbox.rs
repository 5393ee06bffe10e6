//! The transactional outbox.
//!
//! A service never publishes directly: it calls [`enqueue`] inside the
//! transaction that changes its state, so the event exists if and only if
//! the change committed. The [`Relay`] then publishes pending rows in id
//! order with the idempotent producer, waits for every acknowledgement, and
//! only then marks them published. A crash before marking republishes the
//! batch; consumers drop the duplicates by `event_id`.
//!
//! Only one relay per database publishes at a time, which keeps each key's
//! events in commit order even when a service runs several replicas: the
//! leader holds a session-level advisory lock on a connection of its own
//! (see [`Relay`]).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prost::Message;
use rdkafka::{
    Message as _,
    producer::{FutureProducer, FutureRecord, Producer},
};
use shop_proto::EventName;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tracing::Instrument;

use crate::{
    config::{KafkaConfig, PipelineConfig},
    db, kafka, partitions,
    retry::Streak,
    trace_context::Carrier,
};

/// Most rows one prune statement deletes. The leader prunes one batch
/// between two publishing rounds (about 14 ms at 14 µs a row, BENCHMARKS.md),
/// so a backlog of expired rows never holds up publication for long: at
/// 10,000 rows a statement, pruning until none was left, a relay once
/// stopped publishing for four seconds.
const PRUNE_BATCH: i64 = 1_000;

/// Arbitrary constant naming the relay's advisory lock.
const RELAY_LOCK: i64 = 0x5348_4f50_4f55_5442; // "SHOPOUTB"

/// One event to publish.
#[derive(Clone, Debug)]
pub struct OutboxEvent {
    pub topic: String,
    pub key: String,
    pub event_type: &'static str,
    pub event_id: Uuid,
    pub payload: Vec<u8>,
    /// The trace context of what caused the event, when it is not the
    /// current span at [`enqueue`] (a set-based consumer writes the events
    /// of many records, or a group commit those of many requests, at once).
    pub cause: Option<Carrier>,
}

impl OutboxEvent {
    /// Encodes `message` for `topic`, keyed by `key` (the customer id).
    pub fn new<M: Message + EventName>(
        topic: String,
        key: &str,
        event_id: Uuid,
        message: &M,
    ) -> Self {
        Self {
            topic,
            key: key.to_owned(),
            event_type: M::EVENT_TYPE,
            event_id,
            payload: message.encode_to_vec(),
            cause: None,
        }
    }

    /// Records `span` (a consumed record's or a request's) as the cause whose
    /// trace the event continues, instead of the span current at [`enqueue`].
    #[must_use]
    pub fn caused_by(mut self, span: &tracing::Span) -> Self {
        self.cause = Some(Carrier::of(span));
        self
    }
}

/// The span of an outbox write, a child of the current span (the request or
/// the consumed record that causes the events). The rows keep its context,
/// so that the relay's producer span and every consumer continue the trace.
#[must_use]
pub fn write_span(events: usize, event_type: &'static str) -> tracing::Span {
    tracing::info_span!(
        crate::telemetry::trace_only::OUTBOX_WRITE,
        otel.kind = "internal",
        events = events,
        event_type = event_type,
    )
}

/// The columns of outbox rows, one array each, for an `UNNEST` insert: used
/// by [`enqueue`], and by writers that insert their events in the same
/// statement as their state (see [`INSERT_UNNEST`]).
#[derive(Debug)]
pub struct Columns<'a> {
    pub topics: Vec<&'a str>,
    pub keys: Vec<&'a str>,
    pub types: Vec<&'a str>,
    pub ids: Vec<Uuid>,
    pub payloads: Vec<&'a [u8]>,
    pub traceparents: Vec<Option<&'a str>>,
    pub tracestates: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    /// The rows of `events`, each with the trace context of its cause, or
    /// else `trace`.
    #[must_use]
    pub fn of(events: impl IntoIterator<Item = &'a OutboxEvent>, trace: &'a Carrier) -> Self {
        let mut c = Columns {
            topics: Vec::new(),
            keys: Vec::new(),
            types: Vec::new(),
            ids: Vec::new(),
            payloads: Vec::new(),
            traceparents: Vec::new(),
            tracestates: Vec::new(),
        };
        for e in events {
            let cause = e.cause.as_ref().unwrap_or(trace);
            c.topics.push(&e.topic);
            c.keys.push(&e.key);
            c.types.push(e.event_type);
            c.ids.push(e.event_id);
            c.payloads.push(&e.payload);
            c.traceparents.push(cause.traceparent());
            c.tracestates.push(cause.tracestate());
        }
        c
    }

    /// Binds the seven arrays, in [`INSERT_UNNEST`]'s order, handing them
    /// over to the query.
    pub fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>
    where
        'a: 'q,
    {
        query
            .bind(self.topics)
            .bind(self.keys)
            .bind(self.types)
            .bind(self.ids)
            .bind(self.payloads)
            .bind(self.traceparents)
            .bind(self.tracestates)
    }
}

/// The text of [`INSERT_UNNEST`], as a literal that `concat!` takes: a
/// writer that inserts its events in the same statement as its state puts
/// it in a `WITH` clause (`concat!("WITH … , events AS (",
/// common::outbox_insert_unnest!(), ") SELECT …")`) and binds [`Columns`]
/// first.
#[macro_export]
macro_rules! outbox_insert_unnest {
    () => {
        "INSERT INTO outbox (topic, key, event_type, event_id, payload, traceparent, tracestate)
         SELECT topic, key, event_type, event_id, payload, traceparent, tracestate
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::uuid[], $5::bytea[],
                     $6::text[], $7::text[])
              WITH ORDINALITY AS e(topic, key, event_type, event_id, payload,
                                   traceparent, tracestate, n)
         ORDER BY n"
    };
}

/// The outbox insert of [`Columns`] bound as `$1`..`$7`. `WITH ORDINALITY`
/// keeps the given order in the bigserial ids.
pub const INSERT_UNNEST: &str = outbox_insert_unnest!();

/// [`write_span`] for a write of `events`, named by the first one's type
/// (`none` when there are none).
#[must_use]
pub fn write_span_of(events: &[OutboxEvent]) -> tracing::Span {
    write_span(
        events.len(),
        events.first().map_or("none", |e| e.event_type),
    )
}

/// A statement that writes events into the outbox, alone or along with
/// the state they announce (a `WITH` clause of [`outbox_insert_unnest!`]):
/// the span it runs in ([`write_span_of`]) and the trace context of the
/// current span, which events without a cause of their own carry.
pub struct EventWrite<'e> {
    events: &'e [OutboxEvent],
    span: tracing::Span,
    trace: Carrier,
}

impl<'e> EventWrite<'e> {
    #[must_use]
    pub fn of(events: &'e [OutboxEvent]) -> Self {
        let span = write_span_of(events);
        let trace = Carrier::of(&span);
        Self {
            events,
            span,
            trace,
        }
    }

    /// `sql` with the events' columns bound as `$1`..`$7` ([`Columns`]);
    /// the caller binds its own from `$8` on, and runs the query in
    /// [`EventWrite::span`].
    pub fn query<'q>(
        &'q self,
        sql: &'static str,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        Columns::of(self.events, &self.trace).bind(sqlx::query(sql))
    }

    /// The span the statement runs in (`.instrument(write.span())`).
    #[must_use]
    pub fn span(&self) -> tracing::Span {
        self.span.clone()
    }
}

/// Writes events into the outbox on the caller's transaction, in order,
/// each with the trace context of its cause ([`OutboxEvent::caused_by`]), or
/// else of the current span (the request or the consumed record that caused
/// them).
pub async fn enqueue(conn: &mut PgConnection, events: &[OutboxEvent]) -> sqlx::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let write = EventWrite::of(events);
    write
        .query(INSERT_UNNEST)
        .execute(conn)
        .instrument(write.span())
        .await?;
    Ok(())
}

/// Wakes the relay right after a commit, so events leave without waiting for
/// the next poll interval.
#[derive(Clone, Debug, Default)]
pub struct Notifier(Arc<Notify>);

impl Notifier {
    pub fn notify(&self) {
        self.0.notify_one();
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("publish: {0}")]
    Publish(#[from] rdkafka::error::KafkaError),
    /// Not one delivery of the round acknowledged, on any partition: the
    /// producer, not the broker, is what fails (see [`Relay`]).
    #[error("publish: none of {rows} deliveries acknowledged: {error}")]
    NoneAcknowledged {
        rows: usize,
        error: rdkafka::error::KafkaError,
    },
}

impl RelayError {
    /// Worth waiting out: the database unreachable or busy, or the broker
    /// (publish failures show up as timeouts while it is away).
    fn is_transient(&self) -> bool {
        match self {
            RelayError::Db(e) => db::is_transient(e),
            RelayError::Publish(_) | RelayError::NoneAcknowledged { .. } => true,
        }
    }
}

/// An outbox row waiting to be published.
#[derive(sqlx::FromRow)]
struct PendingRow {
    id: i64,
    topic: String,
    key: String,
    event_type: String,
    event_id: Uuid,
    payload: Vec<u8>,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

/// The producer span of one event, a child of the span that wrote it
/// (OpenTelemetry messaging conventions).
fn publish_span(row: &PendingRow) -> tracing::Span {
    let span = tracing::info_span!(
        crate::telemetry::trace_only::PUBLISH,
        otel.name = %format_args!("send {}", row.topic),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = %row.topic,
        messaging.kafka.message.key = %row.key,
        messaging.message.id = %row.event_id,
        event_type = %row.event_type,
        trace_id = tracing::field::Empty,
    );
    let stored = Carrier::from_parts(row.traceparent.clone(), row.tracestate.clone());
    crate::trace_context::continue_from(&span, stored.context());
    span
}

/// Publishes the outbox of one database.
///
/// The relay that takes the advisory lock [`RELAY_LOCK`] leads; it keeps
/// the lock on a connection taken out of the pool for as long as that
/// connection lives, and the relays of other replicas retry every poll
/// interval. A round is then two statements on that connection, each its
/// own transaction: read the pending rows, and (once Kafka acknowledged
/// them all) mark them. No transaction stays open while Kafka answers, and
/// the connection runs with `synchronous_commit` off, since its only writes
/// are marks and prunes, whose loss is harmless (a lost mark republishes,
/// and consumers drop the duplicates; a lost prune is done again). The
/// leader also keeps the partitions of `processed_events`
/// ([`partitions::Retention::upkeep`]). The lock needs a session: behind a
/// pooler, use session pooling for the relay's database connections.
///
/// When the leader's connection breaks, PostgreSQL releases the lock and
/// another relay may lead while the old leader's last deliveries are still
/// in flight: at worst a batch is published twice, each copy in order.
///
/// After a broker restart an idempotent producer sometimes never recovers:
/// the fault suite caught order's relay failing every round with
/// `MessageTimedOut` on every partition for over a minute while the broker
/// served everyone else. So a round the broker acknowledged none of
/// replaces the producer (a new producer id, new connections); the round's
/// rows are sent again by the new one, and consumers drop what the old one
/// delivered after all.
pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    /// What a replacement producer is made from.
    kafka: KafkaConfig,
    notifier: Notifier,
    batch_size: i64,
    poll_interval: Duration,
    retention: Duration,
    processed: partitions::Retention,
}

impl Relay {
    #[must_use]
    pub fn new(
        pool: PgPool,
        producer: FutureProducer,
        kafka: KafkaConfig,
        cfg: &PipelineConfig,
    ) -> Self {
        Self {
            pool,
            producer,
            kafka,
            notifier: Notifier::default(),
            batch_size: cfg.outbox_batch_size,
            poll_interval: cfg.outbox_poll_interval,
            retention: cfg.outbox_retention,
            processed: partitions::Retention::new(cfg),
        }
    }

    /// A handle for writers to wake this relay after they commit.
    #[must_use]
    pub fn notifier(&self) -> Notifier {
        self.notifier.clone()
    }

    /// Publishes until `stop`, then drains what is pending (best effort)
    /// and flushes the producer. An unreachable database or broker is
    /// waited out; any other error that repeats (see [`Streak`]) ends the
    /// relay with that error, and with it the service.
    pub async fn run(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut streak = Streak::new();
        // The leader's two chores: the outbox's prune (first due one
        // interval after start) and the partitions of processed_events (due
        // at once).
        let mut prune = Chore::after_interval();
        let mut upkeep = Chore::at_once();
        let mut last_count: Option<tokio::time::Instant> = None;
        // The connection holding the lock while this relay leads.
        let mut leader: Option<PgConnection> = None;
        loop {
            // The leader also keeps the partitions of processed_events,
            // whether or not the broker answers: the consumers' writes must
            // find their ranges prepared.
            if let Some(conn) = leader.as_mut()
                && upkeep.due(self.processed.every())
            {
                upkeep.ran(match self.processed.upkeep(conn).await {
                    Ok(done) => {
                        tracing::debug!(?done, "processed_events partitions kept");
                        done.more()
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "processed_events partition upkeep failed");
                        false
                    }
                });
            }
            match self.round(&mut leader).await {
                Ok(_) => {
                    streak.reset();
                    // The pending gauge, at most once a second (a partial index count).
                    if last_count.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        last_count = Some(tokio::time::Instant::now());
                        self.count_pending().await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay failed");
                    // A database error may have cut the connection: dropping
                    // it closes it, which releases the lock, and the next
                    // round takes the lock again (or finds another relay
                    // leading). A broker error leaves the lead as it is.
                    if matches!(e, RelayError::Db(_)) {
                        leader = None;
                    }
                    if matches!(e, RelayError::NoneAcknowledged { .. }) {
                        self.replace_producer();
                    }
                    let transient = e.is_transient();
                    let delay = streak.failed(e, transient).map_err(|e| {
                        anyhow::Error::new(e).context("the outbox relay cannot go on")
                    })?;
                    tracing::debug!(?delay, "retrying the outbox relay");
                    if stop
                        .run_until_cancelled(tokio::time::sleep(delay))
                        .await
                        .is_none()
                    {
                        break;
                    }
                    continue;
                }
            }
            // One batch of expired rows per round, and rounds back to back
            // while full batches come back, so that publishing goes on
            // between batches. A relay that lost the lead leaves what is
            // left to the next leader.
            if leader.is_none() {
                prune.more = false;
                upkeep.more = false;
            }
            if let Some(conn) = leader.as_mut()
                && prune.due(self.retention.min(Duration::from_secs(60)))
            {
                prune.ran(match prune_expired(conn, self.retention).await {
                    Ok(n) => {
                        if n > 0 {
                            tracing::debug!(rows = n, "pruned published outbox rows");
                        }
                        n == PRUNE_BATCH.unsigned_abs()
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox prune failed");
                        false
                    }
                });
            }
            if prune.more || upkeep.more {
                if stop.is_cancelled() {
                    break;
                }
                continue;
            }
            // A relay that does not lead only polls for the lock: the
            // leader publishes what the notifications announce.
            let leads = leader.is_some();
            let woken = async {
                tokio::select! {
                    () = self.notifier.0.notified(), if leads => {}
                    () = tokio::time::sleep(self.poll_interval) => {}
                }
            };
            if stop.run_until_cancelled(woken).await.is_none() {
                break;
            }
        }
        if let Some(mut conn) = leader.take() {
            if let Err(e) = self.drain(&mut conn).await {
                tracing::warn!(error = %e, "final outbox drain failed; events stay pending");
            }
            // Releases the lock at once for another replica's relay.
            drop(conn.close().await);
        }
        if let Err(e) = self.producer.flush(Duration::from_secs(10)) {
            tracing::warn!(error = %e, "producer flush on shutdown failed");
        }
        tracing::info!("outbox relay stopped");
        Ok(())
    }

    /// Swaps in a new producer (see [`Relay`]). The old one's queue and
    /// in-flight requests are purged, and it is destroyed off the runtime by
    /// [`kafka::close_detached`]: librdkafka's destroy waits for its broker
    /// threads.
    fn replace_producer(&mut self) {
        match kafka::producer(&self.kafka) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut self.producer, fresh);
                // Non-blocking: the destroy on the closing thread does the waiting.
                old.purge(
                    rdkafka::producer::PurgeConfig::default()
                        .queue()
                        .inflight()
                        .non_blocking(),
                );
                kafka::close_detached(old, "closing producer");
                crate::metrics::outbox_producer_replaced();
                // The fault suite counts this line in the services' logs.
                tracing::warn!(
                    "the broker acknowledged none of the round: relaying with a new producer"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "a new producer could not be made; keeping the old one");
            }
        }
    }

    /// Takes the lead if no relay holds it, then drains the outbox if this
    /// one leads.
    async fn round(&self, leader: &mut Option<PgConnection>) -> Result<usize, RelayError> {
        if leader.is_none() {
            *leader = self.take_lead().await?;
        }
        match leader {
            Some(conn) => self.drain(conn).await,
            None => Ok(0),
        }
    }

    /// The connection now holding the lock, or `None` while another relay
    /// holds it (the connection then goes back to the pool holding nothing).
    async fn take_lead(&self) -> Result<Option<PgConnection>, RelayError> {
        let mut conn = self.pool.acquire().await?;
        let led: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(RELAY_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        if !led {
            return Ok(None);
        }
        // Never back to the pool: the lock belongs to the session, and the
        // next borrower would hold it unknowingly. Dropped, it is closed.
        let mut conn = conn.detach();
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut conn)
            .await?;
        tracing::info!("outbox relay leads: it publishes this database's outbox");
        Ok(Some(conn))
    }

    /// Publishes batches until none is full.
    async fn drain(&self, conn: &mut PgConnection) -> Result<usize, RelayError> {
        let full = usize::try_from(self.batch_size).unwrap_or(usize::MAX);
        let mut total = 0;
        loop {
            let n = self.publish_batch(conn).await?;
            total += n;
            if n < full {
                return Ok(total);
            }
        }
    }

    /// One batch on the leader's connection: read it, publish it all, await
    /// every delivery, mark it published: two round trips to the database.
    /// Returns how many were published.
    async fn publish_batch(&self, conn: &mut PgConnection) -> Result<usize, RelayError> {
        let rows: Vec<PendingRow> = sqlx::query_as(
            "SELECT id, topic, key, event_type, event_id, payload, traceparent, tracestate
             FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(self.batch_size)
        .fetch_all(&mut *conn)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        // Enqueue the whole batch before awaiting: librdkafka batches per
        // partition, and idempotence keeps the per-partition order.
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut spans = Vec::with_capacity(rows.len());
        for row in &rows {
            let span = publish_span(row);
            let headers =
                Carrier::of(&span).add_to(kafka::event_headers(&row.event_type, &row.event_id));
            let record = FutureRecord::to(&row.topic)
                .key(&row.key)
                .payload(&row.payload)
                .headers(headers);
            deliveries.push(self.producer.send(record, Duration::from_secs(30)));
            spans.push(span);
        }
        // The publish spans end when their deliveries are acknowledged.
        let mut failed: BTreeMap<(String, i32), usize> = BTreeMap::new();
        let mut first_error = None;
        for delivery in futures::future::join_all(deliveries).await {
            if let Err((e, message)) = delivery {
                *failed
                    .entry((message.topic().to_owned(), message.partition()))
                    .or_default() += 1;
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            // Which partitions refused tells a broker that lost some
            // partitions from a producer that can send nothing at all.
            let unacknowledged: usize = failed.values().sum();
            let by_partition = failed
                .iter()
                .map(|((topic, partition), n)| format!("{topic}/{partition}: {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            tracing::warn!(
                error = %e,
                failed = unacknowledged,
                of = rows.len(),
                %by_partition,
                "outbox deliveries not acknowledged; the round is sent again"
            );
            if unacknowledged == rows.len() {
                return Err(RelayError::NoneAcknowledged {
                    rows: rows.len(),
                    error: e,
                });
            }
            return Err(e.into());
        }
        drop(spans);
        // Committed without waiting for the WAL flush (the connection's
        // setting): a mark lost in a crash republishes the batch.
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *conn)
            .await?;
        crate::metrics::published(
            rows.iter()
                .map(|r| (r.topic.as_str(), r.event_type.as_str())),
        );
        Ok(rows.len())
    }

    /// Sets the outbox pending gauge; a failure only leaves it stale.
    async fn count_pending(&self) {
        let pending: sqlx::Result<i64> =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&self.pool)
                .await;
        match pending {
            Ok(n) => crate::metrics::outbox_pending(n),
            Err(e) => tracing::debug!(error = %e, "counting pending outbox rows failed"),
        }
    }
}

/// When one of the leader's chores is due: once an interval has passed
/// since it last ran, and at once again while its last run left work
/// behind (rounds then go back to back, one batch of the chore between
/// two rounds of publishing).
struct Chore {
    last: Option<tokio::time::Instant>,
    /// The last run left work behind.
    more: bool,
}

impl Chore {
    fn at_once() -> Self {
        Self {
            last: None,
            more: false,
        }
    }

    fn after_interval() -> Self {
        Self {
            last: Some(tokio::time::Instant::now()),
            more: false,
        }
    }

    fn due(&self, every: Duration) -> bool {
        self.more || self.last.is_none_or(|t| t.elapsed() >= every)
    }

    fn ran(&mut self, more: bool) {
        self.last = Some(tokio::time::Instant::now());
        self.more = more;
    }
}

/// Deletes up to [`PRUNE_BATCH`] rows published longer than the retention
/// ago, the oldest first; returns how many. There is no index on
/// `published_at` (it would cost an entry at every mark): rows are taken
/// in id order below the oldest pending row (the pending index finds it),
/// which is roughly publication order. A batch with a row not yet old
/// enough (republished after a broker change) deletes only the older ones,
/// so rows are kept at least the retention, and at worst until those
/// before them expire.
async fn prune_expired(conn: &mut PgConnection, retention: Duration) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM outbox WHERE id IN (
             SELECT id FROM outbox
             WHERE id < coalesce((SELECT min(id) FROM outbox WHERE published_at IS NULL),
                                 9223372036854775807)
             ORDER BY id LIMIT $2)
         AND published_at < now() - make_interval(secs => $1)",
    )
    .bind(retention.as_secs_f64())
    .bind(PRUNE_BATCH)
    .execute(conn)
    .await?
    .rows_affected())
}
