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
            PaymentError::Invalid(i) => i.into(),
            PaymentError::NotFound(_) => Status::not_found(e.to_string()),
            PaymentError::Db(db) => common::error::db_status(&db),
        }
    }
}
