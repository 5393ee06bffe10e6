//! Configuration from environment variables, parsed once into typed structs.
//!
//! Every variable has a default that works on a developer machine started
//! with `deploy/local/up.sh`; README.md lists them all.

use std::{
    convert::Infallible,
    fmt::{self, Display},
    str::FromStr,
    time::Duration,
};

use crate::kafka_security::KafkaSecurity;

/// A variable was set to something that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}={value:?} is invalid: {reason}")]
pub struct ConfigError {
    name: String,
    value: String,
    reason: String,
}

impl ConfigError {
    /// The variable `name` set to `value` cannot be used, because of
    /// `reason` (for settings checked beyond parsing, such as files that
    /// must be readable). Never pass a secret as `value`.
    pub fn new(name: &str, value: &str, reason: impl Display) -> Self {
        Self {
            name: name.to_owned(),
            value: value.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// Reads `name`, or `default` when it is unset or empty.
pub fn var<T>(name: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: Display,
{
    var_from(|name| std::env::var(name).ok(), name, default)
}

/// [`var`] with the variables looked up by `lookup`, so that the parsing is
/// tested without touching the process environment (which other threads
/// read at the same time).
fn var_from<T>(
    lookup: impl Fn(&str) -> Option<String>,
    name: &str,
    default: T,
) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: Display,
{
    match lookup(name) {
        Some(value) if !value.trim().is_empty() => {
            value.trim().parse().map_err(|e: T::Err| ConfigError {
                name: name.to_owned(),
                value,
                reason: e.to_string(),
            })
        }
        _ => Ok(default),
    }
}

/// Reads a duration given in milliseconds.
pub fn millis(name: &str, default_ms: u64) -> Result<Duration, ConfigError> {
    var(name, default_ms).map(Duration::from_millis)
}

/// A PostgreSQL connection URL. It usually carries a password, so `Debug`
/// and `Display` show it with the password replaced by `***`; only
/// [`DatabaseUrl::expose`] gives the URL itself, to connect with.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL with its password, for the connection and nothing else.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password (in the user info, or a `password`
    /// query parameter) replaced by `***`. Anything that is not a URL is
    /// hidden whole.
    #[must_use]
    pub fn redacted(&self) -> String {
        let url = self.0.as_str();
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
            return "***".to_owned();
        };
        let (head, rest) = url.split_at(scheme_end);
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***@{host}"),
                None => format!("{userinfo}@{host}"),
            },
            None => authority.to_owned(),
        };
        let path = match path.split_once('?') {
            Some((path, query)) => {
                let query: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                            format!("{key}=***")
                        }
                        _ => pair.to_owned(),
                    })
                    .collect();
                format!("{path}?{}", query.join("&"))
            }
            None => path.to_owned(),
        };
        format!("{head}{authority}{path}")
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({:?})", self.redacted())
    }
}

impl Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for DatabaseUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl FromStr for DatabaseUrl {
    type Err = Infallible;

    fn from_str(url: &str) -> Result<Self, Infallible> {
        Ok(url.into())
    }
}

/// PostgreSQL connection settings of one service.
#[derive(Clone, Debug)]
pub struct DbConfig {
    /// `DATABASE_URL`; the default names the service's own database.
    pub url: DatabaseUrl,
    /// `DATABASE_MAX_CONNECTIONS` (default 20).
    pub max_connections: u32,
}

impl DbConfig {
    /// Reads `DATABASE_URL` (default `postgres://shop:shop@127.0.0.1:5432/<database>`).
    pub fn from_env(database: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            url: var(
                "DATABASE_URL",
                format!("postgres://shop:shop@127.0.0.1:5432/{database}").into(),
            )?,
            max_connections: var("DATABASE_MAX_CONNECTIONS", 20)?,
        })
    }
}

/// Kafka settings of one service.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `KAFKA_BROKERS` (default `127.0.0.1:9092`).
    pub brokers: String,
    /// `KAFKA_TOPIC_PREFIX` (default empty): prepended to every topic name.
    pub topic_prefix: String,
    /// `KAFKA_GROUP_ID` (default: the service name).
    pub group_id: String,
    /// `KAFKA_GROUP_INSTANCE_ID` (default unset: a dynamic member): this
    /// consumer's static membership id (Kafka's `group.instance.id`), unique
    /// in the group and the same across restarts of this instance. A static
    /// member that comes back after a crash or a broker restart takes its
    /// partitions back at once, where a dynamic one joins as a new member and
    /// the group waits for the old one's session (6 s) to expire. A static
    /// member does not leave the group when it stops either, so give it only
    /// to instances that come back under the same name and are restarted by
    /// a supervisor (a `StatefulSet`'s pod), never to a `Deployment`'s pods:
    /// a member the broker fences joins again, up to three times a minute,
    /// then ends the consume loop (README, "Static group membership").
    pub group_instance_id: Option<String>,
    /// `KAFKA_PARTITIONS` (default 6): partitions of topics this service
    /// creates when they are missing.
    pub partitions: i32,
    /// `KAFKA_CLIENT_ID` (default: the service name).
    pub client_id: String,
    /// `KAFKA_DEBUG` (default empty: off): librdkafka's `debug` contexts for
    /// every client of the service, e.g. `eos,msg,broker`, logged at debug
    /// level under the `librdkafka` target (`RUST_LOG=librdkafka=debug`).
    pub debug: String,
    /// `KAFKA_SECURITY_*`, `KAFKA_SASL_*`, `KAFKA_SSL_*` (default: none,
    /// plaintext): librdkafka settings passed through as they are (see
    /// [`crate::kafka_security`]).
    pub security: KafkaSecurity,
}

