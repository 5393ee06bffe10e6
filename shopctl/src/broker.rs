//! `shopctl broker`: which Kafka cluster each service's database belongs
//! with, and the operator's decision to move them to another one.
//!
//! A service refuses to run when its broker is not the cluster its database
//! recorded (`common::broker_identity`). [`accept`] is the way out when the
//! change is intended (a replaced cluster, a lost log): it records the new
//! cluster in every database, marks the outbox rows still kept as
//! unpublished so that the relays send them to the new cluster (consumers
//! drop the events they applied already), and moves each consumer group's
//! committed offsets on the new cluster to the earliest, so that nothing on
//! it is skipped. Events pruned from the outboxes before (older than
//! `OUTBOX_RETENTION_SECS`) and never seen by a consumer are lost with the
//! old cluster: `shopctl check` names what they leave undone.

use std::time::Duration;

use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
};
use serde::Serialize;
use sqlx::PgPool;

use common::{
    broker_identity::{self, Accepted},
    config::KafkaConfig,
    kafka, topics,
};

/// A service's database and consumer group.
pub struct ServiceDb {
    /// `order`, `payment` or `inventory`.
    pub service: &'static str,
    pub pool: PgPool,
    /// Its consumer group (the service's `KAFKA_GROUP_ID`).
    pub group: String,
}

/// The three services as `shopctl` is told about them.
#[must_use]
pub fn services(
    orders: PgPool,
    payments: PgPool,
    inventory: PgPool,
    groups: [String; 3],
) -> Vec<ServiceDb> {
    let [order_group, payment_group, inventory_group] = groups;
    vec![
        ServiceDb {
            service: "order",
            pool: orders,
            group: order_group,
        },
        ServiceDb {
            service: "payment",
            pool: payments,
            group: payment_group,
        },
        ServiceDb {
            service: "inventory",
            pool: inventory,
            group: inventory_group,
        },
    ]
}

/// The topics (pipeline names) a service consumes.
fn consumed(service: &str) -> &'static [&'static str] {
    match service {
        "order" => &[topics::PAYMENTS, topics::INVENTORY],
        _ => &[topics::ORDERS],
    }
}

/// What `shopctl broker show` prints.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The cluster the configured brokers belong to.
    pub broker: String,
    /// Per service: the cluster its database recorded.
    pub recorded: Vec<(String, Option<String>)>,
}

/// The broker's cluster id and what each database recorded.
pub async fn show(kafka: &KafkaConfig, dbs: &[ServiceDb]) -> anyhow::Result<Status> {
    let broker = broker_cluster(kafka).await?;
    let mut recorded = Vec::new();
    for db in dbs {
        recorded.push((
            db.service.to_owned(),
            broker_identity::recorded(&db.pool).await?,
        ));
    }
    Ok(Status { broker, recorded })
}

/// What [`accept`] did for one service.
#[derive(Debug, Serialize)]
pub struct ServiceAccepted {
    pub service: String,
    #[serde(flatten)]
    pub accepted: Accepted,
    /// Partitions whose committed offset for the service's group was set
    /// to the earliest record.
    pub offsets_reset: usize,
}

/// Accepts the cluster the configured brokers belong to for every service
/// (see module docs). Run it while the services are refusing (they have
/// not joined their consumer groups yet), not while they consume.
pub async fn accept(
    kafka: &KafkaConfig,
    dbs: &[ServiceDb],
) -> anyhow::Result<Vec<ServiceAccepted>> {
    let cluster = broker_cluster(kafka).await?;
    let mut report = Vec::new();
    for db in dbs {
        let accepted = broker_identity::accept(&db.pool, &cluster).await?;
        let offsets_reset = if accepted.previous.as_deref() == Some(cluster.as_str()) {
            0
        } else {
            let topics: Vec<String> = consumed(db.service)
                .iter()
                .map(|t| kafka.topic(t))
                .collect();
            let (cfg, group) = (kafka.clone(), db.group.clone());
            tokio::task::spawn_blocking(move || reset_to_earliest(&cfg, &group, &topics)).await??
        };
        report.push(ServiceAccepted {
            service: db.service.to_owned(),
            accepted,
            offsets_reset,
        });
    }
    Ok(report)
}

async fn broker_cluster(kafka: &KafkaConfig) -> anyhow::Result<String> {
    let producer = kafka::producer(kafka)?;
    broker_identity::cluster_id(&producer, Duration::from_secs(10))
        .await
        .ok_or_else(|| anyhow::anyhow!("the broker at {} did not answer", kafka.brokers))
}

/// Commits the earliest offset of every partition of `topics` for `group`.
/// Topics that do not exist yet have nothing to reset: the services create
/// them and, having no committed offset, start from the earliest anyway.
fn reset_to_earliest(cfg: &KafkaConfig, group: &str, topics: &[String]) -> anyhow::Result<usize> {
    let consumer: BaseConsumer = kafka::base_config(cfg)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        for meta in metadata.topics().iter().filter(|t| t.error().is_none()) {
            for p in meta.partitions() {
                let (low, _) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
            }
        }
    }
    if tpl.count() > 0 {
        consumer.commit(&tpl, CommitMode::Sync)?;
    }
    Ok(tpl.count())
}
