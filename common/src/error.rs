//! The error pieces every service's API shares, mapped to `tonic::Status`
//! once here: a request the service refuses ([`Invalid`]), and what a
//! database failure means for a caller ([`db_status`]). Each service's own
//! error enum wraps these and adds its domain cases; `common::rest` maps
//! the resulting status to HTTP.

use tonic::Status;

/// A request that cannot be served as sent; the message says why and is
/// safe to show to the client (`INVALID_ARGUMENT`, HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl From<Invalid> for Status {
    fn from(invalid: Invalid) -> Self {
        Status::invalid_argument(invalid.0)
    }
}

/// UNAVAILABLE (retry later) while the database cannot be reached,
/// INTERNAL otherwise; either way the details go to the log, not to the
/// client.
pub fn db_status(error: &sqlx::Error) -> Status {
    if crate::db::is_unavailable(error) {
        tracing::warn!(%error, "database unavailable");
        Status::unavailable("database unavailable; retry later")
    } else {
        tracing::error!(%error, "database error");
        Status::internal("internal error")
    }
}
