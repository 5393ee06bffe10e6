//! gRPC status → HTTP, the way grpc-gateway maps it, with the JSON error
//! body `{code, message, details}`. Services map their errors to
//! `tonic::Status` once; the REST shim reuses that mapping through here.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use tonic::Code;

/// grpc-gateway's `HTTPStatusFromCode`.
#[must_use]
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("valid status"),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The metadata key of a status that asks the caller to wait (whole
/// seconds); the HTTP response carries it as the `Retry-After` header.
pub const RETRY_AFTER: &str = "retry-after";

/// A gRPC status rendered as an HTTP response.
#[derive(Debug)]
pub struct ApiError(pub tonic::Status);

impl ApiError {
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self(tonic::Status::invalid_argument(message))
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        Self(status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": self.0.code() as i32,
            "message": self.0.message(),
            "details": [],
        });
        let mut response = (http_status(self.0.code()), Json(body)).into_response();
        if let Some(wait) = self
            .0
            .metadata()
            .get(RETRY_AFTER)
            .and_then(|v| HeaderValue::from_bytes(v.as_encoded_bytes()).ok())
        {
            response.headers_mut().insert(header::RETRY_AFTER, wait);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_metadata_becomes_the_header() {
        let mut status = tonic::Status::resource_exhausted("slow down");
        status
            .metadata_mut()
            .insert(RETRY_AFTER, tonic::metadata::MetadataValue::from(3u64));
        let response = ApiError(status).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        let plain = ApiError(tonic::Status::not_found("x")).into_response();
        assert!(plain.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn maps_like_grpc_gateway() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::AlreadyExists), StatusCode::CONFLICT);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            http_status(Code::Internal),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
