//! Kafka security settings passed through from the environment to
//! librdkafka, so that a service can reach a broker over SSL or SASL without
//! a setting of ours per librdkafka property.
//!
//! The rule: a variable `KAFKA_<NAME>` becomes the librdkafka property
//! `<NAME>` lowercased with every `_` turned into `.`, when that property is
//! in the `security.`, `sasl.` or `ssl.` family:
//!
//! | variable | property |
//! |---|---|
//! | `KAFKA_SECURITY_PROTOCOL` | `security.protocol` |
//! | `KAFKA_SASL_MECHANISM` | `sasl.mechanism` |
//! | `KAFKA_SASL_USERNAME`, `KAFKA_SASL_PASSWORD` | `sasl.username`, `sasl.password` |
//! | `KAFKA_SSL_CA_LOCATION` | `ssl.ca.location` |
//!
//! Every other `KAFKA_` variable (`KAFKA_BROKERS`, `KAFKA_TOPIC_PREFIX`, …)
//! is one of the service's own settings and is not passed. librdkafka's
//! properties in these families have no `_` of their own, so the mapping is
//! one to one. Empty values count as unset, like every other setting.
//!
//! The settings are checked by librdkafka when the configuration is read: an
//! unknown property or a value it refuses is a configuration error (exit
//! status 2) naming the variable. Values are secrets (`sasl.password`,
//! `ssl.key.pem`): they are never logged or shown, only the property names.

use std::fmt;

use rdkafka::ClientConfig;

use crate::config::ConfigError;

const PREFIX: &str = "KAFKA_";
const FAMILIES: [&str; 3] = ["security.", "sasl.", "ssl."];

/// The passed-through properties. `Debug` shows the property names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaSecurity {
    /// (librdkafka property, value), sorted by property.
    properties: Vec<(String, String)>,
}

impl fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("KafkaSecurity")
            .field(&self.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The librdkafka property an environment variable passes through to, if
/// it is one of the families passed.
#[must_use]
pub fn property(variable: &str) -> Option<String> {
    let name = variable.strip_prefix(PREFIX)?;
    let key = name.to_ascii_lowercase().replace('_', ".");
    FAMILIES
        .iter()
        .any(|family| key.starts_with(family) && key.len() > family.len())
        .then_some(key)
}

impl KafkaSecurity {
    /// Collects the passed variables of the process environment (variables
    /// that are not UTF-8 are not ours and are skipped).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        }))
    }

    /// [`KafkaSecurity::from_env`] from the given (variable, value) pairs.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut properties = Vec::new();
        let mut check = ClientConfig::new();
        for (variable, value) in vars {
            let Some(key) = property(&variable) else {
                continue;
            };
            let value = value.trim().to_owned();
            if value.is_empty() {
                continue;
            }
            check.set(&key, &value);
            // librdkafka checks the property name and value here, without
            // connecting anywhere.
            if let Err(e) = check.create_native_config() {
                let reason = match e {
                    rdkafka::error::KafkaError::ClientConfig(_, description, _, _) => {
                        description.replace(&value, "***")
                    }
                    other => other.to_string().replace(&value, "***"),
                };
                return Err(ConfigError::new(
                    &variable,
                    "***",
                    format_args!("librdkafka refuses {key}: {reason}"),
                ));
            }
            properties.push((key, value));
        }
        properties.sort();
        Ok(Self { properties })
    }

    /// The librdkafka property names passed, for the log.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.properties.iter().map(|(key, _)| key.as_str())
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.properties.is_empty()
    }

    /// Sets every passed property on `config`.
    pub fn apply(&self, config: &mut ClientConfig) {
        for (key, value) in &self.properties {
            config.set(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn maps_only_the_security_families() {
        assert_eq!(
            property("KAFKA_SECURITY_PROTOCOL").as_deref(),
            Some("security.protocol")
        );
        assert_eq!(
            property("KAFKA_SASL_MECHANISM").as_deref(),
            Some("sasl.mechanism")
        );
        assert_eq!(
            property("KAFKA_SSL_CA_LOCATION").as_deref(),
            Some("ssl.ca.location")
        );
        assert_eq!(
            property("KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM").as_deref(),
            Some("ssl.endpoint.identification.algorithm")
        );
        for ours in [
            "KAFKA_BROKERS",
            "KAFKA_TOPIC_PREFIX",
            "KAFKA_GROUP_ID",
            "KAFKA_GROUP_INSTANCE_ID",
            "KAFKA_PARTITIONS",
            "KAFKA_CLIENT_ID",
            "KAFKA_DEBUG",
            "KAFKA_SSL",
            "KAFKA_SASL_",
            "SASL_MECHANISM",
            "KAFKA_SSLX_Y",
        ] {
            assert_eq!(property(ours), None, "{ours}");
        }
    }

    #[test]
    fn passes_values_and_shows_only_keys() {
        let security = KafkaSecurity::from_vars(vars(&[
            ("KAFKA_BROKERS", "b:9092"),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KAFKA_SASL_USERNAME", "shop"),
            ("KAFKA_SASL_PASSWORD", "hunter2-secret"),
            ("KAFKA_SSL_CA_LOCATION", " "),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(
            security.keys().collect::<Vec<_>>(),
            [
                "sasl.mechanism",
                "sasl.password",
                "sasl.username",
                "security.protocol"
            ]
        );
        assert!(!format!("{security:?}").contains("hunter2"));
        let mut config = ClientConfig::new();
        security.apply(&mut config);
        assert_eq!(config.get("sasl.password"), Some("hunter2-secret"));
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("bootstrap.servers"), None);
    }

    #[test]
    fn refuses_what_librdkafka_refuses_without_showing_the_value() {
        let err = KafkaSecurity::from_vars(vars(&[("KAFKA_SECURITY_PROTOCOL", "carrier-pigeon")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KAFKA_SECURITY_PROTOCOL") && !err.contains("carrier-pigeon"),
            "{err}"
        );
        let err = KafkaSecurity::from_vars(vars(&[("KAFKA_SSL_NO_SUCH_THING", "x1y2z3")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KAFKA_SSL_NO_SUCH_THING") && !err.contains("x1y2z3"),
            "{err}"
        );
    }
}
