//! The webhook sink: pushes each event of its topics to a URL, signed as
//! the Standard Webhooks specification says (standardwebhooks.com), so a
//! service in any language, without Kafka, gets the events.
//!
//! Each sink is a consumer group of its own, `webhook-<name>`: offsets,
//! lag, `groups reset-offsets` and dead letters like any group. All the
//! delivery policy is the group layer's ([`crate::group::delivery`]):
//! this file only says what one request came to.
//!
//! - **Request**: `POST` with a JSON body (topic, partition, offset, key,
//!   created_at, headers, payload) and the headers `webhook-id` (stable per
//!   event: a receiver drops repeats by it), `webhook-timestamp` (Unix
//!   seconds) and `webhook-signature` (`v1,` and the base64 HMAC-SHA256 of
//!   `id.timestamp.body` under the `whsec_` secret); the event's
//!   `traceparent` is forwarded.
//! - **Answers**: 2xx delivered. 408, 429, 5xx, a timeout or a connection
//!   error: retried with backoff (a `Retry-After` is honoured); a timeout
//!   is an unknown outcome, and the retry carries the same `webhook-id`.
//!   Any other answer (4xx, a redirect, which is not followed): parked as a
//!   dead letter with the status and the first bytes of the body.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use axum::body::Bytes;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};

use crate::db::Db;
use crate::group::consumer::ConsumerConfig;
use crate::group::delivery::{self, Attempt, Deliver, DeliveringConsumer, RetryPolicy};
use crate::group::GroupConfig;
use crate::log::Record;

/// One sink, as configured.
#[derive(Clone)]
pub struct SinkSettings {
    /// `[a-z0-9-]`, 1 to 40: the group is `webhook-<name>`.
    pub name: String,
    pub url: url::Url,
    pub topics: Vec<String>,
    pub secret: SigningSecret,
    /// For the whole exchange; connecting has a third of it.
    pub timeout: Duration,
    /// Requests in flight at once (connections kept open as many).
    pub concurrency: usize,
}

impl std::fmt::Debug for SinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkSettings")
            .field("name", &self.name)
            .field("url", &redacted(&self.url))
            .field("topics", &self.topics)
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// What the sink's variables are called.
fn var(name: &str, what: &str) -> String {
    format!(
        "WEBHOOK_{}_{what}",
        name.to_ascii_uppercase().replace('-', "_")
    )
}

impl SinkSettings {
    /// The sinks named in `names` (`WEBHOOK_SINKS`), each from its
    /// variables: `WEBHOOK_<NAME>_URL` (http or https),
    /// `WEBHOOK_<NAME>_SECRET` (`whsec_` and base64),
    /// `WEBHOOK_<NAME>_TOPICS` (default `order-created`),
    /// `WEBHOOK_<NAME>_TIMEOUT_SECS` (default 10) and
    /// `WEBHOOK_<NAME>_CONCURRENCY` (requests at once, default 64). `env`
    /// reads a variable.
    pub fn from_env(
        names: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Vec<SinkSettings>> {
        let mut sinks: Vec<SinkSettings> = Vec::new();
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let valid = !name.is_empty()
                && name.len() <= 40
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                bail!("WEBHOOK_SINKS: {name:?} is not a sink name (a-z, 0-9 and -, at most 40)");
            }
            if sinks.iter().any(|s| s.name == name) {
                bail!("WEBHOOK_SINKS names {name:?} twice");
            }
            let required = |what: &str| {
                env(&var(name, what))
                    .filter(|v| !v.is_empty())
                    .with_context(|| format!("{} is not set", var(name, what)))
            };
            let url_var = var(name, "URL");
            let url = url::Url::parse(&required("URL")?)
                .map_err(|e| anyhow::anyhow!("{url_var} is not a URL ({e})"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                bail!("{url_var} {} is not an http(s) URL", redacted(&url));
            }
            let secret =
                SigningSecret::parse(&required("SECRET")?).with_context(|| var(name, "SECRET"))?;
            let topics: Vec<String> = env(&var(name, "TOPICS"))
                .unwrap_or_else(|| crate::app::order::ORDER_CREATED_TOPIC.to_string())
                .split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect();
            if topics.is_empty() {
                bail!("{} names no topic", var(name, "TOPICS"));
            }
            let timeout = match env(&var(name, "TIMEOUT_SECS")) {
                None => Duration::from_secs(10),
                Some(secs) => secs
                    .parse::<f64>()
                    .ok()
                    .filter(|s| (0.1..=600.0).contains(s))
                    .map(Duration::from_secs_f64)
                    .with_context(|| {
                        format!("{} must be 0.1 to 600 seconds", var(name, "TIMEOUT_SECS"))
                    })?,
            };
            let concurrency = match env(&var(name, "CONCURRENCY")) {
                None => 64,
                Some(n) => n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .with_context(|| format!("{} must be 1 to 1000", var(name, "CONCURRENCY")))?,
            };
            sinks.push(SinkSettings {
                name: name.to_string(),
                url,
                topics,
                secret,
                timeout,
                concurrency,
            });
        }
        if sinks.is_empty() {
            bail!("the webhook role needs WEBHOOK_SINKS (names of sinks, comma-separated)");
        }
        Ok(sinks)
    }

