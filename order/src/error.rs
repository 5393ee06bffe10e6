//! The order service's errors, mapped once to `tonic::Status` (and from
//! there to HTTP by `common::rest`). Internal details are logged, never sent.

use tonic::Status;

use crate::domain::{Invalid, PricingError};

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
    /// Start-up has not finished (database or broker not reached yet, or
    /// refused): the readiness's answer.
    #[error("{}", .0.message())]
    Unavailable(Status),
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
        }
    }
}
