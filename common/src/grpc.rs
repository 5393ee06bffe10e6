//! The gRPC server every service runs: its own API plus `grpc.health.v1`
//! and server reflection (v1 and v1alpha, from the embedded descriptor set),
//! so that grpcurl and grpc-health-probe work without proto files.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

/// The server's router: every call goes through the metrics layer.
pub type Router =
    tonic::transport::server::Router<Stack<crate::metrics::GrpcMetricsLayer, Identity>>;

/// Builds a router with health and reflection for the service named
/// `service` (e.g. `shop.order.v1.OrderService`); add that service to it.
/// Reflection advertises only what this server serves, although the
/// descriptor set describes every API. [`crate::service::Service::serve_grpc`]
/// turns the reporter NOT_SERVING until [`crate::health::monitor`] has
/// checked the dependencies.
pub fn router(service: &str) -> (Router, HealthReporter) {
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
    let router = Server::builder()
        .layer(crate::metrics::GrpcMetricsLayer)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    (router, reporter)
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
    let incoming = TcpListenerStream::new(listener);
    router
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    tracing::info!("gRPC server stopped");
    Ok(())
}