impl KafkaConfig {
    pub fn from_env(service: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            brokers: var("KAFKA_BROKERS", "127.0.0.1:9092".to_owned())?,
            topic_prefix: var("KAFKA_TOPIC_PREFIX", String::new())?,
            group_id: var("KAFKA_GROUP_ID", service.to_owned())?,
            group_instance_id: Some(var("KAFKA_GROUP_INSTANCE_ID", String::new())?)
                .filter(|id| !id.is_empty()),
            partitions: var("KAFKA_PARTITIONS", 6)?,
            client_id: var("KAFKA_CLIENT_ID", service.to_owned())?,
            debug: var("KAFKA_DEBUG", String::new())?,
            security: {
                let security = KafkaSecurity::from_env()?;
                if !security.is_empty() {
                    // The names only: the values are credentials.
                    let keys: Vec<&str> = security.keys().collect();
                    tracing::info!(?keys, "Kafka security settings passed through");
                }
                security
            },
        })
    }

    /// The full name of one of the pipeline's topics.
    #[must_use]
    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.topic_prefix)
    }
}

/// Tuning of the outbox relay and the consume loop, shared by all services.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// `OUTBOX_BATCH_SIZE` (default 1000): events published per round.
    pub outbox_batch_size: i64,
    /// `OUTBOX_POLL_INTERVAL_MS` (default 200): how often the relay looks for
    /// events when nobody woke it.
    pub outbox_poll_interval: Duration,
    /// `OUTBOX_RETENTION_SECS` (default 3600): published rows older than
    /// this are pruned.
    pub outbox_retention: Duration,
    /// `PROCESSED_RETENTION_SECS` (default 604800, 7 days): how long a
    /// consumer remembers an event it applied, so that a redelivery changes
    /// nothing. At least the topics' `retention.ms` (Kafka's default is 7
    /// days): an event delivered again after its row left is applied again.
    /// Rows leave by partition, up to a quarter later (`common::partitions`).
    pub processed_retention: Duration,
    /// `CONSUMER_BATCH_SIZE` (default 500): records applied per transaction.
    pub consumer_batch_size: usize,
    /// `CONSUMER_MAX_ATTEMPTS` (default 5): tries of a failing record before
    /// it is dead-lettered. Unavailable database or broker retries forever.
    pub consumer_max_attempts: u32,
    /// `HEALTH_CHECK_INTERVAL_MS` (default 1000).
    pub health_interval: Duration,
}

impl PipelineConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            outbox_batch_size: var("OUTBOX_BATCH_SIZE", 1000)?,
            outbox_poll_interval: millis("OUTBOX_POLL_INTERVAL_MS", 200)?,
            outbox_retention: Duration::from_secs(var("OUTBOX_RETENTION_SECS", 3600)?),
            processed_retention: Duration::from_secs(var("PROCESSED_RETENTION_SECS", 604_800)?),
            consumer_batch_size: var("CONSUMER_BATCH_SIZE", 500)?,
            consumer_max_attempts: var("CONSUMER_MAX_ATTEMPTS", 5)?,
            health_interval: millis("HEALTH_CHECK_INTERVAL_MS", 1000)?,
        })
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            outbox_batch_size: 1000,
            outbox_poll_interval: Duration::from_millis(200),
            outbox_retention: Duration::from_secs(3600),
            processed_retention: Duration::from_secs(604_800),
            consumer_batch_size: 500,
            consumer_max_attempts: 5,
            health_interval: Duration::from_secs(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn var_falls_back_and_reports_bad_values() {
        let env = |name: &str| match name {
            "BAD" => Some("seven".to_owned()),
            "GOOD" => Some(" 42 ".to_owned()),
            "BLANK" => Some("  ".to_owned()),
            _ => None,
        };
        assert_eq!(var_from(env, "UNSET", 7u32).unwrap(), 7);
        assert_eq!(var_from(env, "BLANK", 7u32).unwrap(), 7);
        assert_eq!(var_from(env, "GOOD", 7u32).unwrap(), 42);
        let err = var_from(env, "BAD", 7u32).unwrap_err().to_string();
        assert!(err.contains("BAD=\"seven\""), "{err}");
    }

    #[test]
    fn database_url_hides_the_password() {
        let cfg = DbConfig {
            url: "postgres://shop:s3cret@db.internal:5432/orders?sslmode=require".into(),
            max_connections: 5,
        };
        assert_eq!(
            format!("{cfg:?}"),
            "DbConfig { url: DatabaseUrl(\"postgres://shop:***@db.internal:5432/orders?sslmode=require\"), max_connections: 5 }"
        );
        assert_eq!(
            cfg.url.to_string(),
            "postgres://shop:***@db.internal:5432/orders?sslmode=require"
        );
        assert_eq!(
            cfg.url.expose(),
            "postgres://shop:s3cret@db.internal:5432/orders?sslmode=require"
        );
        let cases = [
            ("postgres://shop@h/db", "postgres://shop@h/db"),
            (
                "postgres://h/db?password=pw&user=u",
                "postgres://h/db?password=***&user=u",
            ),
            ("postgres://u:p@ss@h", "postgres://u:***@h"),
            ("host=h password=pw", "***"),
        ];
        for (url, redacted) in cases {
            assert_eq!(DatabaseUrl::from(url).redacted(), redacted);
        }
    }

    #[test]
    fn topic_prefix_applies() {
        let cfg = KafkaConfig {
            brokers: String::new(),
            topic_prefix: "t1.".into(),
            group_id: "g".into(),
            group_instance_id: None,
            partitions: 1,
            client_id: "c".into(),
            debug: String::new(),
            security: KafkaSecurity::default(),
        };
        assert_eq!(cfg.topic("orders"), "t1.orders");
    }
}
