//! API contracts of the order pipeline, generated from `proto/` by `build.rs`.
//!
//! Every service depends on this one crate, so there is exactly one copy of
//! the generated code. Messages derive prost (binary, for gRPC and Kafka) and
//! pbjson serde (canonical proto3 JSON, for the REST shim).

/// Includes one proto package: its prost messages with tonic clients and
/// servers, and its pbjson serde impls.
macro_rules! include_generated {
    ($package:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $package, ".rs"));
        include!(concat!(env!("OUT_DIR"), "/", $package, ".serde.rs"));
    };
}

// Generated code follows proto naming and the generators' style, not our lint
// table; we do not edit it, so pedantic findings there are noise.
#[allow(clippy::pedantic)]
pub mod shop {
    pub mod common {
        pub mod v1 {
            include_generated!("shop.common.v1");
        }
    }
    pub mod order {
        pub mod v1 {
            include_generated!("shop.order.v1");
        }
    }
    pub mod payment {
        pub mod v1 {
            include_generated!("shop.payment.v1");
        }
    }
    pub mod inventory {
        pub mod v1 {
            include_generated!("shop.inventory.v1");
        }
    }
    pub mod events {
        pub mod v1 {
            include_generated!("shop.events.v1");
        }
    }
}

pub use shop::common::v1 as common;
pub use shop::events::v1 as events;
pub use shop::inventory::v1 as inventory;
pub use shop::order::v1 as order;
pub use shop::payment::v1 as payment;

/// Re-exported so services name one Timestamp type.
pub use pbjson_types::Timestamp;

/// Encoded `FileDescriptorSet` of every proto in the workspace, served by
/// gRPC server reflection so that grpcurl works without proto files.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shop_descriptor.bin"));

/// Fully qualified protobuf name of a message, used as the Kafka
/// `event-type` header.
pub trait EventName {
    const EVENT_TYPE: &'static str;
}

macro_rules! event_names {
    ($($ty:ident),* $(,)?) => {
        $(impl EventName for events::$ty {
            const EVENT_TYPE: &'static str = concat!("shop.events.v1.", stringify!($ty));
        })*
    };
}

event_names!(
    OrderCreated,
    OrderCancelled,
    OrderConfirmed,
    PaymentCompleted,
    PaymentRefunded,
    InventoryUpdated,
    InventoryReleased,
);
