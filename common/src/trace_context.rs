//! W3C trace context (`traceparent`, `tracestate`) carried across every hop
//! of an order: HTTP/gRPC request headers, outbox rows, Kafka record
//! headers. One trace per order follows from it: the request's span is the
//! parent of the outbox write, the relay's publish continues the context
//! stored with the row, and each consumer's apply continues the context in
//! the record it reads.
//!
//! Everything goes through the global propagator that
//! [`crate::telemetry`] installs (W3C trace context).

use std::collections::HashMap;

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector},
    trace::TraceContextExt,
};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace context of the current span, as header values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Carrier(HashMap<String, String>);

impl Carrier {
    /// The context of `span`.
    #[must_use]
    pub fn of(span: &tracing::Span) -> Self {
        let mut carrier = Self::default();
        let cx = span.context();
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
        carrier
    }

    /// From stored values (an outbox row).
    #[must_use]
    pub fn from_parts(traceparent: Option<String>, tracestate: Option<String>) -> Self {
        let mut map = HashMap::new();
        if let Some(v) = traceparent {
            map.insert(TRACEPARENT.to_owned(), v);
        }
        if let Some(v) = tracestate {
            map.insert(TRACESTATE.to_owned(), v);
        }
        Self(map)
    }

    pub fn traceparent(&self) -> Option<&str> {
        self.0.get(TRACEPARENT).map(String::as_str)
    }

    pub fn tracestate(&self) -> Option<&str> {
        self.0.get(TRACESTATE).map(String::as_str)
    }

    /// The context these values describe (empty if none).
    #[must_use]
    pub fn context(&self) -> Context {
        opentelemetry::global::get_text_map_propagator(|p| p.extract(self))
    }

    /// Adds `traceparent` (and `tracestate`) to Kafka record headers.
    #[must_use]
    pub fn add_to(&self, mut headers: OwnedHeaders) -> OwnedHeaders {
        for key in [TRACEPARENT, TRACESTATE] {
            if let Some(value) = self.0.get(key) {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_str()),
                });
            }
        }
        headers
    }

    /// Reads `traceparent`/`tracestate` from Kafka record headers.
    pub fn from_kafka<H: Headers>(headers: &H) -> Self {
        let mut map = HashMap::new();
        for key in [TRACEPARENT, TRACESTATE] {
            if let Some(value) = crate::kafka::header_str(headers, key) {
                map.insert(key.to_owned(), value.to_owned());
            }
        }
        Self(map)
    }
}

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The W3C header names.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Reads the trace context of an incoming HTTP (or gRPC) request.
struct HttpHeaders<'a>(&'a http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Makes `span` continue the caller's trace (W3C headers of a request), if
/// the caller sent one, and records its trace id in the span's `trace_id`
/// field for the logs.
pub fn continue_from_http(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HttpHeaders(headers)));
    continue_from(span, parent);
}

/// Makes `span` a child of `parent` when `parent` holds a span context, and
/// records the trace id in the span's `trace_id` field.
pub fn continue_from(span: &tracing::Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    record_trace_id(span);
}

/// Fills the span's `trace_id` field (declared `Empty`), so that text and
/// JSON log lines inside it carry the trace id.
pub fn record_trace_id(span: &tracing::Span) {
    let cx = span.context();
    let span_context = cx.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}