    /// The sink's consumer group.
    pub fn group_id(&self) -> String {
        format!("webhook-{}", self.name)
    }
}

/// A URL for messages: no credentials, no query (a token may be there).
fn redacted(url: &url::Url) -> String {
    format!(
        "{}://{}{}{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.port().map(|p| format!(":{p}")).unwrap_or_default(),
        url.path()
    )
}

/// A Standard Webhooks signing secret (`whsec_` and base64); never shown.
#[derive(Clone)]
pub struct SigningSecret(Vec<u8>);

impl SigningSecret {
    pub fn parse(text: &str) -> anyhow::Result<SigningSecret> {
        let encoded = text
            .strip_prefix("whsec_")
            .context("a signing secret starts with whsec_")?;
        let key = BASE64
            .decode(encoded)
            .map_err(|_| anyhow::anyhow!("a signing secret is whsec_ and base64"))?;
        if key.len() < 16 {
            bail!("a signing secret needs at least 16 bytes of key");
        }
        Ok(SigningSecret(key))
    }

    /// `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-id` of an event: the same for every attempt.
pub fn webhook_id(record: &Record) -> String {
    format!(
        "evt_{}_{}_{}",
        record.topic, record.partition, record.offset
    )
}

/// The request body: the record's fields, serialised from the record (no
/// copy of its payload first).
pub fn body(record: &Record) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        topic: &'a str,
        partition: i32,
        offset: i64,
        key: Option<&'a str>,
        created_at: chrono::DateTime<chrono::Utc>,
        headers: &'a serde_json::Value,
        payload: &'a serde_json::Value,
    }
    serde_json::to_vec(&Body {
        topic: &record.topic,
        partition: record.partition,
        offset: record.offset,
        key: record.key.as_deref(),
        created_at: record.created_at,
        headers: &record.headers,
        payload: &record.payload,
    })
    .expect("JSON values serialise")
}

/// Bytes of a refusal's body kept in its dead letter.
const BODY_KEPT: usize = 256;

/// One sink: a [`Deliver`] for [`crate::group::delivery::Delivering`].
pub struct WebhookSink {
    url: url::Url,
    secret: SigningSecret,
    timeout: Duration,
    client: reqwest::Client,
    /// At most the sink's concurrency in flight: a backlog is not a
    /// thousand requests at once.
    slots: tokio::sync::Semaphore,
    /// `outbox_relay_webhook_responses_total` of this sink, by answer
    /// (looked up once, not per request).
    responses: HashMap<&'static str, prometheus::IntCounter>,
}

/// The answers `outbox_relay_webhook_responses_total` counts.
const ANSWER_CLASSES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "timeout", "error"];

