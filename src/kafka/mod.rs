//! The Kafka mirror: each topic of the log copied into a Kafka topic, in
//! offset order per partition, into the partition of the same number.
//!
//! The log already places records with Kafka's murmur2 partitioner, so a
//! Kafka consumer sees the same key → partition mapping as a consumer of
//! the log. Progress is the committed offset of the consumer group
//! [`MIRROR_GROUP`] (one owner per partition, fenced commits), advanced only
//! past records the brokers acknowledged: at least once into Kafka, and a
//! record mirrored twice carries the same [`OFFSET_HEADER`].
//!
//! * [`KafkaSettings`]: brokers, librdkafka settings passed through, topic
//!   names; checked (and the producer built) before any role starts.
//! * [`mirror`]: the role.
//! * [`status`]: per partition, log end, mirrored offset and lag.

mod metrics;
pub mod mirror;
mod producer;
pub mod status;
mod topics;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rdkafka::config::ClientConfig;

/// The consumer group whose committed offsets are the mirror's progress.
pub const MIRROR_GROUP: &str = "kafka-mirror";

/// The header carrying a mirrored record's offset in the log.
pub const OFFSET_HEADER: &str = "outbox-offset";

/// Settings the mirror owns: a pass-through setting may not change them.
/// Topics are made by an operator or by --kafka-create-topics, with the
/// log's partition count: never by a metadata request with the broker's
/// default count.
const FIXED: [(&str, &str); 3] = [
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("allow.auto.create.topics", "false"),
];

/// Producer defaults, each overridable through `KAFKA_CONFIG`.
const DEFAULTS: [(&str, &str); 3] = [
    // A record is never given up while brokers are away: the mirror waits
    // (its lag grows), and Kafka keeps the log's order.
    ("message.timeout.ms", "0"),
    ("linger.ms", "5"),
    ("client.id", "outbox-relay-kafka-mirror"),
];

/// Everything the `kafka` role needs to know.
#[derive(Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// librdkafka settings passed through (SASL, TLS, tuning). Values may be
    /// credentials: they are never logged, only their keys.
    pub config: BTreeMap<String, String>,
    /// Log topics to mirror; empty: every topic of the log at start.
    pub topics: Vec<String>,
    /// Log topic → Kafka topic, where they differ.
    pub topic_map: BTreeMap<String, String>,
    /// Create a missing Kafka topic with the log's partition count.
    pub create_topics: bool,
    /// Replication factor of topics the mirror creates.
    pub replication_factor: i32,
    pub session_timeout: Duration,
}

impl KafkaSettings {
    pub fn new(brokers: &str) -> anyhow::Result<KafkaSettings> {
        let brokers = brokers.trim();
        if brokers.is_empty() {
            anyhow::bail!("KAFKA_BROKERS is empty: give host:port[,host:port…]");
        }
        Ok(KafkaSettings {
            brokers: brokers.to_string(),
            config: BTreeMap::new(),
            topics: Vec::new(),
            topic_map: BTreeMap::new(),
            create_topics: false,
            replication_factor: 1,
            session_timeout: Duration::from_secs(10),
        })
    }

    /// The Kafka topic a log topic is mirrored into.
    pub fn kafka_topic<'a>(&'a self, log_topic: &'a str) -> &'a str {
        self.topic_map
            .get(log_topic)
            .map(String::as_str)
            .unwrap_or(log_topic)
    }

    /// The librdkafka configuration: defaults, then the pass-through
    /// settings, then what the mirror's guarantee needs.
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let mut config = ClientConfig::new();
        for (key, value) in DEFAULTS {
            config.set(key, value);
        }
        for (key, value) in &self.config {
            if let Some((_, needed)) = FIXED.iter().find(|(fixed, _)| fixed == key) {
                if value != needed {
                    anyhow::bail!(
                        "KAFKA_CONFIG sets {key}={value}, but the mirror needs {key}={needed} \
                         (in order and at least once into Kafka)"
                    );
                }
            }
            if key == "bootstrap.servers" {
                anyhow::bail!(
                    "KAFKA_CONFIG sets bootstrap.servers: give the brokers as KAFKA_BROKERS"
                );
            }
            config.set(key, value);
        }
        for (key, value) in FIXED {
            config.set(key, value);
        }
        config.set("bootstrap.servers", &self.brokers);
        Ok(config)
    }

    /// The settings' keys and the brokers, for logs (never the values of
    /// pass-through settings: they may be passwords).
    pub fn describe(&self) -> String {
        let keys: Vec<&str> = self.config.keys().map(String::as_str).collect();
        if keys.is_empty() {
            format!("brokers {}", self.brokers)
        } else {
            format!("brokers {}, settings {}", self.brokers, keys.join(","))
        }
    }
}

