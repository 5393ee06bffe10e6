//! The inventory API's errors, mapped once to `tonic::Status`. Internal
//! details are logged, never sent.

use tonic::Status;

use crate::domain::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("unknown product {0}")]
    NotFound(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<InventoryError> for Status {
    fn from(e: InventoryError) -> Self {
        match e {
            InventoryError::Invalid(i) => i.into(),
            InventoryError::NotFound(_) => Status::not_found(e.to_string()),
            InventoryError::Db(db) => common::error::db_status(&db),
        }
    }
}
