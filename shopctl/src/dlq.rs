//! Dead letters: list what is in `<topic>.dlq`, and replay records back to
//! their source topic once the cause is fixed.
//!
//! Replay is tracked by a consumer group (`shopctl-dlq-replay` by default):
//! each run republishes only the dead letters after the group's committed
//! offset, so running it twice sends nothing twice. Consumers drop a replayed
//! event that had been applied after all, by its `event-id`.

use std::time::Duration;

use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
    message::{Header, Headers, OwnedHeaders, OwnedMessage},
    metadata::MetadataPartition,
    producer::{FutureProducer, FutureRecord},
};
use serde::Serialize;

use common::{
    config::KafkaConfig,
    kafka::{self, header},
    topics,
};

/// One dead letter, as `dlq list` shows it.
#[derive(Debug, Serialize)]
pub struct DeadLetter {
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    pub key: Option<String>,
    pub event_type: Option<String>,
    pub event_id: Option<String>,
    pub source_topic: Option<String>,
    pub source_partition: Option<String>,
    pub source_offset: Option<String>,
    pub consumer_group: Option<String>,
    pub attempts: Option<String>,
    pub error: Option<String>,
    pub payload_bytes: usize,
}

impl DeadLetter {
    pub fn from_record(m: &OwnedMessage) -> Self {
        let h = |key: &str| {
            m.headers()
                .and_then(|hs| kafka::header_str(hs, key))
                .map(str::to_owned)
        };
        Self {
            dlq_partition: m.partition(),
            dlq_offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            event_type: h(header::EVENT_TYPE),
            event_id: h(header::EVENT_ID),
            source_topic: h(header::DLQ_SOURCE_TOPIC),
            source_partition: h(header::DLQ_SOURCE_PARTITION),
            source_offset: h(header::DLQ_SOURCE_OFFSET),
            consumer_group: h(header::DLQ_CONSUMER_GROUP),
            attempts: h(header::DLQ_ATTEMPTS),
            error: h(header::DLQ_ERROR),
            payload_bytes: m.payload().map_or(0, <[u8]>::len),
        }
    }
}

/// Every dead letter of `topic` (a pipeline topic name, without prefix).
pub fn list(cfg: &KafkaConfig, topic: &str) -> anyhow::Result<Vec<DeadLetter>> {
    let dlq = topics::dlq(&cfg.topic(topic));
    Ok(crate::topic::read_all(cfg, &dlq)?
        .iter()
        .map(DeadLetter::from_record)
        .collect())
}

/// Republishes the dead letters of `topic` not yet replayed by `group` to
/// their source topic, without the `dlq-*` headers, committing the group's
/// position after each. Every consumer group of the source topic sees the
/// replayed record again; those that had applied it drop it by event id.
/// Returns how many were replayed.
pub async fn replay(cfg: &KafkaConfig, topic: &str, group: &str) -> anyhow::Result<usize> {
    let source = cfg.topic(topic);
    let dlq = topics::dlq(&source);
    let end_of = |c: &BaseConsumer, p| c.fetch_watermarks(&dlq, p, Duration::from_secs(10));
    let consumer: BaseConsumer = kafka::base_config(cfg)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&dlq), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == dlq && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(MetadataPartition::id))
        .collect();
    let producer: FutureProducer = kafka::producer(cfg)?;
    let mut replayed = 0;
    for partition in partitions {
        let (_, high) = end_of(&consumer, partition)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&dlq, partition);
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
        let start = match committed.elements()[0].offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        if start >= high {
            continue;
        }
        let mut assign = TopicPartitionList::new();
        assign.add_partition_offset(&dlq, partition, Offset::Offset(start))?;
        consumer.assign(&assign)?;
        let mut next = start;
        while next < high {
            let Some(message) = consumer.poll(Duration::from_secs(5)) else {
                anyhow::bail!("{dlq}/{partition}: no record at offset {next} within 5 s");
            };
            let message = message?.detach();
            let mut headers = OwnedHeaders::new();
            if let Some(hs) = message.headers() {
                for h in hs.iter().filter(|h| !h.key.starts_with("dlq-")) {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
            let target = message
                .headers()
                .and_then(|hs| kafka::header_str(hs, header::DLQ_SOURCE_TOPIC))
                .unwrap_or(&source)
                .to_owned();
            let mut record = FutureRecord::to(&target).headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)?;
            replayed += 1;
            next = message.offset() + 1;
            let mut position = TopicPartitionList::new();
            position.add_partition_offset(&dlq, partition, Offset::Offset(next))?;
            consumer.commit(&position, CommitMode::Sync)?;
        }
    }
    Ok(replayed)
}
