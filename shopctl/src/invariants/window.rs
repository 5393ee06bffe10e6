//! The stretch of time the checker can compare state with events in. Both
//! sides forget: the broker deletes records older than a topic's
//! `retention.ms` (24 h on the local stack, 7 days by Kafka's default) and
//! each service drops `processed_events` partitions older than
//! `PROCESSED_RETENTION_SECS`. Compared over everything, a stack older than
//! either retention would show applied events that are no longer on the
//! topics, or events on the topics never applied. So the checks that pair
//! an id with an event (applied ⇔ published, state ⇒ event, outbox ⇒
//! topic) skip ids created before the window; the checks of the state
//! alone (orders decided, money, stock, sides agree) cover every row.
//!
//! Ids are v7 UUIDs, which begin with their creation time, and every event
//! about an order is created after the order: an order inside the window
//! has all its events inside it. An id that is not v7 (written by hand or
//! by a test) is always checked.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::{
    admin::{AdminClient, AdminOptions, ResourceSpecifier},
    client::DefaultClientContext,
};
use sqlx::PgPool;
use uuid::Uuid;

use common::{config::KafkaConfig, kafka, partitions, topics};

/// How far inside the topics' retention the window starts: the broker may
/// delete an expiring segment while the checker reads, and the clocks of
/// the services (ids) and the broker (record times) may differ a little.
const MARGIN: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Unix milliseconds; ids created before are not paired.
    pub start_ms: u64,
}

impl Window {
    /// Everything: for stacks younger than both retentions.
    #[cfg(test)]
    const ALL: Self = Self { start_ms: 0 };

    /// The window of these sources now: it starts where the shortest
    /// topic retention (less [`MARGIN`]) or the oldest `processed_events`
    /// partition still kept in any of the databases ends, whichever is later.
    pub async fn find(kafka: &KafkaConfig, databases: [&PgPool; 3]) -> anyhow::Result<Self> {
        let now_ms = unix_ms(SystemTime::now());
        let topics = match shortest_retention(kafka).await? {
            Some(kept) => now_ms.saturating_sub(unix_ms_of(kept + MARGIN)),
            None => 0,
        };
        let mut processed = 0;
        for db in databases {
            let since = partitions::kept_since(&mut *db.acquire().await?).await?;
            processed = processed.max(since);
        }
        Ok(Self {
            start_ms: topics.max(processed),
        })
    }

    /// Whether `id` is paired with its counterpart.
    #[must_use]
    pub fn holds(self, id: &Uuid) -> bool {
        created_ms(id).is_none_or(|ms| ms >= self.start_ms)
    }
}

/// The creation time of a v7 UUID, in Unix milliseconds.
fn created_ms(id: &Uuid) -> Option<u64> {
    (id.get_version_num() == 7).then(|| {
        let b = id.as_bytes();
        u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
    })
}

fn unix_ms(t: SystemTime) -> u64 {
    unix_ms_of(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

fn unix_ms_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The shortest `retention.ms` of the three pipeline topics, None when none
/// deletes by time (-1) or none exists yet.
async fn shortest_retention(cfg: &KafkaConfig) -> anyhow::Result<Option<Duration>> {
    let admin: AdminClient<DefaultClientContext> = kafka::base_config(cfg).create()?;
    let names: Vec<String> = topics::ALL.iter().map(|n| cfg.topic(n)).collect();
    let specifiers: Vec<ResourceSpecifier<'_>> =
        names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = admin.describe_configs(&specifiers, &options).await?;
    let shortest = described
        .into_iter()
        .filter_map(Result::ok) // a topic not created yet holds nothing to pair
        .filter_map(|resource| {
            let ms: i64 = resource
                .get("retention.ms")?
                .value
                .as_deref()?
                .parse()
                .ok()?;
            u64::try_from(ms).ok().map(Duration::from_millis) // -1: kept forever
        })
        .min();
    Ok(shortest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v7_id_is_held_from_its_creation_time_on() {
        let id = Uuid::now_v7();
        let ms = created_ms(&id).unwrap();
        assert!(Window { start_ms: ms }.holds(&id));
        assert!(!Window { start_ms: ms + 1 }.holds(&id));
        assert!(Window::ALL.holds(&id));
    }

    #[test]
    fn an_id_that_is_not_v7_is_always_held() {
        // A v4 id whose first bits, read as a v7 time, would be 1970.
        let id = Uuid::from_u128(0x0000_0000_0001_4000_8000_0000_0000_0001);
        assert_eq!(id.get_version_num(), 4);
        assert_eq!(created_ms(&id), None);
        assert!(Window { start_ms: u64::MAX }.holds(&id));
    }

    #[test]
    fn the_creation_time_is_the_clock_at_creation() {
        let before = unix_ms(SystemTime::now());
        let ms = created_ms(&Uuid::now_v7()).unwrap();
        assert!(before <= ms && ms <= unix_ms(SystemTime::now()));
    }
}
