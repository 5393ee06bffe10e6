//! What payment and inventory share as the two sides of the order saga:
//! the events they act on from the `orders` topic, and the reasons they
//! store when an order's cancellation overtakes its creation. The invariant
//! checker reads the same constants, so the strings are defined only here.

use crate::consumer::{DecodeError, decode_as};

/// Reason on the DECLINED payment row written when an order's
/// `OrderCancelled` arrives before its `OrderCreated`: the late creation
/// finds the row and charges nothing.
pub const CANCELLED_BEFORE_PAYMENT: &str = "order cancelled before payment";

/// Reason on the REJECTED reservation written in the same case: the late
/// creation reserves nothing.
pub const CANCELLED_BEFORE_RESERVATION: &str = "order cancelled before reservation";

/// What the `orders` topic carries for the services that act on orders
/// (payment and inventory): a new order, or its cancellation.
/// `OrderConfirmed` needs nothing from them.
#[derive(Clone, Debug)]
pub enum OrderEvent {
    Created(shop_proto::events::OrderCreated),
    Cancelled(shop_proto::events::OrderCancelled),
}

impl OrderEvent {
    /// [`crate::consumer::EventHandler::decode`] for the `orders` topic.
    pub fn decode(event_type: &str, payload: &[u8]) -> Result<Option<Self>, DecodeError> {
        use shop_proto::{EventName, events};
        Ok(Some(match event_type {
            events::OrderCreated::EVENT_TYPE => Self::Created(decode_as(event_type, payload)?),
            events::OrderCancelled::EVENT_TYPE => Self::Cancelled(decode_as(event_type, payload)?),
            events::OrderConfirmed::EVENT_TYPE => return Ok(None),
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        }))
    }
}
