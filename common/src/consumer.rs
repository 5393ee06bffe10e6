//! The at-least-once consume loop, written once for every service.
//!
//! ```text
//! poll a batch ─► decode by `event-type` ─► one transaction:
//!                                            record event ids (drop seen ones)
//!                                            apply each new event
//!                                          ─► commit ─► store offsets
//! ```
//!
//! - Offsets are stored only after the transaction that applied the records
//!   committed; librdkafka commits stored offsets in the background and once
//!   more, synchronously, on shutdown. A crash redelivers, and the
//!   `processed_events` table makes the redelivery change nothing.
//! - A database that is unreachable is retried with backoff for as long as it
//!   takes: the partition waits, nothing is skipped.
//! - A record that cannot be decoded, or whose handler fails permanently (or
//!   transiently more than `consumer_max_attempts` times), goes to
//!   `<topic>.dlq` with the error in headers, and the partition moves on.
//! - Records of types the service does not act on are skipped; records of
//!   types nobody knows are logged and skipped (they may come from a newer
//!   producer).
//!
//! The happy path applies a whole batch in one transaction. When a record in
//! it fails, the batch is rolled back and replayed one record per
//! transaction, which isolates the bad record without losing the others.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::RDKafkaErrorCode,
    message::{Header, Headers, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    config::{KafkaConfig, PipelineConfig},
    db, kafka,
    kafka::header,
    metrics::{self, Outcome},
    outbox::Notifier,
    retry::{Backoff, Streak},
    trace_context::Carrier,
};

/// Where a record came from, handed to the handler with its event.
#[derive(Clone, Debug)]
pub struct EventMeta {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: Uuid,
    pub event_type: String,
    /// The consumer span of this record, a child of the context in its
    /// `traceparent` header; the handler's work runs inside it. Handlers
    /// record `order_id` on it.
    pub span: tracing::Span,
}

/// The consumer span of one record (OpenTelemetry messaging conventions).
fn record_span(m: &OwnedMessage, event_type: &str, event_id: Uuid) -> tracing::Span {
    let key = m
        .key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "process",
        otel.name = %format_args!("process {}", m.topic()),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = m.topic(),
        messaging.destination.partition.id = m.partition(),
        messaging.kafka.offset = m.offset(),
        messaging.kafka.message.key = key,
        messaging.message.id = %event_id,
        event_type,
        customer_id = key,
        order_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let parent = m
        .headers()
        .map(Carrier::from_kafka)
        .unwrap_or_default()
        .context();
    crate::trace_context::continue_from(&span, parent);
    span
}

/// Why a payload could not be turned into an event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A type no version of this service knows: logged and skipped.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// A known type whose bytes do not decode: dead-lettered.
    #[error("cannot decode {event_type}: {source}")]
    Malformed {
        event_type: String,
        source: prost::DecodeError,
    },
}

/// How applying an event failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Will fail again on the same input: dead-letter it now.
    #[error("{0}")]
    Permanent(String),
    /// Might succeed on retry (database unavailable, deadlock...).
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A service's domain, plugged into the loop.
pub trait EventHandler: Send + Sync + 'static {
    /// The service's decoded event (usually an enum of the types it acts on).
    type Event: Send + Sync + Clone;

    /// Decodes a payload by its `event-type`. `Ok(None)` means a known type
    /// this service does not act on.
    fn decode(&self, event_type: &str, payload: &[u8]) -> Result<Option<Self::Event>, DecodeError>;

    /// Applies one event inside the batch's transaction. Everything it writes,
    /// including outbox events, commits or rolls back with the batch.
    fn apply(
        &self,
        conn: &mut PgConnection,
        meta: &EventMeta,
        event: Self::Event,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies a batch's new events, in their order, inside the batch's
    /// transaction. The default applies them one by one with
    /// [`EventHandler::apply`]; a handler overrides it to apply the batch in
    /// a few set-based statements instead of a few per event. It must have
    /// the same effect as the default. It need not isolate a bad record:
    /// when it fails, the loop rolls the batch back and replays it one record
    /// per transaction through [`EventHandler::apply`].
    fn apply_all(
        &self,
        conn: &mut PgConnection,
        events: Vec<(&EventMeta, Self::Event)>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            for (meta, event) in events {
                self.apply(conn, meta, event)
                    .instrument(meta.span.clone())
                    .await?;
            }
            Ok(())
        }
    }
}

