//! Kafka topic names. They keep the original system's names; a deployment
//! may prefix them (`KAFKA_TOPIC_PREFIX`) so that tests or tenants share a
//! broker without seeing each other's records.

/// `OrderCreated`, `OrderCancelled`, `OrderConfirmed`; produced by order.
pub const ORDERS: &str = "orders";
/// `PaymentCompleted`, `PaymentRefunded`; produced by payment.
pub const PAYMENTS: &str = "payments";
/// `InventoryUpdated`, `InventoryReleased`; produced by inventory.
pub const INVENTORY: &str = "inventory";

/// All topics of the pipeline, without prefix.
pub const ALL: [&str; 3] = [ORDERS, PAYMENTS, INVENTORY];

/// The dead-letter topic of `topic`.
#[must_use]
pub fn dlq(topic: &str) -> String {
    format!("{topic}.dlq")
}
