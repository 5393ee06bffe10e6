//! The gRPC server every service runs: its own API plus `grpc.health.v1`
//! and server reflection (v1 and v1alpha, from the embedded descriptor set),
//! so that grpcurl and grpc-health-probe work without proto files.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::tls::ServerTls;

/// Most calls one HTTP/2 connection may have open at once (its
/// `SETTINGS_MAX_CONCURRENT_STREAMS`); a client past it waits for a stream
/// on its side. tonic leaves it unset, which also drops hyper's own bound
/// (200), so one connection could hold any number of calls in the server:
/// at 5,000 orders/s offered order held about 800 in flight and, under a
/// heap profiler, 3,200, whose HTTP/2 stream state and header maps were
/// 30 MB of its 52 MB heap (BENCHMARKS.md). 100 is the lowest value
/// RFC 9113 (section 6.5.2) recommends and the default of nghttp2 and
/// Kestrel; at the 5 ms a `CreateOrder` takes at 1,000/s, one connection
/// still carries 20,000 calls a second.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// The server's router: every call goes through the metrics layer.
pub type Router =
    tonic::transport::server::Router<Stack<crate::metrics::GrpcMetricsLayer, Identity>>;

/// Builds a router with health and reflection for the service named
/// `service` (e.g. `shop.order.v1.OrderService`); add that service to it.
/// Reflection advertises only what this server serves, although the
/// descriptor set describes every API. [`crate::service::Service::serve_grpc`]
/// turns the reporter `NOT_SERVING` until [`crate::health::monitor`] has
/// checked the dependencies. With `tls`, the server speaks only TLS (mTLS
/// when it has client CAs), and calls carry the client's certificates
/// (`Request::peer_certs`).
pub fn router(
    service: &str,
    tls: Option<&ServerTls>,
) -> Result<(Router, HealthReporter), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let advertised = [
        service,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let reflection = || {
        advertised.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(shop_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // Clients such as k6 resolve every advertised service,
                // reflection itself included.
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                ),
            |builder, name| builder.with_service_name(*name),
        )
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("embedded descriptor set is valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("embedded descriptor set is valid");
    let server = match tls {
        Some(tls) => Server::builder().tls_config(tls.grpc())?,
        None => Server::builder(),
    };
    let router = server
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .trace_fn(request_span)
        .layer(crate::metrics::GrpcMetricsLayer)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((router, reporter))
}

/// A plaintext server with nothing but `grpc.health.v1`, answering what
/// `reporter` says: for Kubernetes' gRPC probes, which cannot speak TLS,
/// when the service's own port does (see [`crate::tls`]). It offers no
/// reflection and no API, so it tells a caller nothing but up or down.
#[must_use]
pub fn health_router(reporter: &HealthReporter) -> tonic::transport::server::Router {
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
    );
    Server::builder().add_service(health)
}

/// Binds `addr` (port 0 picks a free port); returns the listener and the
/// address it really got.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves until `shutdown`, then stops accepting and lets in-flight calls
/// finish.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    // Small unary replies go out at once instead of waiting for Nagle.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    router
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    tracing::info!("gRPC server stopped");
    Ok(())
}

/// [`serve`] for the [`health_router`].
pub async fn serve_health(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    router
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    tracing::info!("health server stopped");
    Ok(())
}

/// The span of one gRPC call: it continues the caller's trace (W3C
/// `traceparent` in the metadata) and carries the fields log lines inside
/// it show. Health checks and reflection get none: probes every few
/// seconds would drown the traces.
fn request_span(request: &http::Request<()>) -> tracing::Span {
    let method = request.uri().path().trim_start_matches('/');
    if method.starts_with("grpc.") {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "grpc request",
        otel.name = method,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = method,
        trace_id = tracing::field::Empty,
        order_id = tracing::field::Empty,
        customer_id = tracing::field::Empty,
    );
    crate::trace_context::continue_from_http(&span, request.headers());
    span
}

/// A REST request's span, like [`request_span`], named after the route
/// template.
fn http_request_span(request: &http::Request<axum::body::Body>) -> tracing::Span {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", axum::extract::MatchedPath::as_str);
    let span = tracing::info_span!(
        "http request",
        otel.name = %format_args!("{} {route}", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = route,
        trace_id = tracing::field::Empty,
        order_id = tracing::field::Empty,
        customer_id = tracing::field::Empty,
    );
    crate::trace_context::continue_from_http(&span, request.headers());
    span
}

/// The tower layer that gives every REST request its span (no log lines of
/// its own: the handlers log what matters).
pub type HttpTraceLayer = tower_http::trace::TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    MakeHttpSpan,
    (),
    (),
    (),
    (),
    (),
>;

type MakeHttpSpan = fn(&http::Request<axum::body::Body>) -> tracing::Span;

/// See [`HttpTraceLayer`].
#[must_use]
pub fn http_trace_layer() -> HttpTraceLayer {
    tower_http::trace::TraceLayer::new_for_http()
        .make_span_with(http_request_span as MakeHttpSpan)
        .on_request(())
        .on_response(())
        .on_body_chunk(())
        .on_eos(())
        .on_failure(())
}
