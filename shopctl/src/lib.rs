//! Operator tooling for the pipeline, usable as a library (the fault suite
//! runs the invariant checker in-process) and as the `shopctl` binary.
//!
//! - [`broker`]: which Kafka cluster each database belongs with; accept a
//!   new one.
//! - [`dlq`]: list and replay dead letters.
//! - [`invariants`]: check that nothing was lost or done twice.
//! - [`topic`]: read a topic from the beginning to its current end.

pub mod broker;
pub mod dlq;
pub mod invariants;
pub mod topic;
