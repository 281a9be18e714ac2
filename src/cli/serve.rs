//! `serve`: the process's roles, supervised until Ctrl-C / SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clap::ValueEnum;

use super::parse;
use crate::app::mail::MailSettings;
use crate::app::webhook::SinkSettings;
pub use crate::builder::Role;
use crate::builder::{bind, Application, Settings, DEFAULT_MAX_DB_CONNECTIONS};
use crate::group::OffsetReset;
use crate::kafka::mirror::PreparedMirror;

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
    /// Milliseconds a busy relay (rows coming faster than 400 a second)
    /// waits after a batch began before the next: fewer, larger batches,
    /// for up to this much more latency; 0 never waits (0 to 1000).
    #[arg(long, env = "RELAY_GATHER_MS", default_value = "10", value_parser = parse::gather)]
    pub relay_gather_ms: Duration,
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
    #[command(flatten)]
    pub kafka_api: KafkaApiArgs,
    #[command(flatten)]
    pub console: ConsoleArgs,
}

/// Settings of the console role.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConsoleArgs {
    /// Serve the console on this address of its own (default: under
    /// /console on the API's address).
    #[arg(long, env = "CONSOLE_ADDR")]
    pub console_addr: Option<SocketAddr>,
    /// A token (16 characters or more) every console request must carry
    /// (logged in, or `Authorization: Bearer`); required off loopback.
    /// Grants every permission.
    #[arg(long, env = "CONSOLE_TOKEN", hide_env_values = true)]
    pub console_token: Option<String>,
    /// Console users: name:hash[:permissions] (permissions read, write,
    /// payloads; comma-separated; read alone by default), separated by
    /// spaces or lines, or @path to a file of them; hashes from
    /// `outbox-relay kafka-api hash-password`.
    #[arg(long, env = "CONSOLE_USERS", hide_env_values = true)]
    pub console_users: Option<String>,
    /// No write in the console: write routes answer 403, no write control
    /// is shown.
    #[arg(long)]
    pub console_read_only: bool,
    /// A read-only replica the console browses (default: the database).
    #[arg(long, env = "CONSOLE_DATABASE_URL", hide_env_values = true)]
    pub console_database_url: Option<String>,
}

impl ConsoleArgs {
    /// The console's settings; `mail` says where replays started from it
    /// send their mail (the process's own mail settings).
    pub fn settings(
        &self,
        mail: &MailArgs,
        data_dir: &Path,
    ) -> anyhow::Result<crate::console::ConsoleSettings> {
        let users = match &self.console_users {
            None => None,
            Some(given) => Some(match given.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading the console users from {path}: {e}"))?,
                None => given.clone(),
            }),
        };
        let mut replay_mail_args = vec![
            "--mail-from".to_string(),
            mail.mail_from.clone(),
            "--mail-currency".to_string(),
            mail.mail_currency.code().to_string(),
        ];
        if let Some(url) = &mail.smtp_url {
            replay_mail_args.extend(["--smtp-url".to_string(), url.clone()]);
        }
        if let Some(url) = &self.console_database_url {
            crate::db::parse_url(url)?;
        }
        Ok(crate::console::ConsoleSettings {
            listener: self.console_addr.map(bind).transpose()?,
            access: crate::console::auth::AccessSettings::new(
                self.console_token.clone(),
                users.as_deref(),
            )?,
            read_only: self.console_read_only,
            browse_url: self.console_database_url.clone(),
            replay_mail_args,
            data_dir: data_dir.to_path_buf(),
        })
    }
}

