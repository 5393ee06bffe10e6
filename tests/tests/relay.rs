//! The outbox relay's leadership, against a real PostgreSQL and Kafka: of
//! several relays on one database (one per replica), exactly one publishes;
//! when its connection is cut, or it stops, another leads, and every event
//! reaches the topic once, in the order it was written. A relay whose
//! producer delivers nothing replaces it.

use std::time::Duration;

use common::{
    config::DbConfig,
    outbox::{OutboxEvent, Relay},
    topics,
};
use e2e::{create_database, eventually, test_kafka_config, test_pipeline_config, unique_id};
use rdkafka::Message as _;
use shop_proto::events;
use sqlx::{PgPool, migrate::Migrator};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One relay with a pool of its own, as a replica would run it.
struct Replica {
    stop: CancellationToken,
    task: JoinHandle<Result<(), String>>,
}

impl Replica {
    fn start(url: &str, kafka: &common::config::KafkaConfig) -> Self {
        let producer = common::kafka::producer(kafka).expect("producer");
        Self::start_with(url, producer, kafka)
    }

    /// A relay that starts with `producer`, and makes any replacement from
    /// `kafka`.
    fn start_with(
        url: &str,
        producer: rdkafka::producer::FutureProducer,
        kafka: &common::config::KafkaConfig,
    ) -> Self {
        let pool = common::db::pool(&DbConfig {
            url: url.to_owned().into(),
            max_connections: 4,
        })
        .expect("pool");
        let relay = Relay::new(pool, producer, kafka.clone(), &test_pipeline_config());
        let stop = CancellationToken::new();
        let run = relay.run(stop.clone());
        let task = tokio::spawn(async move { run.await.map_err(|e| format!("{e:#}")) });
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("relay stops within 30 s")
            .expect("relay task")
            .expect("relay ends without error");
    }
}

/// Writes events `range` for one customer, one transaction each (as
/// separate requests would).
async fn write(db: &PgPool, topic: &str, range: std::ops::Range<u32>) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for n in range {
        let event_id = Uuid::now_v7();
        let created = events::OrderCreated {
            order_id: format!("{n:05}"),
            customer_id: "CUST-RELAY".into(),
            ..Default::default()
        };
        let event = OutboxEvent::new(topic.to_owned(), "CUST-RELAY", event_id, &created);
        let mut tx = db.begin().await.expect("begin");
        common::outbox::enqueue(&mut tx, &[event])
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
        ids.push(event_id);
    }
    ids
}

async fn wait_published(db: &PgPool, written: i64) {
    eventually("every outbox row to be marked published", || async {
        let (rows, pending): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL) FROM outbox",
        )
        .fetch_one(db)
        .await
        .ok()?;
        (rows == written && pending == 0).then_some(())
    })
    .await;
}

/// The backends holding an advisory lock in this test's database: the
/// leading relays.
async fn leaders(db: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks
         WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(db)
    .await
    .expect("read pg_locks")
}

async fn one_leader(db: &PgPool) -> i32 {
    eventually("exactly one relay to lead", || async {
        match leaders(db).await[..] {
            [pid] => Some(pid),
            _ => None,
        }
    })
    .await
}

/// A database with the outbox, and the `orders` topic, of one test.
struct Setup {
    url: String,
    kafka: common::config::KafkaConfig,
    db: PgPool,
    topic: String,
}

impl Setup {
    async fn new() -> Self {
        let id = unique_id();
        let url = create_database(format!("t_{id}_relay")).await;
        let kafka = test_kafka_config(&id, "relay");
        let shutdown = CancellationToken::new();
        common::kafka::ensure_topics(&kafka, &[topics::ORDERS], &shutdown)
            .await
            .expect("topics");
        let db = PgPool::connect(&url).await.expect("connect");
        common::db::migrate(&db, &Migrator::DEFAULT, &shutdown)
            .await
            .expect("migrations");
        let topic = kafka.topic(topics::ORDERS);
        Self {
            url,
            kafka,
            db,
            topic,
        }
    }
}

/// The event ids on `topic`, in the order the broker holds them.
fn published(kafka: &common::config::KafkaConfig, topic: &str) -> Vec<Uuid> {
    shopctl::topic::read_all(kafka, topic)
        .expect("read topic")
        .iter()
        .map(|m| {
            m.headers()
                .and_then(|h| common::kafka::header_str(h, common::kafka::header::EVENT_ID))
                .and_then(|id| Uuid::parse_str(id).ok())
                .expect("an event-id header")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_relay_leads_and_another_takes_over() {
    let Setup {
        url,
        kafka,
        db,
        topic,
    } = Setup::new().await;

    let a = Replica::start(&url, &kafka);
    let b = Replica::start(&url, &kafka);
    let mut written = write(&db, &topic, 0..40).await;
    wait_published(&db, 40).await;
    let first = one_leader(&db).await;

    // The leader's connection is cut (a failover, a killed backend): the
    // lock goes with it, and a relay leads again on a new connection.
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(first)
        .execute(&db)
        .await
        .expect("terminate the leader's backend");
    written.extend(write(&db, &topic, 40..80).await);
    wait_published(&db, 80).await;
    let second = one_leader(&db).await;
    assert_ne!(second, first, "a new connection leads");

    // One replica stops: whichever it was, the other publishes from now on.
    a.stop().await;
    written.extend(write(&db, &topic, 80..120).await);
    wait_published(&db, 120).await;
    one_leader(&db).await;
    b.stop().await;
    eventually("the stopped relays to release the lock", || async {
        leaders(&db).await.is_empty().then_some(())
    })
    .await;

    // Every event once, in the order written: one key, one partition.
    assert_eq!(
        published(&kafka, &topic),
        written,
        "each event once, in write order"
    );
}

/// A producer that delivers nothing at all (here: its broker address
/// answers nobody; in the fault suite: an idempotent producer that never
/// recovered from a broker restart) fails the relay's round on every
/// partition; the relay replaces it and publishes with the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_whose_producer_delivers_nothing_replaces_it() {
    let Setup {
        url,
        kafka,
        db,
        topic,
    } = Setup::new().await;
    let nowhere = common::config::KafkaConfig {
        brokers: e2e::free_addr().to_string(),
        ..kafka.clone()
    };
    let stuck = common::kafka::producer(&nowhere).expect("producer");

    let relay = Replica::start_with(&url, stuck, &kafka);
    let written = write(&db, &topic, 0..20).await;
    // The first round times out (message.timeout.ms, 15 s) on every
    // partition; the next goes out with a new producer.
    wait_published(&db, 20).await;
    relay.stop().await;

    assert_eq!(
        published(&kafka, &topic),
        written,
        "each event once, in write order"
    );
}