/// Decodes a prost message, mapping the error for [`EventHandler::decode`].
pub fn decode_as<M: prost::Message + Default>(
    event_type: &str,
    payload: &[u8],
) -> Result<M, DecodeError> {
    M::decode(payload).map_err(|source| DecodeError::Malformed {
        event_type: event_type.to_owned(),
        source,
    })
}

/// Parses an id carried in an event; a malformed one can never apply.
pub fn parse_id(what: &str, value: &str) -> Result<Uuid, HandlerError> {
    Uuid::parse_str(value)
        .map_err(|_| HandlerError::Permanent(format!("{what} {value:?} is not a UUID")))
}

/// Logs rebalances and counts revocations; reports consumer lag from
/// librdkafka's statistics ([`metrics::LagGauges`]).
///
/// Rebalance callbacks run inside `recv()`, never while a batch is being
/// applied, so a revoked partition's new owner cannot start before our
/// batch has committed. The one window is while a batch is being gathered:
/// records received before a revocation may belong to a partition that is
/// now someone else's. The loop sees the counter move and drops them; they
/// were not stored, so their new owner (or we, on reassignment) fetch them
/// again from the committed offset. Per-partition, hence per-customer,
/// order holds across rebalances.
///
/// It also knows since when the consumer has had no assignment (from its
/// creation or a revocation until the next assignment, an empty one
/// included): see [`ConsumeLoop::OUT_OF_GROUP_LIMIT`].
pub struct LoggingContext {
    revocations: std::sync::atomic::AtomicU64,
    lag: metrics::LagGauges,
    unassigned_since: std::sync::Mutex<Option<Instant>>,
}

impl LoggingContext {
    fn new() -> Self {
        Self {
            revocations: std::sync::atomic::AtomicU64::default(),
            lag: metrics::LagGauges::default(),
            unassigned_since: std::sync::Mutex::new(Some(Instant::now())),
        }
    }

    fn unassigned(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.unassigned_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long the consumer has been without an assignment, if it is.
    fn unassigned_for(&self) -> Option<Duration> {
        self.unassigned().map(|since| since.elapsed())
    }
}

impl ClientContext for LoggingContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.lag.report(&statistics);
    }
}

impl ConsumerContext for LoggingContext {
    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            self.revocations
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.unassigned().get_or_insert_with(Instant::now);
        }
        tracing::info!(rebalance = %describe(rebalance), "partitions being rebalanced");
    }

    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            *self.unassigned() = None;
        }
        tracing::info!(rebalance = %describe(rebalance), "partitions rebalanced");
    }

    /// A failed commit loses nothing (the records are redelivered and
    /// dropped as duplicates) but must be seen: a group that keeps failing
    /// to commit replays more and more after each restart.
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            // NoOffset: nothing was stored since the last commit.
            Ok(())
            | Err(rdkafka::error::KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(
                error = %e,
                partitions = offsets.count(),
                "offset commit failed; those records will be redelivered after a restart"
            ),
        }
    }
}

fn describe(rebalance: &Rebalance<'_>) -> String {
    let list = |tpl: &TopicPartitionList| {
        tpl.elements()
            .iter()
            .map(|e| format!("{}/{}", e.topic(), e.partition()))
            .collect::<Vec<_>>()
            .join(",")
    };
    match rebalance {
        Rebalance::Assign(tpl) => format!("assign [{}]", list(tpl)),
        Rebalance::Revoke(tpl) => format!("revoke [{}]", list(tpl)),
        Rebalance::Error(e) => format!("error {e}"),
    }
}

