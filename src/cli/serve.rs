//! `serve`: the process's roles, supervised until Ctrl-C / SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;

use super::parse;
use crate::app::mail::MailSettings;
use crate::db::Db;
use crate::group::OffsetReset;
use crate::log::notify::OutboxNotifier;
use crate::outbox::OutboxWritten;
use crate::service::Supervisor;

/// A role a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The order API (POST /orders, GET /orders/{id}) and /metrics.
    Api,
    /// The relay (outbox → event log; one leader among all relay processes) and its upkeep.
    Relay,
    /// The mail worker: consumer group mail-service sending order confirmations.
    Mail,
    /// The Kafka mirror: the log's topics copied into a Kafka cluster
    /// (KAFKA_BROKERS), same partitions and keys. Off unless named.
    Kafka,
    /// Webhook sinks (WEBHOOK_SINKS): each event POSTed to a URL, signed
    /// (Standard Webhooks), each sink a consumer group. Off unless named.
    Webhook,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Roles to run in this process, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "api,relay,mail"
    )]
    pub roles: Vec<Role>,
    /// Address of the HTTP API (api role), which also serves /metrics.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Address serving only /healthz, /readyz and /metrics: for a process
    /// without the api role (a relay or mail worker of its own) that
    /// Prometheus scrapes.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Do not apply migrations on start (the schema must then be current).
    #[arg(long)]
    pub no_migrate: bool,
    /// Seconds a relay lease lasts; a standby takes over after it expires (0.1 to 3600).
    #[arg(long, default_value = "3", value_parser = parse::lease)]
    pub relay_lease_secs: Duration,
    /// Most database connections this process may open, all roles together
    /// (the roles' needs are checked against it at start).
    #[arg(long, env = "MAX_DB_CONNECTIONS", default_value_t = DEFAULT_MAX_DB_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_db_connections: u32,
    #[command(flatten)]
    pub mail: MailArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Webhook sinks for the webhook role, comma-separated names; each is
    /// configured by WEBHOOK_<NAME>_URL, _SECRET (whsec_…), _TOPICS
    /// (default order-created) and _TIMEOUT_SECS (default 10).
    #[arg(long, env = "WEBHOOK_SINKS")]
    pub webhook_sinks: Option<String>,
}

/// Settings of the kafka role.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers for the kafka role: host:port[,host:port…].
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// librdkafka settings passed through (SASL, TLS, tuning):
    /// key=value,key=value, or @path to a file with one key=value per
    /// line. Values are never logged. enable.idempotence and acks stay
    /// true and all.
    #[arg(long, env = "KAFKA_CONFIG", hide_env_values = true)]
    pub kafka_config: Option<String>,
    /// Log topics to mirror, comma-separated (default: every topic of the
    /// log when the role starts).
    #[arg(long, value_delimiter = ',')]
    pub kafka_topics: Vec<String>,
    /// Kafka topic names where they differ from the log's:
    /// log-topic=kafka-topic,… (default: the same name).
    #[arg(long, env = "KAFKA_TOPIC_MAP")]
    pub kafka_topic_map: Option<String>,
    /// Create a Kafka topic that does not exist, with the log topic's
    /// partition count (default: refuse to start without it).
    #[arg(long)]
    pub kafka_create_topics: bool,
    /// Replication factor of topics created by --kafka-create-topics (1 to 32).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=32))]
    pub kafka_replication_factor: i32,
}

impl KafkaArgs {
    /// Checks every kafka setting (librdkafka checks its own when the
    /// producer is built, also before anything starts).
    pub fn settings(&self) -> anyhow::Result<crate::kafka::KafkaSettings> {
        let brokers = self.kafka_brokers.as_deref().ok_or_else(|| {
            anyhow::anyhow!("the kafka role needs KAFKA_BROKERS (or --kafka-brokers host:port)")
        })?;
        let mut settings = crate::kafka::KafkaSettings::new(brokers)?;
        if let Some(config) = &self.kafka_config {
            settings.config = crate::kafka::parse_config(config)?;
        }
        if let Some(map) = &self.kafka_topic_map {
            settings.topic_map = crate::kafka::parse_topic_map(map)?;
        }
        settings.topics = self
            .kafka_topics
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        settings.create_topics = self.kafka_create_topics;
        settings.replication_factor = self.kafka_replication_factor;
        // Fails here on a setting librdkafka does not know.
        settings.client_config()?;
        Ok(settings)
    }
}

/// Enough for every role in one process (api 16, relay 4, mail 27, kafka
/// 11, and 2 for `--metrics-addr`).
pub const DEFAULT_MAX_DB_CONNECTIONS: u32 = 64;

