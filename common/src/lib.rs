//! What every service of the order pipeline shares.
//!
//! The delivery rules of the system live here, written once, so that the
//! services plug in nothing but their domain:
//!
//! - [`outbox`]: the transactional outbox. A service writes its state change
//!   and the events it causes in one transaction ([`outbox::enqueue`]); the
//!   [`outbox::Relay`] publishes them in batches with an idempotent producer
//!   and marks them sent.
//! - [`consumer`]: the at-least-once consume loop. Poll a batch, decode by the
//!   `event-type` header, apply in one transaction that also records every
//!   `event_id` as processed, then store offsets. Transient failures retry
//!   with backoff; undecodable or permanently failing records go to
//!   `<topic>.dlq`.
//! - [`saga`]: the shape payment and inventory share as the two sides of
//!   the order saga (act on `OrderCreated`, undo on `OrderCancelled`, a
//!   marker when the cancellation comes first).
//! - [`service`]: the skeleton every service is built on (ports open at
//!   once, start-up, readiness); [`supervisor`]: its tasks, stopped in
//!   order, and a non-zero exit when one dies.
//! - [`health`]: `grpc.health.v1` status that follows the database and the
//!   broker; [`grpc`]: the server with health and reflection built in.
//! - [`broker_identity`]: each database records the Kafka cluster it
//!   belongs with; a service refuses to run against another one until an
//!   operator accepts it.
//! - [`telemetry`] and [`trace_context`]: logs, and one OpenTelemetry trace
//!   per order across requests, outbox rows and Kafka records.
//! - [`metrics`]: Prometheus metrics (`shop_*`, `process_*`) on `/metrics`.
//! - [`tls`]: TLS and mTLS on the gRPC and REST listeners from PEM files,
//!   the plaintext health listener for probes, and the client identity a
//!   certificate gives; [`kafka_security`]: the librdkafka `security.*`,
//!   `sasl.*` and `ssl.*` settings passed through from `KAFKA_*` variables.
//! - [`error`]: the invalid-argument type and the database-error policy
//!   every API maps to gRPC status.
//! - [`config`], [`telemetry`], [`shutdown`], [`db`], [`kafka`], [`retry`],
//!   [`rest`]: plumbing with documented defaults.

pub mod broker_identity;
pub mod catalog;
pub mod config;
pub mod consumer;
pub mod db;
pub mod error;
pub mod grpc;
pub mod health;
pub mod kafka;
pub mod kafka_security;
pub mod metrics;
pub mod outbox;
pub mod partitions;
pub mod rest;
pub mod retry;
pub mod saga;
pub mod service;
pub mod shutdown;
pub mod supervisor;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod topics;
pub mod trace_context;
