//! Prometheus metrics: one recorder per process, served as text on
//! `GET /metrics` at `METRICS_ADDR` (see [`crate::service::Service::serve_metrics`]).
//!
//! The `metrics` facade records; `metrics-exporter-prometheus` renders the
//! text exposition format; `metrics-process` adds `process_*` (memory, CPU,
//! open files), collected at each scrape (`process_cpu_seconds_total` is
//! typed gauge so that it keeps fractions of a second; `rate()` works on it
//! all the same). The names, all prefixed `shop_`:
//!
//! | name | type | labels | where |
//! |---|---|---|---|
//! | [`ORDERS_CREATED`] | counter | | order, a new order committed (not an idempotent replay) |
//! | [`ORDERS_DECIDED`] | counter | `status` (CONFIRMED, CANCELLED) | order, the decision committed |
//! | [`RPC_SERVER_DURATION`] | histogram | `method`, `code` | every gRPC call ([`GrpcMetricsLayer`]) |
//! | [`HTTP_SERVER_DURATION`] | histogram | `route`, `status` | every REST request ([`track_http`]) |
//! | [`EVENTS_PUBLISHED`] | counter | `topic`, `event_type` | the outbox relay, once the broker has the batch |
//! | [`OUTBOX_PENDING`] | gauge | | outbox rows not yet published, counted by the relay at most once a second |
//! | [`OUTBOX_PRODUCERS_REPLACED`] | counter | | the outbox relay replaced its producer after a round the broker acknowledged none of |
//! | [`CONSUMERS_REPLACED`] | counter | `reason` (`fenced`, `out_of_group`) | the consume loop made a new consumer: a fenced static member, or one without an assignment for 30 s |
//! | [`EVENTS_CONSUMED`] | counter | `topic`, `event_type`, `outcome` | the consume loop: applied, duplicate, `dead_lettered`, skipped |
//! | [`CONSUMER_LAG`] | gauge | `topic`, `partition` | librdkafka statistics, every 5 s |
//! | [`DB_POOL_CONNECTIONS`] | gauge | `state` (idle, active) | the service's pool, at each scrape |
//! | [`ORDER_GROUP_SIZE`] | histogram | | order, `CreateOrder` requests per group-commit transaction |
//! | [`ORDER_INTAKE_QUEUED`] | gauge | | order, `CreateOrder` requests waiting for a group-commit writer |
//! | [`ORDERS_PENDING`] | gauge | | order, orders waiting to be decided (PENDING), read every second when `INTAKE_MAX_PENDING` is on |
//! | [`ORDER_INTAKE_STAGE_DURATION`] | histogram | `stage` (queue, write) | order, per request: waiting for a writer to take it; its group's transaction, connection wait included |
//! | [`SET_BASED_RUNS`] | counter | `topic`, `side` (payment, inventory) | a run of `OrderCreated` a saga side applied in a few set-based statements ([`crate::saga`]) |
//! | [`SET_BASED_EVENTS`] | counter | `topic`, `side` | the events of those runs; events / runs is the mean run size |
//!
//! Counters that follow a database transaction (applied, duplicate, orders
//! decided) count only once it committed: see [`on_commit`].