/// The order API's pool.
const API_POOL_SIZE: usize = 16;
/// The pool of `--metrics-addr` (a scrape at a time, and /readyz).
const METRICS_POOL_SIZE: usize = 2;
/// The mail worker's pool (ledger reads and writes, dead letters), and
/// its group's reads and commits, when the budget allows.
const MAIL_POOL_SIZE: usize = 16;
const MAIL_READ_CONNECTIONS: usize = 8;
/// A group member's own connections: heartbeats and claims (2), LISTEN (1).
const MEMBER_OWN_CONNECTIONS: usize = 3;
/// The kafka role's group member (reads 8 and its own 3).
const KAFKA_CONNECTIONS: usize = 8 + MEMBER_OWN_CONNECTIONS;

/// The mail role's reads-and-commits and ledger connections within `left`
/// (what `--max-db-connections` leaves it): the defaults if they fit, else
/// both shrunk (a third to reads), at least 2 each. The member's own
/// connections are never shrunk, so a burst of mails that takes every
/// ledger connection cannot delay a heartbeat or a commit; waiting for a
/// connection is back-pressure.
fn mail_connections(left: Option<usize>) -> (usize, usize) {
    let shared = left.map_or(usize::MAX, |left| {
        left.saturating_sub(MEMBER_OWN_CONNECTIONS)
    });
    if shared >= MAIL_READ_CONNECTIONS + MAIL_POOL_SIZE {
        return (MAIL_READ_CONNECTIONS, MAIL_POOL_SIZE);
    }
    let reads = (shared / 3).max(2);
    (reads, shared.saturating_sub(reads).max(2))
}

/// `auto.offset.reset` for a group's partitions without a committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OffsetResetArg {
    /// The log start offset: nothing already in the log is missed.
    Earliest,
    /// The log end offset: only records appended from now on.
    Latest,
}

/// Settings of the mail worker role.
#[derive(Debug, Clone, clap::Args)]
pub struct MailArgs {
    /// Where mails go: smtp://host:port, smtp+starttls://user:pass@host:587,
    /// smtps://user:pass@host:465 or file:///dir. Unset: .eml files in
    /// <data-dir>/mail.
    #[arg(long, env = "SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// Sender address of the confirmation mails (one plain address).
    #[arg(long, env = "MAIL_FROM", default_value = "shop@example.com")]
    pub mail_from: String,
    /// Currency of the order amounts (ISO 4217): the API takes amounts in
    /// its minor unit, the mail shows them as money (1099 → 10.99 EUR).
    #[arg(long, env = "MAIL_CURRENCY", default_value = crate::app::mail::Currency::DEFAULT,
          value_parser = crate::app::mail::Currency::parse)]
    pub mail_currency: crate::app::mail::Currency,
    /// SMTP connections kept in the pool (1 to 1000).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub smtp_pool_size: u32,
    /// Seconds without a heartbeat before a group member's partitions move (0.3 to 1800).
    #[arg(long, default_value = "10", value_parser = parse::session_timeout)]
    pub session_timeout_secs: Duration,
    /// Static membership in the mail group (Kafka's group.instance.id): a
    /// fixed member id per process, so a restarted process takes its
    /// partitions back at once instead of after the session timeout. Give
    /// every process its own (e.g. mail-1, mail-2).
    #[arg(long, env = "GROUP_INSTANCE_ID", value_parser = parse::instance_id)]
    pub group_instance_id: Option<String>,
    /// Where the mail group starts in a partition it has no committed offset
    /// for: `earliest` (no order missed) or `latest` (only new orders).
    #[arg(long, value_enum, default_value_t = OffsetResetArg::Earliest)]
    pub mail_offset_reset: OffsetResetArg,
    /// Seconds to wait for the SMTP server at each step before the message
    /// (connect, greeting, MAIL, RCPT, DATA); past it the attempt failed and
    /// is retried (0.1 to 600). Plain smtp:// only: the TLS transports have
    /// one limit for every step, --smtp-final-reply-timeout-secs.
    #[arg(long, default_value = "15", value_parser = parse::smtp_timeout)]
    pub smtp_timeout_secs: Duration,
    /// Seconds to wait for the final answer once the message was sent (RFC
    /// 5321: 10 minutes); past it the outcome is unknown, not a failure
    /// (0.1 to 3600).
    #[arg(long, default_value = "600", value_parser = parse::smtp_final_reply_timeout)]
    pub smtp_final_reply_timeout_secs: Duration,
    /// How long after its first failed attempt a mail is still retried
    /// (like an MTA's queue lifetime): 90s, 15m, 24h, 7d; 1s to 30d.
    #[arg(long, default_value = "24h", value_parser = parse::retry_for)]
    pub mail_retry_for: Duration,
    /// Also stop after this many attempts (1 to 100000; default: no limit
    /// but --mail-retry-for).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=100_000))]
    pub mail_max_attempts: Option<i32>,
}

