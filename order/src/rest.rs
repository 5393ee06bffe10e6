//! The REST/JSON shim: the original system's routes, canonical proto3 JSON
//! (pbjson; `snake_case` and lowerCamelCase both accepted), and errors as
//! `{code, message, details}` with grpc-gateway's status mapping.
//! `WatchOrder` is served as Server-Sent Events, and the `OpenAPI` (v2)
//! description of these routes, generated from the proto's `google.api.http`
//! annotations (`clients/generate.sh`), at `GET /openapi.json`.

use std::convert::Infallible;

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{
        ConnectInfo, DefaultBodyLimit, Path, State,
        rejection::{BytesRejection, PathRejection},
    },
    http::{HeaderMap, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use common::{rest::ApiError, tls::Peer};
use futures::StreamExt;
use shop_proto::order::CreateOrderRequest;

use crate::{api::OrderApi, intake};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The `OpenAPI` v2 description of this shim, as committed.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

pub fn router(api: OrderApi) -> Router {
    Router::new()
        .route("/api/v1/orders", post(create_order))
        .route("/api/v1/orders/{order_id}", get(get_order))
        .route("/api/v1/orders/{order_id}/events", get(watch_order))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError(tonic::Status::not_found("no such route")) })
        .method_not_allowed_fallback(|| async {
            let mut response = ApiError(tonic::Status::unimplemented(
                "method not allowed on this route",
            ))
            .into_response();
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            response
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

async fn create_order(
    State(api): State<OrderApi>,
    peer: Option<Extension<ConnectInfo<Peer>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::invalid_argument(format!(
                "request body is larger than {MAX_BODY_BYTES} bytes"
            ))
        }
        other => ApiError::invalid_argument(other.body_text()),
    })?;
    let mut request: CreateOrderRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid_argument(format!("invalid JSON body: {e}")))?;
    if let Some(key) = headers.get("idempotency-key") {
        request.idempotency_key = key
            .to_str()
            .map_err(|_| ApiError::invalid_argument("Idempotency-Key must be visible ASCII"))?
            .to_owned();
    }
    let peer = peer.map(|Extension(ConnectInfo(peer))| peer);
    let client = intake::client_key(
        peer.as_ref().and_then(|p| p.identity.as_deref()),
        headers
            .get(intake::CLIENT_ID_HEADER)
            .and_then(|v| v.to_str().ok()),
        peer.as_ref().map(|p| p.addr.ip()),
    );
    let order = api
        .create(&request, &client)
        .await
        .map_err(tonic::Status::from)?;
    let location = format!("/api/v1/orders/{}", order.order_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(order),
    )
        .into_response())
}

async fn get_order(
    State(api): State<OrderApi>,
    order_id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let order_id = path(order_id)?;
    let order = api.get(&order_id).await.map_err(tonic::Status::from)?;
    Ok(Json(order).into_response())
}

/// `WatchOrder` as Server-Sent Events: one event per state, its `data` the
/// order in proto3 JSON; the response ends after the final state. An error
/// before the first state is a plain JSON error response; one after it (the
/// service shutting down, the database failing) is a last event named
/// `error` whose data is `{code, message, details}`. A comment line every
/// 15 s keeps idle proxies from closing the connection.
async fn watch_order(
    State(api): State<OrderApi>,
    order_id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let order_id = path(order_id)?;
    let states = api.watch(&order_id).await.map_err(tonic::Status::from)?;
    let events = states.map(|state| {
        Ok::<_, Infallible>(match state {
            Ok(order) => Event::default().json_data(order).unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot encode an order as JSON");
                error_event(&tonic::Status::internal("cannot encode the order"))
            }),
            Err(e) => error_event(&tonic::Status::from(e)),
        })
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The path's order id; a path axum cannot decode (bad percent-encoding,
/// not UTF-8) is a JSON 400 like any bad input, not axum's plain text.
fn path(order_id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    order_id
        .map(|Path(id)| id)
        .map_err(|e| ApiError::invalid_argument(e.body_text()))
}

fn error_event(status: &tonic::Status) -> Event {
    let body = serde_json::json!({
        "code": status.code() as i32,
        "message": status.message(),
        "details": [],
    });
    Event::default().event("error").data(body.to_string())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}