use std::{
    cell::RefCell,
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::{Mutex, OnceLock, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    extract::{MatchedPath, Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use metrics::{Label, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use shop_proto::{EventName, events};
use sqlx::PgPool;

pub const ORDERS_CREATED: &str = "shop_orders_created_total";
pub const ORDERS_DECIDED: &str = "shop_orders_decided_total";
pub const RPC_SERVER_DURATION: &str = "shop_rpc_server_duration_seconds";
pub const HTTP_SERVER_DURATION: &str = "shop_http_server_duration_seconds";
pub const EVENTS_PUBLISHED: &str = "shop_events_published_total";
pub const OUTBOX_PENDING: &str = "shop_outbox_pending";
pub const OUTBOX_PRODUCERS_REPLACED: &str = "shop_outbox_producers_replaced_total";
pub const CONSUMERS_REPLACED: &str = "shop_consumers_replaced_total";
pub const EVENTS_CONSUMED: &str = "shop_events_consumed_total";
pub const CONSUMER_LAG: &str = "shop_consumer_lag";
pub const DB_POOL_CONNECTIONS: &str = "shop_db_pool_connections";
pub const ORDER_GROUP_SIZE: &str = "shop_order_group_size";
pub const ORDER_INTAKE_QUEUED: &str = "shop_order_intake_queued";
pub const ORDERS_PENDING: &str = "shop_orders_pending";
pub const ORDER_INTAKE_STAGE_DURATION: &str = "shop_order_intake_stage_duration_seconds";

/// Group sizes: one request alone up to past the default group maximum.
const GROUP_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
pub const SET_BASED_RUNS: &str = "shop_consumer_set_based_runs_total";
pub const SET_BASED_EVENTS: &str = "shop_consumer_set_based_events_total";

/// Latency buckets, in seconds: half a millisecond to ten seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The event types of the contract; any other `event-type` header is
/// labelled `unknown`, so that a stray producer cannot grow the series.
const EVENT_TYPES: [&str; 7] = [
    events::OrderCreated::EVENT_TYPE,
    events::OrderCancelled::EVENT_TYPE,
    events::OrderConfirmed::EVENT_TYPE,
    events::PaymentCompleted::EVENT_TYPE,
    events::PaymentRefunded::EVENT_TYPE,
    events::InventoryUpdated::EVENT_TYPE,
    events::InventoryReleased::EVENT_TYPE,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Installs the Prometheus recorder, once per process (the tests run three
/// services in one), and returns its handle. Call it before anything is
/// recorded: until then the facade drops what it is given.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_duration_seconds".to_owned()),
                LATENCY_BUCKETS,
            )
            .expect("the buckets are not empty")
            .set_buckets_for_metric(
                Matcher::Full(ORDER_GROUP_SIZE.to_owned()),
                GROUP_SIZE_BUCKETS,
            )
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if let Err(e) = metrics::set_global_recorder(recorder) {
            tracing::warn!(error = %e, "another metrics recorder is installed; /metrics stays empty");
        }
        describe();
        process().describe();
        handle
    })
}

fn process() -> &'static metrics_process::Collector {
    PROCESS.get_or_init(metrics_process::Collector::default)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        ORDERS_CREATED,
        "Orders accepted and committed (idempotent replays excluded)."
    );
    describe_counter!(ORDERS_DECIDED, "Orders decided, by final status.");
    describe_histogram!(
        RPC_SERVER_DURATION,
        metrics::Unit::Seconds,
        "gRPC calls served, by method and grpc-status."
    );
    describe_histogram!(
        HTTP_SERVER_DURATION,
        metrics::Unit::Seconds,
        "REST requests served, by route template and HTTP status."
    );
    describe_counter!(EVENTS_PUBLISHED, "Outbox events the broker acknowledged.");
    describe_gauge!(OUTBOX_PENDING, "Outbox rows not yet published.");
    describe_counter!(
        OUTBOX_PRODUCERS_REPLACED,
        "Producers the outbox relay replaced after a round the broker acknowledged none of."
    );
    describe_counter!(
        CONSUMERS_REPLACED,
        "Consumers the consume loop replaced, by reason: fenced, out_of_group."
    );
    describe_counter!(
        EVENTS_CONSUMED,
        "Records consumed, by outcome: applied, duplicate, dead_lettered, skipped."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Records behind the partition's end, from the committed offset."
    );
    describe_gauge!(DB_POOL_CONNECTIONS, "Database pool connections, by state.");
    describe_histogram!(
        ORDER_GROUP_SIZE,
        "CreateOrder requests written per group-commit transaction."
    );
    describe_gauge!(
        ORDER_INTAKE_QUEUED,
        "CreateOrder requests waiting for a group-commit writer."
    );
    describe_gauge!(
        ORDERS_PENDING,
        "Orders waiting to be decided (PENDING), as intake's backlog bound last read them."
    );
    describe_histogram!(
        ORDER_INTAKE_STAGE_DURATION,
        "Per CreateOrder: waiting for a group-commit writer (queue), its group's transaction (write)."
    );
    describe_counter!(
        SET_BASED_RUNS,
        "Runs of OrderCreated events a saga side applied set-based, in one go."
    );
    describe_counter!(
        SET_BASED_EVENTS,
        "OrderCreated events applied set-based (in those runs)."
    );
}

/// The `/metrics` endpoint of one service; `pool` is sampled at each scrape.
pub(crate) fn router(pool: PgPool) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(pool)
}

