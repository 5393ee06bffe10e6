//! Conversions between database timestamps and protobuf `Timestamp`.

use chrono::{DateTime, Utc};
use shop_proto::Timestamp;

#[must_use]
pub fn to_timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        // Below 2 * 10^9 even in a leap second, so it always fits.
        nanos: i32::try_from(t.timestamp_subsec_nanos()).expect("sub-second nanos fit in i32"),
    }
}

#[must_use]
pub fn now() -> Timestamp {
    to_timestamp(Utc::now())
}