impl MailArgs {
    /// Checks every mail setting; `data_dir` holds the default `.eml` folder.
    pub fn settings(&self, data_dir: &Path) -> anyhow::Result<MailSettings> {
        let mut settings = MailSettings::new(self.smtp_url.as_deref(), &self.mail_from, data_dir)?;
        settings.letterhead.currency = self.mail_currency.clone();
        settings.pool_size = self.smtp_pool_size;
        settings.limits = crate::app::mail::Limits {
            command: self.smtp_timeout_secs,
            final_reply: self.smtp_final_reply_timeout_secs,
        };
        settings.retry.max_attempts = self.mail_max_attempts;
        settings.retry.retry_for = self.mail_retry_for;
        settings.instance_id = self.group_instance_id.clone();
        settings.session_timeout = self.session_timeout_secs;
        settings.offset_reset = match self.mail_offset_reset {
            OffsetResetArg::Earliest => OffsetReset::Earliest,
            OffsetResetArg::Latest => OffsetReset::Latest,
        };
        Ok(settings)
    }
}

fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// What a process will run, with every setting checked and the HTTP port
/// already bound: built before the database is opened.
pub struct Plan {
    pub roles: Vec<Role>,
    pub listener: Option<std::net::TcpListener>,
    /// The operational endpoints' own listener (`--metrics-addr`).
    pub metrics_listener: Option<std::net::TcpListener>,
    pub migrate: bool,
    pub relay_lease: Duration,
    pub max_db_connections: u32,
    pub mail: Option<MailSettings>,
    /// The kafka role, its producer built.
    pub kafka: Option<crate::kafka::mirror::PreparedMirror>,
    /// The webhook role's sinks.
    pub webhooks: Vec<crate::app::webhook::SinkSettings>,
}

impl Plan {
    pub fn new(args: &ServeArgs, data_dir: &Path) -> anyhow::Result<Plan> {
        let mut plan = Plan::for_roles(
            &args.roles,
            args.http_addr,
            !args.no_migrate,
            args.relay_lease_secs,
            &args.mail,
            data_dir,
        )?;
        if args.roles.contains(&Role::Kafka) {
            plan.kafka = Some(crate::kafka::mirror::PreparedMirror::new(
                args.kafka.settings()?,
            )?);
        }
        if args.roles.contains(&Role::Webhook) {
            plan.webhooks = crate::app::webhook::SinkSettings::from_env(
                args.webhook_sinks.as_deref().unwrap_or(""),
                |name| std::env::var(name).ok(),
            )?;
        }
        plan.max_db_connections = args.max_db_connections;
        if let Some(addr) = args.metrics_addr {
            plan.metrics_listener = Some(bind(addr)?);
        }
        Ok(plan)
    }

    pub fn for_roles(
        roles: &[Role],
        http_addr: SocketAddr,
        migrate: bool,
        relay_lease: Duration,
        mail: &MailArgs,
        data_dir: &Path,
    ) -> anyhow::Result<Plan> {
        let mail = if roles.contains(&Role::Mail) {
            Some(mail.settings(data_dir)?)
        } else {
            None
        };
        let listener = if roles.contains(&Role::Api) {
            Some(bind(http_addr)?)
        } else {
            None
        };
        Ok(Plan {
            roles: roles.to_vec(),
            listener,
            metrics_listener: None,
            migrate,
            relay_lease,
            max_db_connections: DEFAULT_MAX_DB_CONNECTIONS,
            mail,
            kafka: None,
            webhooks: Vec::new(),
        })
    }

