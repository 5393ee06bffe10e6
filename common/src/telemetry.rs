//! Logs and traces through `tracing`.
//!
//! - Logs: human-readable by default, JSON lines with `LOG_FORMAT=json`;
//!   filtered by `RUST_LOG`. A line inside a request or a consumed record
//!   carries that span's fields: `trace_id`, `order_id`, `customer_id`.
//! - Traces: OpenTelemetry spans from the same `tracing` spans, exported
//!   over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_TRACES_SAMPLER(_ARG)` are
//!   honoured. Without an endpoint spans are still given W3C ids (so the
//!   trace context travels across Kafka and log lines of one order share a
//!   trace id) but are sampled out: nothing is recorded or sent.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_subscriber::{
    EnvFilter, Layer, filter::filter_fn, fmt, layer::SubscriberExt, util::SubscriberInitExt,
};

/// Names of the spans that exist for traces only: the relay's one per
/// published event, the outbox writes, the saga's status updates. No log
/// line is written inside them, yet the log layer formats every span's
/// fields into a string when the span is created; [`logged`] keeps them
/// from it (they are a few per order, each with up to ten fields). Log lines
/// keep the spans around them (the request, the consumed record). The span
/// sites name their spans with these constants, so that a renamed span
/// cannot slip past the filter.
pub mod trace_only {
    pub const PUBLISH: &str = "publish";
    pub const OUTBOX_WRITE: &str = "outbox write";
    pub const ORDER_STATUS_UPDATE: &str = "order status update";
}

const TRACE_ONLY_SPANS: [&str; 3] = [
    trace_only::PUBLISH,
    trace_only::OUTBOX_WRITE,
    trace_only::ORDER_STATUS_UPDATE,
];

/// Whether the log layer sees `meta`: every event, and the spans that are
/// not [`TRACE_ONLY_SPANS`].
fn logged(meta: &tracing::Metadata<'_>) -> bool {
    !meta.is_span() || !TRACE_ONLY_SPANS.contains(&meta.name())
}

/// Owns the trace pipeline; [`Telemetry::shutdown`] flushes it.
#[must_use = "keep it until exit and call shutdown() to flush traces"]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Flushes and stops the trace exporter. It blocks, so it runs on a
    /// blocking thread: the batch exporter over tonic hangs if its shutdown
    /// runs on an async worker.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "trace exporter shutdown");
        }
    }
}

/// Whether the standard variables ask for trace export.
fn export_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// The tracer provider for `service`, and whether it exports: it does when
/// configured and the exporter could be built, otherwise it is id-only (see
/// module docs).
fn provider(service: &str) -> (SdkTracerProvider, bool) {
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_owned());
    }
    let builder = SdkTracerProvider::builder().with_resource(resource.build());
    if !export_configured() {
        return (builder.with_sampler(Sampler::AlwaysOff).build(), false);
    }
    match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        // The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based
        // always-on).
        Ok(exporter) => (builder.with_batch_exporter(exporter).build(), true),
        Err(e) => {
            eprintln!("trace export disabled: cannot build the OTLP exporter: {e}");
            (builder.with_sampler(Sampler::AlwaysOff).build(), false)
        }
    }
}

/// Installs logging and tracing for the service named `service` (its
/// `service.name` unless `OTEL_SERVICE_NAME` says otherwise). Call once, at
/// the start of `main`, inside the (multi-thread) Tokio runtime.
pub fn init(service: &str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let (provider, exported) = provider(service);
    let otel = otel_layer(provider.tracer("shop"), exported);
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let logs = if json {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        // Colours only for a terminal, not for log files.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        fmt::layer().with_ansi(ansi).boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(logs.with_filter(filter_fn(logged)))
        .with(otel)
        .try_init();
    if exported {
        tracing::info!("exporting traces over OTLP");
    }
    Telemetry { provider }
}

/// For tests: logs go through the test harness's capture, so they show
/// only for failing tests; spans get trace ids (nothing is exported).
/// `RUST_LOG` still filters.
pub fn init_for_tests() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOff)
        .build();
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(
            fmt::layer()
                .with_test_writer()
                .with_ansi(false)
                .with_filter(filter_fn(logged)),
        )
        .with(otel_layer(provider.tracer("test"), false))
        .try_init();
}

/// The layer that turns `tracing` spans into OpenTelemetry spans.
///
/// Without export, spans exist only for their ids (trace context across
/// Kafka, trace ids in log lines) and are sampled out when they start, yet
/// the layer's defaults still give every span source-location, thread and
/// target attributes (a `thread.name` string allocated per span) and time
/// every enter and exit for busy/idle attributes, all dropped unread. They
/// are kept only when spans are exported. Context activation is off: the
/// code takes a span's context from the span (`OpenTelemetrySpanExt`), never
/// from `opentelemetry::Context::current()`.
fn otel_layer<S>(
    tracer: opentelemetry_sdk::trace::SdkTracer,
    exported: bool,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_context_activation(false)
        .with_location(exported)
        .with_threads(exported)
        .with_target(exported)
        .with_tracked_inactivity(exported)
}

/// `RUST_LOG`, or info with the chattiest dependencies at warn.
fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn,h2=warn,tower=warn"))
}