/// Settings of the kafka-api role.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaApiArgs {
    /// Address the Kafka protocol is served on (kafka-api role).
    #[arg(long, env = "KAFKA_LISTEN", default_value = "127.0.0.1:9092")]
    pub kafka_listen: SocketAddr,
    /// Host clients are told to connect to (default: the listen address;
    /// required when listening on all interfaces, e.g. behind NAT or in
    /// docker compose).
    #[arg(long, env = "KAFKA_ADVERTISED_HOST")]
    pub kafka_advertised_host: Option<String>,
    /// Port clients are told to connect to (default: the listen port).
    #[arg(long, env = "KAFKA_ADVERTISED_PORT")]
    pub kafka_advertised_port: Option<u16>,
    /// Serve the Kafka protocol off loopback without TLS and SASL (only on
    /// a network you trust).
    #[arg(long)]
    pub kafka_api_insecure: bool,
    /// PEM certificate chain: the Kafka protocol over TLS (with
    /// --kafka-tls-key).
    #[arg(long, env = "KAFKA_TLS_CERT", requires = "kafka_tls_key")]
    pub kafka_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --kafka-tls-cert.
    #[arg(long, env = "KAFKA_TLS_KEY", requires = "kafka_tls_cert")]
    pub kafka_tls_key: Option<std::path::PathBuf>,
    /// SASL/PLAIN users, required of every client when given:
    /// name:password-hash[:topics=prefix,…][:groups=prefix,…], separated by
    /// spaces or lines, or @path to a file of them. Hashes come from
    /// `outbox-relay kafka-api hash-password`. Never logged.
    #[arg(long, env = "KAFKA_API_USERS", hide_env_values = true)]
    pub kafka_api_users: Option<String>,
}

impl KafkaApiArgs {
    /// The bound listener, what clients are told, and its security,
    /// checked: off loopback, TLS and SASL both (or --kafka-api-insecure).
    pub fn settings(&self) -> anyhow::Result<crate::kafka_api::Listen> {
        use crate::kafka_api::security::{tls_acceptor, Security, Users};
        let ip = self.kafka_listen.ip();
        let users = match &self.kafka_api_users {
            None => None,
            Some(given) => {
                let text = match given.strip_prefix('@') {
                    Some(path) => std::fs::read_to_string(path).map_err(|e| {
                        anyhow::anyhow!("reading the Kafka API users from {path}: {e}")
                    })?,
                    None => given.clone(),
                };
                Some(std::sync::Arc::new(Users::parse(&text)?))
            }
        };
        let tls = match (&self.kafka_tls_cert, &self.kafka_tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        if !ip.is_loopback() && !self.kafka_api_insecure && (users.is_none() || tls.is_none()) {
            anyhow::bail!(
                "--kafka-listen {}: off loopback the Kafka API needs TLS (--kafka-tls-cert/--kafka-tls-key) \
                 and SASL users (--kafka-api-users), or --kafka-api-insecure on a network you trust",
                self.kafka_listen
            );
        }
        let host = match (&self.kafka_advertised_host, ip.is_unspecified()) {
            (Some(host), _) => host.clone(),
            (None, false) => ip.to_string(),
            (None, true) => anyhow::bail!(
                "--kafka-listen {} listens on every interface: say what clients connect to with \
                 --kafka-advertised-host (KAFKA_ADVERTISED_HOST)",
                self.kafka_listen
            ),
        };
        let listener = bind(self.kafka_listen)?;
        let port = match self.kafka_advertised_port {
            Some(port) => port,
            None => listener.local_addr()?.port(),
        };
        Ok(crate::kafka_api::Listen {
            listener,
            advertised: crate::kafka_api::Advertised { host, port },
            security: Security { tls, users },
        })
    }
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

/// Every role of `args` checked and its ports bound, before anything starts.
pub fn settings(args: &ServeArgs, data_dir: &Path) -> anyhow::Result<Settings> {
    let has = |role| args.roles.contains(&role);
    Ok(Settings {
        mail: has(Role::Mail)
            .then(|| args.mail.settings(data_dir))
            .transpose()?,
        api: has(Role::Api).then(|| bind(args.http_addr)).transpose()?,
        relay: has(Role::Relay).then_some((args.relay_lease_secs, args.relay_gather_ms)),
        kafka: has(Role::Kafka)
            .then(|| PreparedMirror::new(args.kafka.settings()?))
            .transpose()?,
        webhooks: match has(Role::Webhook) {
            true => SinkSettings::from_env(args.webhook_sinks.as_deref().unwrap_or(""), |name| {
                std::env::var(name).ok()
            })?,
            false => Vec::new(),
        },
        kafka_api: has(Role::KafkaApi)
            .then(|| args.kafka_api.settings())
            .transpose()?,
        console: has(Role::Console)
            .then(|| args.console.settings(&args.mail, data_dir))
            .transpose()?,
        metrics: args.metrics_addr.map(bind).transpose()?,
        migrate: !args.no_migrate,
        max_db_connections: args.max_db_connections,
    })
}

pub async fn run(url: &str, settings: Settings) -> anyhow::Result<()> {
    Application::start(settings, url)
        .await?
        .run_until_signal()
        .await
}