async fn scrape(State(pool): State<PgPool>) -> impl IntoResponse {
    process().collect();
    let size = pool.size();
    let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX).min(size);
    gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(f64::from(idle));
    gauge!(DB_POOL_CONNECTIONS, "state" => "active").set(f64::from(size - idle));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        install().render(),
    )
}

/// Drains histogram samples into their buckets now and then, so that
/// memory stays bounded when nobody scrapes. Runs until dropped.
pub(crate) async fn upkeep() {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        install().run_upkeep();
    }
}

// --- domain counters ------------------------------------------------------

/// `n` new orders committed.
pub fn orders_created(n: u64) {
    counter!(ORDERS_CREATED).increment(n);
}

/// A group-commit transaction of order's intake wrote `size` requests
/// (new orders, replays and conflicts alike).
pub fn order_group(size: usize) {
    #[allow(clippy::cast_precision_loss)] // at most INTAKE_GROUP_MAX
    histogram!(ORDER_GROUP_SIZE).record(size as f64);
}

/// `CreateOrder` requests now waiting for a group-commit writer.
pub fn order_intake_queued(n: usize) {
    #[allow(clippy::cast_precision_loss)] // at most INTAKE_QUEUE_MAX
    gauge!(ORDER_INTAKE_QUEUED).set(n as f64);
}

/// `n` orders wait to be decided (the backlog bound's last count).
pub fn orders_pending(n: u64) {
    #[allow(clippy::cast_precision_loss)] // far below 2^52
    gauge!(ORDERS_PENDING).set(n as f64);
}

/// Where a `CreateOrder` spent `queued` (handed over until a writer ran
/// with it) and `written` (its group's transaction, from asking the pool
/// for a connection to the commit): the two parts of intake latency that
/// group commit adds or saves.
pub fn order_intake_stages(queued: Duration, written: Duration) {
    histogram!(ORDER_INTAKE_STAGE_DURATION, "stage" => "queue").record(queued.as_secs_f64());
    histogram!(ORDER_INTAKE_STAGE_DURATION, "stage" => "write").record(written.as_secs_f64());
}

/// `n` orders decided with `status` (`CONFIRMED` or `CANCELLED`). Inside
/// [`on_commit`] this counts when the transaction commits; elsewhere, now
/// (call it after the commit).
pub fn orders_decided(status: &'static str, n: u64) {
    count_on_commit(ORDERS_DECIDED, vec![Label::new("status", status)], n);
}

/// Makes the order counters show (at 0) before the first order.
pub fn register_order_counters() {
    counter!(ORDERS_CREATED).increment(0);
    for status in ["CONFIRMED", "CANCELLED"] {
        counter!(ORDERS_DECIDED, "status" => status).increment(0);
    }
}

/// What became of a consumed record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    DeadLettered,
    Skipped,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Skipped => "skipped",
        }
    }
}

/// A contract event type as is, anything else as `unknown`.
#[must_use]
pub fn event_type_label(event_type: Option<&str>) -> &'static str {
    event_type
        .and_then(|t| EVENT_TYPES.iter().find(|known| **known == t))
        .copied()
        .unwrap_or("unknown")
}

/// One record consumed with `outcome`; applied and duplicate records count
/// when the transaction commits (see [`on_commit`]).
pub(crate) fn consumed(topic: &str, event_type: Option<&str>, outcome: Outcome) {
    let labels = vec![
        Label::new("topic", topic.to_owned()),
        Label::new("event_type", event_type_label(event_type)),
        Label::new("outcome", outcome.as_str()),
    ];
    count_on_commit(EVENTS_CONSUMED, labels, 1);
}

/// A run of `events` records of `topic`, all of `event_type`
/// (`OrderCreated` or `OrderCancelled`), applied set-based by a saga
/// `side`; counts when the transaction commits (see [`on_commit`]), so a
/// batch that fell back to one record at a time counts nothing here.
pub fn set_based_run(topic: &str, side: &'static str, event_type: &'static str, events: u64) {
    let labels = || {
        vec![
            Label::new("topic", topic.to_owned()),
            Label::new("side", side),
            Label::new("event_type", event_type),
        ]
    };
    count_on_commit(SET_BASED_RUNS, labels(), 1);
    count_on_commit(SET_BASED_EVENTS, labels(), events);
}