/// Creates a consumer subscribed to `topics` (full names), with offsets
/// stored by hand and committed by librdkafka in the background.
pub fn subscribe(
    cfg: &KafkaConfig,
    topics: &[String],
) -> Result<StreamConsumer<LoggingContext>, rdkafka::error::KafkaError> {
    let mut config = kafka::base_config(cfg);
    if let Some(instance) = &cfg.group_instance_id {
        // Static membership (KAFKA_GROUP_INSTANCE_ID, see KafkaConfig).
        config.set("group.instance.id", instance);
    }
    let consumer: StreamConsumer<LoggingContext> = config
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Fail over quickly when a group member dies (kill -9): 6 s is the
        // broker's default minimum session timeout.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1500")
        // Also the rebalance timeout: how long a join waits for members that
        // do not rejoin. After a broker crash Kafka 4.1 sometimes reloads a
        // group while its members rejoin under new ids, and the old ids never
        // expire: the join waited out librdkafka's default 300 s with the
        // group's partitions unassigned (BENCHMARKS.md, fault suite). The
        // price: a batch retried against an unreachable database for longer
        // than this leaves the group and rejoins (its records are redelivered
        // and dropped as duplicates).
        .set("max.poll.interval.ms", "30000")
        // Bounded prefetch (librdkafka's default queues up to 64 MiB per
        // consumer): a batch is at most CONSUMER_BATCH_SIZE records (500 by
        // default, about 150 KiB of these events), so 1 MiB holds several
        // batches. The queue lives in librdkafka's heap (glibc's malloc, not
        // mimalloc): at 5,000 orders/s offered it held 9-13 MiB of order's
        // RSS with 8 MiB here, 7-8 MiB with 1 MiB (BENCHMARKS.md).
        .set("queued.max.messages.kbytes", "1024")
        // For the consumer lag gauge (ClientContext::stats).
        .set("statistics.interval.ms", "5000")
        .create_with_context(LoggingContext::new())?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    Ok(consumer)
}

/// One record after header parsing and decoding.
enum Decoded<E> {
    Event(EventMeta, E),
    Skip,
    DeadLetter(String),
}

/// Runs the loop until `shutdown`: finishes the batch in hand, commits
/// offsets synchronously, returns.
pub struct ConsumeLoop<H: EventHandler> {
    pub consumer: StreamConsumer<LoggingContext>,
    pub handler: H,
    pub pool: PgPool,
    /// For dead letters (records are copied as they are, plus headers).
    pub producer: FutureProducer,
    /// Woken after each commit: handlers write outbox events.
    pub outbox: Notifier,
    /// What `consumer` was made from: a fenced static member joins again
    /// as a new consumer (see [`Fenced`]).
    pub kafka: KafkaConfig,
    pub topics: Vec<String>,
    pub config: PipelineConfig,
}

/// A static member (`KAFKA_GROUP_INSTANCE_ID`) refused with
/// `FencedInstanceId` can consume no more: librdkafka treats it as fatal.
/// Either the broker was away for longer than the session (a restart or a
/// crash): the member's group session lapsed, and its next offset commit
/// or heartbeat under the old member id is refused once the broker is back
/// (librdkafka issue 3437; here after most broker restarts); or
/// another live instance holds the same id, and the two fence each other in
/// turn every few seconds, forever. Joining again as a new consumer under
/// the same instance id cures the first. So the loop joins again, and a
/// fencing with [`Fenced::REJOINS`] others in the [`Fenced::WINDOW`] before it
/// ends it: up to three broker restarts within a minute are survived (one
/// fencing after each), while two instances under one id run out of rejoins
/// within seconds.
#[derive(Default)]
struct Fenced {
    /// When the rejoins of the last window happened.
    recent: std::collections::VecDeque<Instant>,
}