/// Parses `KAFKA_CONFIG`: `key=value,key=value`, or `@path` to a file with
/// one `key=value` per line (`#` comments), like librdkafka's properties
/// files. Values may hold `=` (the first one splits) but not `,` inline:
/// use a file for those.
pub fn parse_config(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let text = text.trim();
    let (lines, source): (Vec<String>, String) = match text.strip_prefix('@') {
        Some(path) => {
            let content = std::fs::read_to_string(Path::new(path))
                .with_context(|| format!("cannot read KAFKA_CONFIG file {path}"))?;
            (
                content.lines().map(str::to_string).collect(),
                path.to_string(),
            )
        }
        None => (
            text.split(',').map(str::to_string).collect(),
            "KAFKA_CONFIG".to_string(),
        ),
    };
    let mut config = BTreeMap::new();
    for (number, line) in lines.iter().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            // Never echo the entry: it may be a secret.
            anyhow::bail!("{source}: entry {} is not key=value", number + 1);
        };
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
        {
            anyhow::bail!("{source}: entry {} has no valid key", number + 1);
        }
        config.insert(key.to_string(), value.trim().to_string());
    }
    Ok(config)
}

/// Parses `--kafka-topic-map log-topic=kafka-topic,…`.
pub fn parse_topic_map(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (from, to) = entry
            .split_once('=')
            .with_context(|| format!("topic map entry {entry:?} is not log-topic=kafka-topic"))?;
        let (from, to) = (from.trim(), to.trim());
        if !valid_kafka_topic(to) {
            anyhow::bail!("{to:?} is not a valid Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)");
        }
        map.insert(from.to_string(), to.to_string());
    }
    Ok(map)
}

/// Kafka's topic name rule.
pub fn valid_kafka_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_through_settings_are_parsed_and_may_not_weaken_the_guarantee() {
        let config = parse_config("security.protocol=SASL_SSL, sasl.password=a=b").unwrap();
        assert_eq!(config["security.protocol"], "SASL_SSL");
        assert_eq!(config["sasl.password"], "a=b", "only the first = splits");
        let mut settings = KafkaSettings::new("k1:9092").unwrap();
        settings.config = config;
        let client = settings.client_config().unwrap();
        assert_eq!(client.get("enable.idempotence"), Some("true"));
        assert_eq!(client.get("acks"), Some("all"));
        assert_eq!(client.get("message.timeout.ms"), Some("0"));
        assert!(
            !settings.describe().contains("a=b"),
            "values are never described"
        );

        settings.config = parse_config("acks=1").unwrap();
        let refused = settings.client_config().unwrap_err().to_string();
        assert!(refused.contains("acks=all"), "{refused}");
        settings.config = parse_config("message.timeout.ms=30000").unwrap();
        assert_eq!(
            settings.client_config().unwrap().get("message.timeout.ms"),
            Some("30000"),
            "defaults may be overridden"
        );

        let bad = parse_config("sasl.password").unwrap_err().to_string();
        assert!(
            !bad.contains("sasl.password"),
            "a bad entry is not echoed: {bad}"
        );
        assert!(KafkaSettings::new(" ").is_err());
    }

    #[test]
    fn pass_through_settings_may_come_from_a_properties_file() {
        let path = std::env::temp_dir().join(format!("kafka-{}.properties", std::process::id()));
        std::fs::write(
            &path,
            "# production cluster\nsecurity.protocol=SASL_SSL\n\nsasl.jaas.config=a, b=c\n",
        )
        .unwrap();
        let config = parse_config(&format!("@{}", path.display())).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(config.len(), 2);
        assert_eq!(
            config["sasl.jaas.config"], "a, b=c",
            "commas are kept in a file"
        );
        assert!(parse_config("@/no/such/file").is_err());
    }

    #[test]
    fn topic_maps_name_valid_kafka_topics() {
        let map = parse_topic_map("order-created=shop.orders.v1").unwrap();
        let mut settings = KafkaSettings::new("k:9092").unwrap();
        settings.topic_map = map;
        assert_eq!(settings.kafka_topic("order-created"), "shop.orders.v1");
        assert_eq!(settings.kafka_topic("other"), "other");
        assert!(parse_topic_map("a=b c").is_err());
        assert!(parse_topic_map("a").is_err());
    }
}
