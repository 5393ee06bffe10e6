//! Reads a topic from the beginning up to its current end, across all
//! partitions: what `dlq list` and the invariant checker need (a snapshot,
//! not a subscription).

use std::{collections::HashMap, time::Duration};

use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    message::OwnedMessage,
};

use common::{config::KafkaConfig, kafka};

/// Every record of `topic` present now, in partition order then offset
/// order. An absent topic reads as empty.
pub fn read_all(cfg: &KafkaConfig, topic: &str) -> anyhow::Result<Vec<OwnedMessage>> {
    let consumer: BaseConsumer = kafka::base_config(cfg)
        .set("group.id", format!("{}-snapshot", cfg.client_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Vec::new());
    };
    if meta.error().is_some() {
        return Ok(Vec::new()); // unknown topic
    }
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in meta.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
        if high > low {
            ends.insert(p.id(), high);
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
        }
    }
    let mut records = Vec::new();
    if ends.is_empty() {
        return Ok(records);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "reading {topic} took longer than 60 s"
        );
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message?;
        let partition = message.partition();
        let offset = message.offset();
        if let Some(end) = ends.get(&partition) {
            if offset < *end {
                records.push(message.detach());
            }
            if offset + 1 >= *end {
                ends.remove(&partition);
            }
        }
    }
    records.sort_by_key(|m| (m.partition(), m.offset()));
    Ok(records)
}