impl Fenced {
    const WINDOW: Duration = Duration::from_secs(60);
    const REJOINS: usize = 3;

    /// Whether this fencing may be cured by joining again.
    fn may_rejoin(&mut self) -> bool {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Self::WINDOW)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= Self::REJOINS {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

impl<H: EventHandler> ConsumeLoop<H> {
    /// How long a consumer may be without an assignment before the loop
    /// makes a new one. The fault suite caught order's consumer, revoked
    /// during a broker restart, never joining again: no heartbeat and no
    /// `JoinGroup` reached the broker for over 60 s, and nothing was logged
    /// (BENCHMARKS.md, eleventh session). The time counts from the
    /// revocation, so it includes the broker's own downtime: with 40 s the
    /// rescued CI run decided again only after 53.8 s. A join that completes
    /// takes at most the rebalance timeout (`max.poll.interval.ms`, also
    /// 30 s) once the broker answers, so a slow one may be replaced too,
    /// which costs a join and some redelivered records; while the broker is
    /// down this makes a new consumer every 30 s, which costs nothing.
    const OUT_OF_GROUP_LIMIT: Duration = Duration::from_secs(30);
    /// How often an idle loop looks at its consumer.
    const IDLE_CHECK: Duration = Duration::from_secs(2);

    /// Replaces the consumer by a new one under the same settings (and
    /// static instance id), counted under `reason` in
    /// [`metrics::CONSUMERS_REPLACED`]; false when it cannot be made. The
    /// old one is closed by [`kafka::close_detached`]: closing a consumer
    /// whose group is stuck can wait forever. Its stored but uncommitted
    /// offsets are lost: those records are redelivered and dropped as
    /// duplicates.
    fn join_again(&mut self, reason: &'static str) -> bool {
        match subscribe(&self.kafka, &self.topics) {
            Ok(consumer) => {
                let old = std::mem::replace(&mut self.consumer, consumer);
                kafka::close_detached(old, "closing consumer");
                metrics::consumer_replaced(reason);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "joining again failed");
                false
            }
        }
    }

    /// Consumes until `shutdown`, then commits the stored offsets. Returns
    /// an error when the loop's own bookkeeping in the database keeps
    /// failing for a reason other than unavailability (see
    /// [`crate::retry::Streak`]): no record is to blame, so none is
    /// dead-lettered, and the service stops so that someone sees it.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ConsumeError> {
        let mut outcome = Ok(());
        let mut fenced = Fenced::default();
        loop {
            let Some(batch) = shutdown.run_until_cancelled(self.next_batch()).await else {
                break;
            };
            if batch.is_empty() {
                // librdkafka's fatal errors (a static member fenced by
                // another instance under its KAFKA_GROUP_INSTANCE_ID) end
                // the consumer for good: stop, and the service with it,
                // rather than log the same error ten times a second.
                if let Some((code, reason)) = self.consumer.client().fatal_error() {
                    if code == RDKafkaErrorCode::FencedInstanceId && fenced.may_rejoin() {
                        // The fault suite counts this line in the services' logs.
                        tracing::warn!(%reason, "this static group member was fenced; \
                            joining again as a new consumer (its uncommitted records \
                            are redelivered and dropped as duplicates)");
                        if self.join_again("fenced") {
                            continue;
                        }
                    }
                    outcome = Err(ConsumeError::Consumer(code, reason));
                    break;
                }
                if let Some(out) = self.consumer.context().unassigned_for()
                    && out >= Self::OUT_OF_GROUP_LIMIT
                {
                    // The fault suite counts this line in the services' logs.
                    // Repeated, it can also mean a broker whose group
                    // coordinator is broken (README, failure table).
                    tracing::warn!(
                        secs = out.as_secs(),
                        "no partitions assigned for this long: the group's join never \
                         completed; joining again as a new consumer (if this repeats, look \
                         for group-coordinator errors in the broker's log)"
                    );
                    self.join_again("out_of_group");
                }
                continue;
            }
            match self.process(&batch, &shutdown).await {
                Ok(()) => self.store_offsets(&batch),
                // Shut down mid-retry: leave these offsets unstored.
                Err(Stop::Cancelled) => break,
                Err(Stop::Fatal(e)) => {
                    outcome = Err(ConsumeError::Bookkeeping(e));
                    break;
                }
            }
        }
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            // NoOffset: nothing stored since the last commit.
            tracing::debug!(error = %e, "final offset commit");
        }
        self.consumer.unsubscribe();
        tracing::info!(group = %self.kafka.group_id, "consumer stopped");
        outcome
    }

    /// Waits for one record, then takes whatever else is ready right away,
    /// up to the batch size. Records gathered before a revocation are
    /// dropped (see [`LoggingContext`]).
    async fn next_batch(&self) -> Vec<OwnedMessage> {
        let revocations = || {
            self.consumer
                .context()
                .revocations
                .load(std::sync::atomic::Ordering::SeqCst)
        };
        let mut batch = Vec::new();
        // Back empty-handed now and then, so that the loop can see a
        // consumer that is out of its group.
        let Ok(first) = tokio::time::timeout(Self::IDLE_CHECK, self.consumer.recv()).await else {
            return batch;
        };
        match first {
            Ok(m) => batch.push(m.detach()),
            Err(e) => {
                // Broker unreachable and the like: librdkafka reconnects.
                tracing::warn!(error = %e, "consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return batch;
            }
        }
        // A record returned by a recv() during which a revocation ran comes
        // from the new assignment; only those gathered before are stale.
        let mut seen = revocations();
        while batch.len() < self.config.consumer_batch_size {
            let next = tokio::time::timeout(Duration::from_millis(2), self.consumer.recv()).await;
            if revocations() != seen {
                seen = revocations();
                tracing::info!(
                    dropped = batch.len(),
                    "rebalanced while gathering a batch; its records are fetched again"
                );
                batch.clear();
            }
            match next {
                Ok(Ok(m)) => batch.push(m.detach()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                Err(_) => break,
            }
        }
        batch
    }

    fn store_offsets(&self, batch: &[OwnedMessage]) {
        let mut next: HashMap<(&str, i32), i64> = HashMap::new();
        for m in batch {
            let e = next.entry((m.topic(), m.partition())).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
        }
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            // Partitions revoked meanwhile: their new owner redelivers, and
            // the redelivery is dropped as a duplicate.
            tracing::info!(error = %e, "could not store offsets (rebalanced?)");
        }
    }

    fn decode(&self, m: &OwnedMessage) -> Decoded<H::Event> {
        let event_type = event_type(m);
        let event_id = m
            .headers()
            .and_then(|h| kafka::header_str(h, header::EVENT_ID))
            .and_then(|v| Uuid::parse_str(v).ok());
        let (Some(event_type), Some(event_id)) = (event_type, event_id) else {
            return Decoded::DeadLetter("missing or invalid event-type/event-id header".into());
        };
        let payload = m.payload().unwrap_or_default();
        match self.handler.decode(event_type, payload) {
            Ok(Some(event)) => Decoded::Event(
                EventMeta {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    event_id,
                    event_type: event_type.to_owned(),
                    span: record_span(m, event_type, event_id),
                },
                event,
            ),
            Ok(None) => Decoded::Skip,
            Err(DecodeError::UnknownType(t)) => {
                tracing::warn!(event_type = %t, topic = m.topic(), offset = m.offset(), "skipping record of unknown event type");
                Decoded::Skip
            }
            Err(e) => Decoded::DeadLetter(e.to_string()),
        }
    }

    /// Applies a batch: all in one transaction when it can, otherwise one
    /// record per transaction. Err when shut down before finishing, or when
    /// the loop cannot go on.
    async fn process(
        &self,
        batch: &[OwnedMessage],
        shutdown: &CancellationToken,
    ) -> Result<(), Stop> {
        let mut events = Vec::with_capacity(batch.len());
        for m in batch {
            match self.decode(m) {
                Decoded::Event(meta, event) => events.push((m, meta, event)),
                Decoded::Skip => metrics::consumed(m.topic(), event_type(m), Outcome::Skipped),
                Decoded::DeadLetter(reason) => {
                    self.dead_letter(m, &reason, 1, shutdown).await?;
                }
            }
        }
        if events.is_empty() {
            return Ok(());
        }
        // Fast path: the whole batch in one transaction, retried while the
        // database is unavailable.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let events = loop {
            match self.apply_batch(events).await {
                Ok(()) => {
                    self.outbox.notify();
                    return Ok(());
                }
                Err((returned, e)) if e.is_unavailable() => {
                    events = returned;
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "database unavailable; retrying batch");
                    sleep_or_cancel(delay, shutdown).await?;
                }
                Err((returned, e)) => {
                    tracing::info!(error = %e, "batch failed; replaying it record by record");
                    break returned;
                }
            }
        };
        // Slow path: one record per transaction, to isolate the bad one.
        for (m, meta, event) in events {
            self.apply_one(m, meta, event, shutdown).await?;
        }
        self.outbox.notify();
        Ok(())
    }

    /// Applies every event in one transaction. On failure, returns the events
    /// so that the caller can retry them.
    #[allow(clippy::type_complexity)]
    async fn apply_batch<'m>(
        &self,
        events: Vec<(&'m OwnedMessage, EventMeta, H::Event)>,
    ) -> Result<(), (Vec<(&'m OwnedMessage, EventMeta, H::Event)>, BatchError)> {
        let attempt = async {
            let mut tx = self.pool.begin().await?;
            let metas: Vec<&EventMeta> = events.iter().map(|(_, meta, _)| meta).collect();
            let mut fresh = record_processed(&mut tx, &metas).await?;
            let mut duplicates: HashMap<&str, i64> = HashMap::new();
            let mut new = Vec::with_capacity(events.len());
            for (_, meta, event) in &events {
                // `remove` also drops a second copy within the same batch.
                if fresh.remove(&meta.event_id) {
                    new.push((meta, event.clone()));
                    metrics::consumed(&meta.topic, Some(&meta.event_type), Outcome::Applied);
                } else {
                    *duplicates.entry(meta.topic.as_str()).or_default() += 1;
                    metrics::consumed(&meta.topic, Some(&meta.event_type), Outcome::Duplicate);
                }
            }
            if !new.is_empty() {
                self.handler.apply_all(&mut tx, new).await?;
            }
            for (topic, n) in duplicates {
                count(&mut tx, topic, "duplicates_suppressed", n).await?;
                tracing::info!(topic, duplicates = n, "dropped already-processed events");
            }
            tx.commit().await?;
            Ok::<(), BatchError>(())
        };
        // Counted (here and by handlers) only once the batch committed.
        match metrics::on_commit(attempt).await {
            Ok(()) => Ok(()),
            Err(e) => Err((events, e)),
        }
    }

    /// Applies one event in its own transaction, retrying transient failures
    /// and dead-lettering the record when its handler fails permanently.
    /// Failures of the loop's own statements are not the record's fault:
    /// they are retried, and end the loop if they persist.
    async fn apply_one(
        &self,
        m: &OwnedMessage,
        meta: EventMeta,
        event: H::Event,
        shutdown: &CancellationToken,
    ) -> Result<(), Stop> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut bookkeeping = Streak::new();
        let mut failures = 0;
        loop {
            let attempt = async {
                let mut tx = self.pool.begin().await?;
                if record_processed(&mut tx, &[&meta]).await?.is_empty() {
                    count(&mut tx, &meta.topic, "duplicates_suppressed", 1).await?;
                    metrics::consumed(&meta.topic, Some(&meta.event_type), Outcome::Duplicate);
                } else {
                    self.handler
                        .apply(&mut tx, &meta, event.clone())
                        .instrument(meta.span.clone())
                        .await?;
                    metrics::consumed(&meta.topic, Some(&meta.event_type), Outcome::Applied);
                }
                tx.commit().await?;
                Ok::<(), BatchError>(())
            };
            let error = match metrics::on_commit(attempt).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if error.is_unavailable() {
                let delay = backoff.next_delay();
                tracing::warn!(error = %error, ?delay, "database unavailable; retrying record");
                sleep_or_cancel(delay, shutdown).await?;
                continue;
            }
            if let BatchError::Db(e) = error {
                tracing::warn!(error = %e, "consume loop's own statements failed; retrying");
                let transient = db::is_transient(&e);
                let delay = bookkeeping.failed(e, transient).map_err(Stop::Fatal)?;
                sleep_or_cancel(delay, shutdown).await?;
                continue;
            }
            failures += 1;
            if error.is_permanent() || failures >= self.config.consumer_max_attempts {
                tracing::error!(error = %error, topic = %meta.topic, offset = meta.offset, event_id = %meta.event_id, "dead-lettering record");
                return Ok(self
                    .dead_letter(m, &error.to_string(), failures, shutdown)
                    .await?);
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %error, attempt = failures, ?delay, "record failed; retrying");
            sleep_or_cancel(delay, shutdown).await?;
        }
    }

    /// Copies the record to `<topic>.dlq` with the error in headers, waiting
    /// for the broker to take it (retrying while it is unreachable).
    async fn dead_letter(
        &self,
        m: &OwnedMessage,
        error: &str,
        attempts: u32,
        shutdown: &CancellationToken,
    ) -> Result<(), Cancelled> {
        let dlq = crate::topics::dlq(m.topic());
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        let attempts_s = attempts.to_string();
        let mut headers = OwnedHeaders::new();
        if let Some(original) = m.headers() {
            for h in original.iter().filter(|h| !h.key.starts_with("dlq-")) {
                headers = headers.insert(h);
            }
        }
        for (key, value) in [
            (header::DLQ_SOURCE_TOPIC, m.topic()),
            (header::DLQ_SOURCE_PARTITION, partition.as_str()),
            (header::DLQ_SOURCE_OFFSET, offset.as_str()),
            (header::DLQ_ERROR, error),
            (header::DLQ_ATTEMPTS, attempts_s.as_str()),
            (header::DLQ_CONSUMER_GROUP, self.kafka.group_id.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let mut record = FutureRecord::to(&dlq).headers(headers.clone());
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            if let Some(payload) = m.payload() {
                record = record.payload(payload);
            }
            match self.producer.send(record, Duration::from_secs(10)).await {
                Ok(_) => break,
                Err((e, _)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, %dlq, "dead-letter publish failed; retrying");
                    sleep_or_cancel(delay, shutdown).await?;
                }
            }
        }
        tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %error, "record dead-lettered");
        metrics::consumed(m.topic(), event_type(m), Outcome::DeadLettered);
        // Best effort: the DLQ topic itself is the record of truth.
        let mut backoff = Backoff::default();
        for _ in 0..3 {
            match self.pool.acquire().await {
                Ok(mut conn) => {
                    if count(&mut conn, m.topic(), "dead_lettered", 1)
                        .await
                        .is_ok()
                    {
                        break;
                    }
                }
                Err(_) => tokio::time::sleep(backoff.next_delay()).await,
            }
        }
        Ok(())
    }
}

