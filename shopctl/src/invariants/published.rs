//! What the three pipeline topics hold, read once for every check that
//! needs it: the distinct event ids, which service acts on each, and, per
//! order, which events about it were published (decoded from the payload,
//! since the key is the customer and the headers name no order).

use std::collections::{HashMap, HashSet};

use rdkafka::Message;
use shop_proto::{EventName, events};
use uuid::Uuid;

use common::{config::KafkaConfig, kafka, topics};

/// An event about one order, as far as the checker tells them apart: the
/// result events are split by outcome, because a payment's state implies
/// an approval or a decline, not just "some result".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fact {
    OrderCreated,
    OrderConfirmed,
    OrderCancelled,
    PaymentApproved,
    PaymentDeclined,
    PaymentRefunded,
    StockReserved,
    StockRejected,
    StockReleased,
}

impl Fact {
    /// How the event is named in violations.
    pub fn describe(self) -> &'static str {
        match self {
            Self::OrderCreated => "OrderCreated",
            Self::OrderConfirmed => "OrderConfirmed",
            Self::OrderCancelled => "OrderCancelled",
            Self::PaymentApproved => "PaymentCompleted (approved)",
            Self::PaymentDeclined => "PaymentCompleted (declined)",
            Self::PaymentRefunded => "PaymentRefunded",
            Self::StockReserved => "InventoryUpdated (reserved)",
            Self::StockRejected => "InventoryUpdated (rejected)",
            Self::StockReleased => "InventoryReleased",
        }
    }

    /// The pipeline topic (without prefix) the event is published on.
    pub fn topic(self) -> &'static str {
        match self {
            Self::OrderCreated | Self::OrderConfirmed | Self::OrderCancelled => topics::ORDERS,
            Self::PaymentApproved | Self::PaymentDeclined | Self::PaymentRefunded => {
                topics::PAYMENTS
            }
            Self::StockReserved | Self::StockRejected | Self::StockReleased => topics::INVENTORY,
        }
    }
}

/// What the topics hold.
#[derive(Debug, Default)]
pub struct Published {
    /// Records with a valid `event-type` and `event-id`, and how many of
    /// them repeated an event id already seen (outbox republished).
    pub records: usize,
    pub duplicates: usize,
    /// Distinct event ids on the three topics.
    pub event_ids: HashSet<Uuid>,
    /// Distinct events per service that acts on them (by `event-type`).
    pub acted: HashMap<&'static str, HashSet<Uuid>>,
    /// How many distinct events state each fact about each order.
    pub facts: HashMap<(Uuid, Fact), usize>,
}

impl Published {
    /// Reads the three topics from the beginning to their current end.
    /// Blocking (librdkafka polls): call it off the async runtime.
    pub fn read(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        let mut published = Self::default();
        for name in topics::ALL {
            for m in crate::topic::read_all(cfg, &cfg.topic(name))? {
                published.add(&m);
            }
        }
        Ok(published)
    }

    fn add(&mut self, m: &impl Message) {
        let h = |k| m.headers().and_then(|hs| kafka::header_str(hs, k));
        let (Some(event_type), Some(event_id)) = (
            h(kafka::header::EVENT_TYPE),
            h(kafka::header::EVENT_ID).and_then(|id| Uuid::parse_str(id).ok()),
        ) else {
            return; // garbage injected on purpose: consumers dead-letter it
        };
        self.records += 1;
        if !self.event_ids.insert(event_id) {
            self.duplicates += 1;
            return;
        }
        for service in acting_services(event_type) {
            self.acted.entry(service).or_default().insert(event_id);
        }
        if let Some((fact, order_id)) = fact_of(event_type, m.payload().unwrap_or_default()) {
            *self.facts.entry((order_id, fact)).or_default() += 1;
        }
    }

    /// How many distinct events state `fact` about `order_id`.
    pub fn count(&self, order_id: Uuid, fact: Fact) -> usize {
        self.facts.get(&(order_id, fact)).copied().unwrap_or(0)
    }
}

/// The services whose consumers apply an event of this type.
fn acting_services(event_type: &str) -> &'static [&'static str] {
    match event_type {
        events::OrderCreated::EVENT_TYPE | events::OrderCancelled::EVENT_TYPE => {
            &["payment", "inventory"]
        }
        events::PaymentCompleted::EVENT_TYPE
        | events::PaymentRefunded::EVENT_TYPE
        | events::InventoryUpdated::EVENT_TYPE
        | events::InventoryReleased::EVENT_TYPE => &["order"],
        _ => &[],
    }
}

/// The fact a record states and the order it is about; None for a payload
/// that does not decode, an unknown type or outcome, or a bad order id
/// (records the consumers dead-letter or skip).
fn fact_of(event_type: &str, payload: &[u8]) -> Option<(Fact, Uuid)> {
    fn decode<M: prost::Message + Default>(payload: &[u8]) -> Option<M> {
        M::decode(payload).ok()
    }
    let (fact, order_id) = match event_type {
        events::OrderCreated::EVENT_TYPE => (
            Fact::OrderCreated,
            decode::<events::OrderCreated>(payload)?.order_id,
        ),
        events::OrderConfirmed::EVENT_TYPE => (
            Fact::OrderConfirmed,
            decode::<events::OrderConfirmed>(payload)?.order_id,
        ),
        events::OrderCancelled::EVENT_TYPE => (
            Fact::OrderCancelled,
            decode::<events::OrderCancelled>(payload)?.order_id,
        ),
        events::PaymentCompleted::EVENT_TYPE => {
            let e = decode::<events::PaymentCompleted>(payload)?;
            let fact = match events::PaymentOutcome::try_from(e.outcome).ok()? {
                events::PaymentOutcome::Approved => Fact::PaymentApproved,
                events::PaymentOutcome::Declined => Fact::PaymentDeclined,
                events::PaymentOutcome::Unspecified => return None,
            };
            (fact, e.order_id)
        }
        events::PaymentRefunded::EVENT_TYPE => (
            Fact::PaymentRefunded,
            decode::<events::PaymentRefunded>(payload)?.order_id,
        ),
        events::InventoryUpdated::EVENT_TYPE => {
            let e = decode::<events::InventoryUpdated>(payload)?;
            let fact = match events::InventoryOutcome::try_from(e.outcome).ok()? {
                events::InventoryOutcome::Reserved => Fact::StockReserved,
                events::InventoryOutcome::Rejected => Fact::StockRejected,
                events::InventoryOutcome::Unspecified => return None,
            };
            (fact, e.order_id)
        }
        events::InventoryReleased::EVENT_TYPE => (
            Fact::StockReleased,
            decode::<events::InventoryReleased>(payload)?.order_id,
        ),
        _ => return None,
    };
    Some((fact, Uuid::parse_str(&order_id).ok()?))
}
