//! The payment service's errors, mapped once to `tonic::Status`. Internal
//! details are logged, never sent.

use tonic::Status;

use crate::domain::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("no payment for order {0}")]
    NotFound(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<PaymentError> for Status {
    fn from(e: PaymentError) -> Self {
        match e {
            PaymentError::Invalid(i) => Status::invalid_argument(i.0),
            PaymentError::NotFound(_) => Status::not_found(e.to_string()),
            PaymentError::Db(db) if common::db::is_unavailable(&db) => {
                tracing::warn!(error = %db, "database unavailable");
                Status::unavailable("database unavailable; retry later")
            }
            PaymentError::Db(db) => {
                tracing::error!(error = %db, "database error");
                Status::internal("internal error")
            }
        }
    }
}