/// The record's `event-type` header, if any.
fn event_type(m: &OwnedMessage) -> Option<&str> {
    m.headers()
        .and_then(|h| kafka::header_str(h, header::EVENT_TYPE))
}

/// Records the events as processed; returns the ids that were new.
async fn record_processed(
    conn: &mut PgConnection,
    metas: &[&EventMeta],
) -> sqlx::Result<HashSet<Uuid>> {
    let ids: Vec<Uuid> = metas.iter().map(|m| m.event_id).collect();
    let types: Vec<&str> = metas.iter().map(|m| m.event_type.as_str()).collect();
    let topics: Vec<&str> = metas.iter().map(|m| m.topic.as_str()).collect();
    let partitions: Vec<i32> = metas.iter().map(|m| m.partition).collect();
    let offsets: Vec<i64> = metas.iter().map(|m| m.offset).collect();
    let fresh: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO processed_events (event_id, event_type, topic, partition, kafka_offset)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int[], $5::bigint[])
         ON CONFLICT (event_id) DO NOTHING
         RETURNING event_id",
    )
    .bind(&ids)
    .bind(&types)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .fetch_all(conn)
    .await?;
    Ok(fresh.into_iter().collect())
}

async fn count(conn: &mut PgConnection, topic: &str, name: &str, by: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO consumer_counters (topic, name, value) VALUES ($1, $2, $3)
         ON CONFLICT (topic, name) DO UPDATE SET value = consumer_counters.value + EXCLUDED.value",
    )
    .bind(topic)
    .bind(name)
    .bind(by)
    .execute(conn)
    .await?;
    Ok(())
}

