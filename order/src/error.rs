//! The order service's errors, mapped once to `tonic::Status` (and from
//! there to HTTP by `common::rest`). Internal details are logged, never sent.

use std::time::Duration;

use tonic::{Status, metadata::MetadataValue};

use crate::{
    domain::{Invalid, PricingError},
    intake::retry_after_secs,
};

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Pricing(#[from] PricingError),
    #[error("order {0} not found")]
    NotFound(String),
    #[error("idempotency key {0:?} was already used for a different request")]
    IdempotencyConflict(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The group-commit transaction that carried this request failed; the
    /// writer logged the cause once for the whole group (see
    /// [`crate::group_commit`]). `unavailable`: the database could not be
    /// reached within the caller's wait, so a retry may succeed.
    #[error("the order could not be written (database unavailable: {unavailable})")]
    WriteFailed { unavailable: bool },
    /// Start-up has not finished (database or broker not reached yet, or
    /// refused): the readiness's answer.
    #[error("{}", .0.message())]
    Unavailable(Status),
    /// The client's `CreateOrder` rate is spent (see [`crate::intake`]).
    #[error("rate limit exceeded for this client; retry after {}s", retry_after_secs(*.retry_after))]
    RateLimited { retry_after: Duration },
    /// The service already serves `INTAKE_MAX_IN_FLIGHT` `CreateOrder` calls.
    #[error("too many orders in flight; retry after {}s", retry_after_secs(*.retry_after))]
    TooManyInFlight { retry_after: Duration },
    /// No group-commit writer took the request within
    /// `INTAKE_QUEUE_TIMEOUT_MS`, or `INTAKE_QUEUE_MAX` requests were
    /// already waiting: shed rather than queued.
    #[error("overloaded: no order writer free; retry after {}s", retry_after_secs(*.retry_after))]
    Overloaded { retry_after: Duration },
    /// `INTAKE_MAX_PENDING` orders already wait for payment and stock: shed
    /// until they are decided (see [`crate::backlog`]).
    #[error("overloaded: {pending} orders are waiting to be decided; retry after {}s", retry_after_secs(*.retry_after))]
    Backlogged { pending: u64, retry_after: Duration },
}

impl From<OrderError> for Status {
    fn from(e: OrderError) -> Self {
        match e {
            OrderError::Invalid(i) => i.into(),
            OrderError::Pricing(PricingError::UnknownProduct(p)) => {
                Status::not_found(format!("unknown product {p}"))
            }
            OrderError::Pricing(p) => Status::invalid_argument(p.to_string()),
            OrderError::NotFound(_) => Status::not_found(e.to_string()),
            OrderError::IdempotencyConflict(_) => Status::already_exists(e.to_string()),
            OrderError::Unavailable(status) => status,
            OrderError::Db(db) => common::error::db_status(&db),
            // The same answers as db_status gives, whose log line the writer wrote.
            OrderError::WriteFailed { unavailable: true } => {
                Status::unavailable("database unavailable; retry later")
            }
            OrderError::WriteFailed { unavailable: false } => Status::internal("internal error"),
            OrderError::RateLimited { retry_after }
            | OrderError::TooManyInFlight { retry_after } => {
                with_retry_after(Status::resource_exhausted(e.to_string()), retry_after)
            }
            OrderError::Overloaded { retry_after } | OrderError::Backlogged { retry_after, .. } => {
                with_retry_after(Status::unavailable(e.to_string()), retry_after)
            }
        }
    }
}

/// `retry-after` (whole seconds) in the status's metadata: a gRPC client
/// reads it there, and `common::rest` turns it into the HTTP header.
fn with_retry_after(mut status: Status, wait: Duration) -> Status {
    status.metadata_mut().insert(
        common::rest::RETRY_AFTER,
        MetadataValue::from(retry_after_secs(wait)),
    );
    status
}