impl WebhookSink {
    pub fn new(settings: &SinkSettings) -> anyhow::Result<WebhookSink> {
        let client = reqwest::Client::builder()
            .connect_timeout(settings.timeout / 3)
            .timeout(settings.timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(settings.concurrency)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("outbox-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the webhook HTTP client")?;
        Ok(WebhookSink {
            url: settings.url.clone(),
            secret: settings.secret.clone(),
            timeout: settings.timeout,
            client,
            slots: tokio::sync::Semaphore::new(settings.concurrency),
            responses: ANSWER_CLASSES
                .iter()
                .map(|class| {
                    let counter = responses().with_label_values(&[settings.name.as_str(), class]);
                    (*class, counter)
                })
                .collect(),
        })
    }

    fn count(&self, class: &str) {
        if let Some(counter) = self.responses.get(class) {
            counter.inc();
        }
    }
}

fn responses() -> &'static prometheus::IntCounterVec {
    static RESPONSES: std::sync::OnceLock<prometheus::IntCounterVec> = std::sync::OnceLock::new();
    RESPONSES.get_or_init(|| {
        crate::metrics::counter_vec(
            "outbox_relay_webhook_responses_total",
            "Webhook requests by sink and answer: 2xx, 3xx, 4xx, 5xx, \
             or timeout and error (no answer)",
            &["sink", "class"],
        )
    })
}

/// One event as a signed request: what every attempt at it sends.
pub struct Request {
    id: String,
    /// `Bytes`: each attempt sends the same body without a copy.
    body: Bytes,
    traceparent: Option<String>,
    /// The replay run that sends it again, if any.
    replay: Option<i64>,
}

impl Request {
    fn new(id: String, record: &Record, replay: Option<i64>) -> Request {
        Request {
            id,
            body: Bytes::from(body(record)),
            traceparent: record
                .headers
                .get(crate::trace_context::TRACEPARENT)
                .and_then(|v| v.as_str())
                .map(str::to_string),
            replay,
        }
    }
}

impl Deliver for WebhookSink {
    async fn attempt(&self, record: &Record) -> Attempt {
        let _slot = self.slots.acquire().await.expect("never closed");
        self.post(&Request::new(webhook_id(record), record, None))
            .await
    }
}

/// A replay sends each event again under an id of its own
/// (`<webhook-id>_replay_<run>`, the same for the run's attempts), with
/// the run's id in `outbox-relay-replay`: a receiver that drops repeats by
/// `webhook-id` takes a replayed event once, and can tell it is one.
impl crate::app::replay::ReplayTarget for WebhookSink {
    type Ready = Request;
    type Slot<'a> = tokio::sync::SemaphorePermit<'a>;

    fn event_id(&self, run_id: i64, record: &Record) -> String {
        format!("{}_replay_{run_id}", webhook_id(record))
    }

    fn prepare(&self, run_id: i64, record: &Record, event_id: &str) -> Result<Request, String> {
        Ok(Request::new(event_id.to_string(), record, Some(run_id)))
    }

    async fn slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.slots.acquire().await.expect("never closed")
    }

    async fn attempt<'a>(
        &'a self,
        request: &'a Request,
        slot: Option<tokio::sync::SemaphorePermit<'a>>,
    ) -> crate::app::replay::Outcome {
        use crate::app::replay::Outcome;
        let _slot = match slot {
            Some(slot) => slot,
            None => self.slots.acquire().await.expect("never closed"),
        };
        match self.post(request).await {
            Attempt::Delivered => Outcome::Sent,
            // A timeout too: the receiver drops a repeat by its id.
            Attempt::Retry { error, .. } => Outcome::Transient(error),
            Attempt::Park { reason, error } => Outcome::Permanent {
                reason,
                error: error.unwrap_or_default(),
            },
        }
    }
}

impl WebhookSink {
    /// One request, and what its answer means.
    async fn post(&self, event: &Request) -> Attempt {
        let id = &event.id;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut request = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                self.secret.sign(id, timestamp, &event.body),
            );
        if let Some(traceparent) = &event.traceparent {
            request = request.header(crate::trace_context::TRACEPARENT, traceparent);
        }
        if let Some(run) = event.replay {
            request = request.header("outbox-relay-replay", run.to_string());
        }
        let response = match request.body(event.body.clone()).send().await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                self.count("timeout");
                return Attempt::Retry {
                    error: format!(
                        "no answer within {:?}: the receiver may have it; sent again with the same webhook-id",
                        self.timeout
                    ),
                    after: None,
                };
            }
            Err(e) => {
                self.count("error");
                return Attempt::Retry {
                    error: format!("{e:#}"),
                    after: None,
                };
            }
        };
        let status = response.status();
        self.count(match status.as_u16() / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        });
        if status.is_success() {
            return Attempt::Delivered;
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // The first bytes of the answer only, read as they come: a receiver
        // streaming a large error page is not buffered whole.
        let mut response = response;
        let mut kept = Vec::new();
        while kept.len() < BODY_KEPT {
            match response.chunk().await {
                Ok(Some(chunk)) => kept.extend_from_slice(&chunk),
                _ => break,
            }
        }
        kept.truncate(BODY_KEPT);
        let text = String::from_utf8_lossy(&kept);
        let error = crate::clip::clip(&format!("HTTP {status}: {text}")).into_owned();
        match status.as_u16() {
            408 | 429 | 500..=599 => Attempt::Retry {
                error,
                after: retry_after,
            },
            _ => Attempt::Park {
                reason: format!("the receiver refused it (HTTP {})", status.as_u16()),
                error: Some(error),
            },
        }
    }
}