/// Shutdown arrived while waiting to retry.
#[derive(Debug)]
struct Cancelled;

/// Why [`ConsumeLoop::process`] stopped short.
enum Stop {
    Cancelled,
    Fatal(sqlx::Error),
}

impl From<Cancelled> for Stop {
    fn from(_: Cancelled) -> Self {
        Stop::Cancelled
    }
}

/// Why the consume loop stopped before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The loop's own statements (recording processed events, counters,
    /// commits) keep failing for a reason other than unavailability.
    #[error("the consume loop cannot record its progress: {0}")]
    Bookkeeping(#[source] sqlx::Error),
    /// The Kafka consumer raised a fatal error and can consume no more.
    #[error("the Kafka consumer failed for good ({0:?}): {1}")]
    Consumer(RDKafkaErrorCode, String),
}

async fn sleep_or_cancel(delay: Duration, shutdown: &CancellationToken) -> Result<(), Cancelled> {
    shutdown
        .run_until_cancelled(tokio::time::sleep(delay))
        .await
        .ok_or(Cancelled)
}

#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Handler(#[from] HandlerError),
}

impl BatchError {
    fn sqlx(&self) -> Option<&sqlx::Error> {
        match self {
            BatchError::Db(e) | BatchError::Handler(HandlerError::Db(e)) => Some(e),
            BatchError::Handler(HandlerError::Permanent(_)) => None,
        }
    }

    fn is_unavailable(&self) -> bool {
        self.sqlx().is_some_and(db::is_unavailable)
    }

    fn is_permanent(&self) -> bool {
        self.sqlx().is_none_or(|e| !db::is_transient(e))
    }
}

#[cfg(test)]
mod tests {
    use super::Fenced;

    #[test]
    fn a_fenced_member_joins_again_three_times_a_minute() {
        let mut fenced = Fenced::default();
        for n in 1..=Fenced::REJOINS {
            assert!(fenced.may_rejoin(), "fencing {n} is cured by joining again");
        }
        assert!(
            !fenced.may_rejoin(),
            "one more within the window ends the loop"
        );
        // The oldest rejoin leaves the window: one more is allowed.
        let oldest = fenced.recent.front_mut().unwrap();
        *oldest = oldest.checked_sub(Fenced::WINDOW).unwrap();
        assert!(
            fenced.may_rejoin(),
            "a fencing once the oldest has left the window joins again"
        );
        assert!(!fenced.may_rejoin(), "and the window is full again");
    }
}
