//! Conversions between database timestamps and protobuf `Timestamp`.

use chrono::{DateTime, Utc};
use shop_proto::Timestamp;

pub fn to_timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn now() -> Timestamp {
    to_timestamp(Utc::now())
}