/// One sink as a role of the process: a member of its group delivering
/// under the group's policy.
pub type SinkConsumer = DeliveringConsumer<WebhookSink>;

impl SinkSettings {
    /// The sink's group: `webhook-<name>`, reading its topics on 2
    /// connections (the requests, not the reads, are what take time).
    fn consumer_config(&self) -> ConsumerConfig {
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        let mut config = ConsumerConfig::new(GroupConfig::new(&self.group_id(), &topics));
        config.read_connections = 2;
        config
    }

    /// Every connection the sink's member takes.
    pub fn connections(&self) -> usize {
        delivery::consumer_connections(&self.consumer_config())
    }
}

/// The sinks' group members, their connections reserved from `db`.
pub fn consumers(db: &Db, sinks: &[SinkSettings]) -> anyhow::Result<Vec<SinkConsumer>> {
    sinks
        .iter()
        .map(|sink| {
            let deliver = WebhookSink::new(sink)?;
            delivery::consumer(
                "webhook",
                db,
                sink.consumer_config(),
                deliver,
                RetryPolicy::default(),
            )
        })
        .collect()
}

/// Refuses sinks whose topics do not exist (once the schema is there).
pub async fn check_topics(
    client: &impl tokio_postgres::GenericClient,
    sinks: &[SinkSettings],
) -> anyhow::Result<()> {
    for sink in sinks {
        for topic in &sink.topics {
            match crate::log::topics::topic(client, topic).await {
                Ok(_) => {}
                Err(crate::log::LogError::UnknownTopic(_)) => {
                    bail!(
                        "{}: topic {topic:?} does not exist",
                        var(&sink.name, "TOPICS")
                    )
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn sinks_are_read_from_their_variables_and_bad_ones_refused() {
        let sinks = SinkSettings::from_env(
            "billing",
            env(&[
                (
                    "WEBHOOK_BILLING_URL",
                    "https://user:pw@billing.example.com/hooks?token=x",
                ),
                ("WEBHOOK_BILLING_SECRET", SECRET),
            ]),
        )
        .unwrap();
        assert_eq!(sinks[0].group_id(), "webhook-billing");
        assert_eq!(sinks[0].topics, ["order-created"]);
        let shown = format!("{:?}", sinks[0]);
        assert!(!shown.contains("pw") && !shown.contains("token"), "{shown}");
        for (vars, needle) in [
            (vec![], "WEBHOOK_BILLING_URL is not set"),
            (
                vec![
                    ("WEBHOOK_BILLING_URL", "ftp://x"),
                    ("WEBHOOK_BILLING_SECRET", SECRET),
                ],
                "not an http(s) URL",
            ),
            (
                vec![
                    ("WEBHOOK_BILLING_URL", "http://x"),
                    ("WEBHOOK_BILLING_SECRET", "hunter2"),
                ],
                "starts with whsec_",
            ),
        ] {
            let e = SinkSettings::from_env("billing", env(&vars)).unwrap_err();
            assert!(format!("{e:#}").contains(needle), "{e:#}");
            assert!(!format!("{e:#}").contains("hunter2"));
        }
        assert!(SinkSettings::from_env("Bad Name", env(&[])).is_err());
        assert!(SinkSettings::from_env("", env(&[])).is_err());
    }

    /// The example of the Standard Webhooks specification's libraries.
    #[test]
    fn signatures_follow_standard_webhooks() {
        let secret = SigningSecret::parse(SECRET).unwrap();
        let signature = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