/// Events the broker acknowledged, as `(topic, event_type)` pairs.
pub(crate) fn published<'a>(events: impl IntoIterator<Item = (&'a str, &'a str)>) {
    let mut tally: Vec<((&str, &str), u64)> = Vec::new();
    for event in events {
        match tally.iter_mut().find(|(k, _)| *k == event) {
            Some((_, n)) => *n += 1,
            None => tally.push((event, 1)),
        }
    }
    for ((topic, event_type), n) in tally {
        counter!(
            EVENTS_PUBLISHED,
            "topic" => topic.to_owned(),
            "event_type" => event_type_label(Some(event_type)),
        )
        .increment(n);
    }
}

/// The relay replaced its producer.
pub(crate) fn outbox_producer_replaced() {
    counter!(OUTBOX_PRODUCERS_REPLACED).increment(1);
}

/// The consume loop made a new consumer, for `reason`.
pub(crate) fn consumer_replaced(reason: &'static str) {
    counter!(CONSUMERS_REPLACED, "reason" => reason).increment(1);
}

/// Outbox rows not yet published.
pub(crate) fn outbox_pending(rows: i64) {
    #[allow(clippy::cast_precision_loss)] // a count far below 2^52
    gauge!(OUTBOX_PENDING).set(rows as f64);
}

// --- counting after a commit ----------------------------------------------

/// What a transaction deferred to its commit: counts, and hooks.
#[derive(Default)]
struct Pending {
    counts: Vec<(&'static str, Vec<Label>, u64)>,
    hooks: Vec<Box<dyn FnOnce() + Send>>,
}

tokio::task_local! {
    static ON_COMMIT: RefCell<Pending>;
}

/// Runs `work`, a transaction that ends in its commit, and counts what was
/// counted inside it with [`count_on_commit`] (then runs the hooks given to
/// [`after_commit`]) only when it returns `Ok`: a batch rolled back and
/// replayed record by record counts each record once.
pub async fn on_commit<T, E>(work: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let (result, pending) = ON_COMMIT
        .scope(RefCell::new(Pending::default()), async {
            let result = work.await;
            (result, ON_COMMIT.with(RefCell::take))
        })
        .await;
    if result.is_ok() {
        for (name, labels, n) in pending.counts {
            counter!(name, labels).increment(n);
        }
        for hook in pending.hooks {
            hook();
        }
    }
    result
}

/// Runs `hook` when the enclosing [`on_commit`] commits (never if it does
/// not), or now outside one: what the process learns from a transaction
/// (orders decided) it learns once the transaction is durable.
pub fn after_commit(hook: impl FnOnce() + Send + 'static) {
    let mut hook: Option<Box<dyn FnOnce() + Send>> = Some(Box::new(hook));
    // Outside an on_commit scope there is nothing to defer to: `hook` stays.
    let _ = ON_COMMIT.try_with(|pending| pending.borrow_mut().hooks.extend(hook.take()));
    if let Some(hook) = hook {
        hook();
    }
}

/// Adds `n` to a counter when the enclosing [`on_commit`] commits, or now
/// outside one.
pub fn count_on_commit(name: &'static str, labels: Vec<Label>, n: u64) {
    let deferred = ON_COMMIT.try_with(|pending| {
        let mut pending = pending.borrow_mut();
        match pending
            .counts
            .iter_mut()
            .find(|(k, l, _)| *k == name && *l == labels)
        {
            Some((_, _, count)) => *count += n,
            None => pending.counts.push((name, labels.clone(), n)),
        }
    });
    if deferred.is_err() {
        counter!(name, labels).increment(n);
    }
}

// --- consumer lag -----------------------------------------------------------

/// Sets [`CONSUMER_LAG`] from librdkafka's statistics: for each partition
/// this consumer fetches, the high watermark (last stable offset under
/// `read_committed`) less the committed offset. Partitions it no longer
/// fetches (revoked) drop to 0 rather than keep a stale value; partition -1
/// (librdkafka's internal one) and unknown lags (-1, before the first
/// commit) are left out.
#[derive(Debug, Default)]
pub struct LagGauges {
    reported: Mutex<HashSet<(String, i32)>>,
}

impl LagGauges {
    pub fn report(&self, stats: &rdkafka::Statistics) {
        let mut now = HashSet::new();
        for (name, topic) in &stats.topics {
            for (id, p) in &topic.partitions {
                if *id < 0 || p.consumer_lag < 0 || p.fetch_state != "active" {
                    continue;
                }
                #[allow(clippy::cast_precision_loss)] // offsets far below 2^52
                gauge!(CONSUMER_LAG, "topic" => name.clone(), "partition" => id.to_string())
                    .set(p.consumer_lag as f64);
                now.insert((name.clone(), *id));
            }
        }
        let mut reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, id) in reported.difference(&now) {
            gauge!(CONSUMER_LAG, "topic" => name.clone(), "partition" => id.to_string()).set(0.0);
        }
        *reported = now;
    }
}