    /// The bound API address, if the plan has the api role.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Migrates (unless told not to), builds every role, then starts them.
    pub async fn start(self, url: &str) -> anyhow::Result<Supervisor> {
        // Build everything first (no I/O yet): a failure here starts nothing.
        let db = Db::new(url, Some(self.max_db_connections as usize))?;
        let api_pool = match &self.listener {
            Some(_) => Some(db.pool("api", API_POOL_SIZE)?),
            None => None,
        };
        let metrics_pool = match &self.metrics_listener {
            Some(_) => Some(db.pool("metrics", METRICS_POOL_SIZE)?),
            None => None,
        };
        let relay = if self.roles.contains(&Role::Relay) {
            let config = crate::relay::RelayConfig {
                lease_ttl: self.relay_lease,
                ..crate::relay::RelayConfig::default()
            };
            db.reserve("relay (and its read-ahead)", 2)?;
            db.reserve("relay upkeep", 1)?;
            db.reserve("relay wake-ups (LISTEN outbox_written)", 1)?;
            let relay = crate::relay::Relay::new(&db, config);
            let maintenance = crate::relay::Maintenance::new(&relay);
            Some((relay, maintenance))
        } else {
            None
        };
        let mail = match &self.mail {
            Some(settings) => {
                tracing::info!(transport = %settings.target, "mail worker ready");
                // What the roles built after this one need.
                let others = self.webhooks.len() * crate::app::webhook::CONNECTIONS_PER_SINK
                    + if self.kafka.is_some() {
                        KAFKA_CONNECTIONS
                    } else {
                        0
                    };
                let (reads, ledger) =
                    mail_connections(db.remaining().map(|left| left.saturating_sub(others)));
                let mut consumer = settings.consumer_config();
                consumer.read_connections = reads;
                let worker = crate::app::mail::MailWorker::from_settings(
                    db.bounded_pool("mail worker", ledger, consumer.group.session_bounds())?,
                    settings,
                )?;
                Some(crate::group::consumer::Consumer::new(
                    "mail",
                    &db,
                    consumer,
                    Arc::new(worker),
                )?)
            }
            None => None,
        };
        let webhooks = crate::app::webhook::consumers(&db, &self.webhooks)?;
        // Orders placed here wake the relay directly when it runs here too,
        // else through `NOTIFY outbox_written` on a connection of its own.
        let outbox_written = match (&relay, &api_pool) {
            (_, None) => None,
            (Some((relay, _)), Some(_)) => Some(OutboxWritten::Relay(relay.wakeup())),
            (None, Some(_)) => {
                db.reserve("API's NOTIFY outbox_written", 1)?;
                Some(OutboxWritten::Notify(OutboxNotifier::start(url)?))
            }
        };
        tracing::debug!(connections = db.reserved_total(), reserved = ?db.reservations(), "database connection budget");

        if self.migrate {
            crate::migrate::apply_all(url).await?;
        } else {
            crate::migrate::require_current(url).await?;
        }
        if !self.webhooks.is_empty() {
            let client = db.connect().await?;
            crate::app::webhook::check_topics(&client, &self.webhooks).await?;
        }
        // The mirror's topics are the log's, read once the schema is there.
        let kafka = match self.kafka {
            Some(prepared) => {
                let client = db.connect().await?;
                let topics = prepared.topics(&client).await?;
                drop(client);
                Some(prepared.build(&db, topics)?)
            }
            None => None,
        };
        let api = match (self.listener, api_pool) {
            (Some(listener), Some(pool)) => {
                crate::db::check(&pool).await?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                tracing::info!(addr = %listener.local_addr()?, "order API listening");
                Some(crate::http::HttpService::api(
                    listener,
                    pool,
                    outbox_written.unwrap_or_default(),
                ))
            }
            _ => None,
        };
        let metrics_endpoint = match (self.metrics_listener, metrics_pool) {
            (Some(listener), Some(pool)) => {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                tracing::info!(addr = %listener.local_addr()?, "metrics listening");
                Some(crate::http::HttpService::operational(listener, pool))
            }
            _ => None,
        };

        let mut supervisor = Supervisor::new();
        if let Some(api) = api {
            supervisor.start(api);
        }
        if let Some(endpoint) = metrics_endpoint {
            supervisor.start(endpoint);
        }
        if let Some((relay, maintenance)) = relay {
            let wakeup = relay.wakeup();
            crate::log::notify::listen_outbox_written(url, move || wakeup.wake())?;
            supervisor.start(relay);
            supervisor.start(maintenance);
        }
        if let Some(mail) = mail {
            supervisor.start(mail);
        }
        if let Some(kafka) = kafka {
            supervisor.start(kafka);
        }
        for sink in webhooks {
            supervisor.start(sink);
        }
        Ok(supervisor)
    }
}

pub async fn run(url: &str, plan: Plan) -> anyhow::Result<()> {
    plan.start(url).await?.run_until_signal().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mail_role_shrinks_its_shared_connections_to_the_budget_never_its_own() {
        assert_eq!(mail_connections(None), (8, 16));
        assert_eq!(mail_connections(Some(64)), (8, 16));
        assert_eq!(mail_connections(Some(27)), (8, 16));
        assert_eq!(mail_connections(Some(20)), (5, 12));
        // 3 of the member's own, 2 for reads and commits, 3 for the ledger.
        assert_eq!(mail_connections(Some(8)), (2, 3));
        // Below the minimum: the budget check refuses it with the figures.
        assert_eq!(mail_connections(Some(5)), (2, 2));
    }
}
