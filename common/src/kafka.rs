//! Kafka clients configured the way the delivery rules need them, the
//! record headers every event carries, and topic creation.

use std::time::Duration;

use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    error::RDKafkaErrorCode,
    message::{Header, Headers, OwnedHeaders},
    producer::FutureProducer,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{config::KafkaConfig, retry::Backoff};

/// Header names of the event contract (see README.md, "Contracts").
pub mod header {
    pub const EVENT_TYPE: &str = "event-type";
    pub const EVENT_ID: &str = "event-id";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const PROTOBUF: &str = "application/x-protobuf";
    pub const DLQ_SOURCE_TOPIC: &str = "dlq-source-topic";
    pub const DLQ_SOURCE_PARTITION: &str = "dlq-source-partition";
    pub const DLQ_SOURCE_OFFSET: &str = "dlq-source-offset";
    pub const DLQ_ERROR: &str = "dlq-error";
    pub const DLQ_ATTEMPTS: &str = "dlq-attempts";
    pub const DLQ_CONSUMER_GROUP: &str = "dlq-consumer-group";
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error(transparent)]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("shut down while waiting for the broker")]
    Cancelled,
}

/// Settings shared by every client of this service, the passed-through
/// security settings included.
#[must_use]
pub fn base_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", &cfg.client_id)
        // Loopback brokers: resolve "localhost" to IPv4 first.
        .set("broker.address.family", "v4")
        // Reconnect within a second of a broker coming back (default: up to 10 s).
        .set("reconnect.backoff.max.ms", "1000");
    // SSL/SASL towards the broker, when configured (KAFKA_SECURITY_PROTOCOL, …).
    cfg.security.apply(&mut c);
    if !cfg.debug.is_empty() {
        c.set("debug", &cfg.debug);
    }
    c
}

/// Destroys a librdkafka client (a consumer or producer being replaced) on a
/// detached thread of its own, named `thread_name`. Its destroy waits for
/// the client's broker threads and, for a consumer, for its group to let it
/// leave, which can take forever when the group is stuck. Tokio's blocking
/// pool would make the whole service wait for it at exit (CI saw inventory
/// ignore SIGTERM so); a detached thread dies with the process.
pub fn close_detached<C: Send + 'static>(client: C, thread_name: &str) {
    let closing = std::thread::Builder::new()
        .name(thread_name.to_owned())
        .spawn(move || drop(client));
    if let Err(e) = closing {
        tracing::warn!(error = %e, thread = thread_name, "no thread to close a Kafka client on");
    }
}

/// An idempotent producer: `acks=all` and `enable.idempotence` so that
/// librdkafka's own retries never duplicate or reorder records of a
/// partition. A small linger batches the outbox relay's rounds.
///
/// No compression: events are small Protobuf records, and the broker
/// decompresses every compressed batch to validate it and assign offsets
/// (`LogValidator`'s compressed path iterates each record), while an
/// uncompressed batch is validated as a whole. At a fixed 1,000 orders/s
/// lz4 cost the broker about a quarter of its CPU (BENCHMARKS.md).
pub fn producer(cfg: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    Ok(base_config(cfg)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "none")
        // A batch not acknowledged within 15 s fails the relay's round, and the
        // next round sends the rows again (consumers drop the duplicates). A
        // produce request waits at most the socket timeout for its answer:
        // after a broker restart the fault suite saw one sent as the broker went
        // down wait out librdkafka's default 60 s, with the pipeline standing
        // still for that minute although the broker was back.
        .set("message.timeout.ms", "15000")
        .set("socket.timeout.ms", "10000")
        .create()?)
}

/// The headers of an event record: type, id and content type.
#[must_use]
pub fn event_headers(event_type: &str, event_id: &Uuid) -> OwnedHeaders {
    let id = event_id.to_string();
    OwnedHeaders::new()
        .insert(Header {
            key: header::EVENT_TYPE,
            value: Some(event_type),
        })
        .insert(Header {
            key: header::EVENT_ID,
            value: Some(id.as_str()),
        })
        .insert(Header {
            key: header::CONTENT_TYPE,
            value: Some(header::PROTOBUF),
        })
}

/// The first value of header `key`, if it is valid UTF-8.
pub fn header_str<'a, H: Headers>(headers: &'a H, key: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Creates the pipeline's topics and their dead-letter topics if missing,
/// waiting (with backoff) for the broker to be reachable.
pub async fn ensure_topics(
    cfg: &KafkaConfig,
    names: &[&str],
    shutdown: &CancellationToken,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base_config(cfg).create()?;
    let full: Vec<String> = names
        .iter()
        .flat_map(|n| [cfg.topic(n), crate::topics::dlq(&cfg.topic(n))])
        .collect();
    let topics: Vec<NewTopic> = full
        .iter()
        .map(|n| NewTopic::new(n, cfg.partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let Some(outcome) = shutdown
            .run_until_cancelled(admin.create_topics(&topics, &options))
            .await
        else {
            return Err(KafkaError::Cancelled);
        };
        let retry = match outcome {
            Ok(results) => {
                let mut retry = false;
                for result in results {
                    match result {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((topic, code)) => {
                            tracing::warn!(%topic, ?code, "could not create topic; retrying");
                            retry = true;
                        }
                    }
                }
                retry
            }
            Err(e) => {
                tracing::warn!(error = %e, "broker unreachable; retrying topic creation");
                true
            }
        };
        if !retry {
            return Ok(());
        }
        if shutdown
            .run_until_cancelled(tokio::time::sleep(backoff.next_delay()))
            .await
            .is_none()
        {
            return Err(KafkaError::Cancelled);
        }
    }
}