// --- request durations ----------------------------------------------------

/// Records [`RPC_SERVER_DURATION`] for every gRPC call, health and
/// reflection included: `method` is the path without its leading `/`
/// (`shop.order.v1.OrderService/CreateOrder`; `unknown` for a path the
/// server does not serve), `code` the grpc-status name (`OK`, `NOT_FOUND`,
/// ...). The time is until the response headers, which for a unary call is
/// when its handler is done. tonic puts an error's grpc-status in the
/// headers (a trailers-only response) and OK's in the trailers, so a call
/// without grpc-status in its headers is counted `OK`; an error that a
/// streaming call sends at its end in trailers is not seen (only reflection
/// streams here).
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let start = Instant::now();
        let method = request.uri().path().trim_start_matches('/').to_owned();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .map_or(tonic::Code::Ok, |v| tonic::Code::from_bytes(v.as_bytes())),
                Err(_) => tonic::Code::Unknown,
            };
            let method = if code == tonic::Code::Unimplemented {
                "unknown".to_owned()
            } else {
                method
            };
            histogram!(RPC_SERVER_DURATION, "method" => method, "code" => code_name(code))
                .record(start.elapsed().as_secs_f64());
            result
        })
    }
}

/// The canonical name of a gRPC status code.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// axum middleware recording [`HTTP_SERVER_DURATION`]: `route` is the
/// matched route template (`/api/v1/orders/{order_id}`; `unmatched` for
/// requests no route took), `status` the HTTP status code.
pub async fn track_http(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    histogram!(
        HTTP_SERVER_DURATION,
        "route" => route,
        "status" => response.status().as_u16().to_string(),
    )
    .record(start.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_inside_on_commit_only_when_it_commits() {
        let handle = install();
        let labels = || vec![Label::new("status", "TEST_ON_COMMIT")];
        let value = || {
            handle
                .render()
                .lines()
                .find(|l| l.starts_with(ORDERS_DECIDED) && l.contains("TEST_ON_COMMIT"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let failed: Result<(), ()> = on_commit(async {
            count_on_commit(ORDERS_DECIDED, labels(), 5);
            Err(())
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(value(), 0, "a rolled-back transaction counts nothing");
        let done: Result<(), ()> = on_commit(async {
            count_on_commit(ORDERS_DECIDED, labels(), 2);
            tokio::task::yield_now().await;
            count_on_commit(ORDERS_DECIDED, labels(), 1);
            Ok(())
        })
        .await;
        assert!(done.is_ok());
        assert_eq!(value(), 3);
        count_on_commit(ORDERS_DECIDED, labels(), 1);
        assert_eq!(value(), 4, "outside on_commit it counts at once");
    }

    #[tokio::test]
    async fn hooks_run_after_a_commit_only() {
        use std::sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        };
        let ran = Arc::new(AtomicU64::new(0));
        let add = |n: u64| {
            let ran = ran.clone();
            move || {
                ran.fetch_add(n, Ordering::SeqCst);
            }
        };
        let failed: Result<(), ()> = on_commit(async {
            after_commit(add(5));
            Err(())
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(ran.load(Ordering::SeqCst), 0, "rolled back: never run");
        let done: Result<(), ()> = on_commit(async {
            after_commit(add(2));
            tokio::task::yield_now().await;
            assert_eq!(ran.load(Ordering::SeqCst), 0, "not before the commit");
            Ok(())
        })
        .await;
        assert!(done.is_ok());
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        after_commit(add(1));
        assert_eq!(
            ran.load(Ordering::SeqCst),
            3,
            "outside on_commit it runs at once"
        );
    }

    #[test]
    fn unknown_event_types_share_one_label() {
        assert_eq!(
            event_type_label(Some("shop.events.v1.OrderCreated")),
            "shop.events.v1.OrderCreated"
        );
        assert_eq!(event_type_label(Some("evil.Type")), "unknown");
        assert_eq!(event_type_label(None), "unknown");
    }
}
