//! The `outbox-relay` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};

use crate::embedded::{ClusterOptions, EmbeddedPostgres};
use crate::event_log;
use crate::relay::{Relay, RelayConfig};
use crate::shutdown;

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Transactional outbox relay on Postgres"
)]
pub struct Cli {
    /// Postgres URL. When unset, a private cluster is started from the
    /// locally installed Postgres binaries, with its data in --data-dir.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,

    /// Data directory of the embedded cluster (used without DATABASE_URL).
    #[arg(
        long,
        env = "OUTBOX_RELAY_DATA_DIR",
        default_value = ".outbox-relay",
        global = true
    )]
    pub data_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending schema migrations.
    Migrate,
    /// Run the service roles until Ctrl-C / SIGTERM.
    Serve(ServeArgs),
    /// Run the pipeline, place a few sample orders and show where they went.
    Demo(DemoArgs),
    /// Inspect or create topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Print records of a topic, one JSON object per line.
    Tail(TailArgs),
    /// Inspect consumer groups (like kafka-consumer-groups).
    #[command(subcommand)]
    Groups(GroupsCommand),
    /// List, retry or discard dead letters.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
}

#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// List consumer groups.
    List {
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// State, members, and per partition: committed offset, log end offset, lag, owner.
    Describe {
        group: String,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Parked dead letters.
    List {
        #[arg(long)]
        group: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Publish a dead letter's record again (a new event with a `retry-of` header).
    Retry {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Retry every parked dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Mark a dead letter as discarded.
    Discard { id: i64 },
}

/// Settings of the mail worker role.
#[derive(Debug, Clone, clap::Args)]
pub struct MailArgs {
    /// smtp://host:port, smtp+starttls://user:pass@host:587, smtps://user:pass@host:465
    /// or file:///dir. Unset: .eml files in <data-dir>/mail.
    #[arg(long, env = "SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// Sender of the confirmation mails.
    #[arg(long, env = "MAIL_FROM", default_value = "shop@example.com")]
    pub mail_from: String,
    /// SMTP connections kept in the pool.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub smtp_pool_size: u32,
    /// Seconds without a heartbeat before a group member's partitions move.
    #[arg(long, default_value = "10", value_parser = parse_session_timeout)]
    pub session_timeout_secs: Duration,
    /// Where the mail group starts in a partition it has no committed offset
    /// for: `earliest` (no order missed) or `latest` (only new orders).
    #[arg(long, value_enum, default_value_t = crate::group::OffsetReset::Earliest)]
    pub mail_offset_reset: crate::group::OffsetReset,
    /// Seconds an SMTP exchange may take before it counts as a transient failure.
    #[arg(long, default_value = "15", value_parser = parse_smtp_timeout)]
    pub smtp_timeout_secs: Duration,
    /// Send attempts before a mail is parked as a dead letter.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub mail_max_attempts: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Api,
    Relay,
    Mail,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Roles to run in this process.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "api,relay,mail"
    )]
    pub roles: Vec<Role>,
    /// Address of the HTTP API.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Do not apply migrations on start.
    #[arg(long)]
    pub no_migrate: bool,
    /// Seconds a relay lease lasts; a standby takes over after it expires.
    #[arg(long, default_value = "3", value_parser = parse_lease)]
    pub relay_lease_secs: Duration,
    #[command(flatten)]
    pub mail: MailArgs,
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Address of the HTTP API.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Number of sample orders to place.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub orders: u32,
    /// Exit after showing the sample orders instead of serving until Ctrl-C.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub mail: MailArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// List topics.
    List {
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Per partition: log start offset and log end offset.
    Describe {
        topic: String,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Create a topic.
    Create {
        topic: String,
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(i32).range(1..=10_000))]
        partitions: i32,
        /// Retention in days (at most 36500).
        #[arg(long, default_value = "35", value_parser = parse_retention_days)]
        retention_days: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TailOutput {
    Json,
}

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    pub topic: String,
    /// Only this partition (default: all).
    #[arg(long)]
    pub partition: Option<i32>,
    /// Start offset in every partition read (clamped to the log start).
    #[arg(long, conflicts_with = "from_time")]
    pub from_offset: Option<i64>,
    /// Start at the first record created at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub from_time: Option<DateTime<Utc>>,
    /// Stop after this many records.
    #[arg(long)]
    pub max: Option<u64>,
    /// Keep waiting for new records.
    #[arg(long)]
    pub follow: bool,
    #[arg(long, value_enum, default_value_t = TailOutput::Json)]
    pub output: TailOutput,
}

/// Parses a number of `unit_name`s (each `unit` seconds) within `range`
/// (and above 0) as a duration; `out_of_range` is the error when it is not.
fn bounded_duration(
    s: &str,
    range: std::ops::RangeInclusive<f64>,
    (unit, unit_name): (f64, &str),
    out_of_range: &str,
) -> Result<Duration, String> {
    let value: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of {unit_name}"))?;
    if !(value > 0.0 && range.contains(&value)) {
        return Err(out_of_range.to_string());
    }
    Ok(Duration::from_secs_f64(value * unit))
}

const SECONDS: (f64, &str) = (1.0, "seconds");

fn parse_lease(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        0.1..=3600.0,
        SECONDS,
        "the lease must be between 0.1 and 3600 seconds",
    )
}

fn parse_smtp_timeout(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        0.1..=600.0,
        SECONDS,
        "the SMTP timeout must be between 0.1 and 600 seconds",
    )
}

fn parse_session_timeout(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        0.3..=1800.0,
        SECONDS,
        "the session timeout must be between 0.3 and 1800 seconds",
    )
}

fn parse_retention_days(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        0.0..=36_500.0,
        (86_400.0, "days"),
        "retention must be more than 0 and at most 36500 days",
    )
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time such as 2026-11-01T00:00:00Z ({e})"))
}

/// The database a command talks to: the given URL, or the embedded cluster.
struct Database {
    url: String,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    async fn open(cli: &Cli, announce: bool) -> anyhow::Result<Database> {
        if let Some(url) = &cli.database_url {
            return Ok(Database {
                url: url.clone(),
                embedded: None,
            });
        }
        let options = ClusterOptions {
            data_dir: cli.data_dir.clone(),
            durable: true,
            extra_settings: Vec::new(),
        };
        let cluster =
            tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&options)).await??;
        crate::embedded::ensure_database(&cluster.url("postgres"), "outbox").await?;
        let url = cluster.url("outbox");
        if announce {
            eprintln!(
                "DATABASE_URL is not set: using the embedded Postgres in {} ({url})",
                cluster.data_dir().display()
            );
        }
        Ok(Database {
            url,
            embedded: Some(cluster),
        })
    }

    /// Stops the embedded server if this process started it (another
    /// `serve` may be using one it found running).
    fn close(self) {
        if let Some(cluster) = self.embedded.filter(|c| c.started_here) {
            if let Err(e) = cluster.stop() {
                eprintln!("warning: could not stop the embedded Postgres: {e:#}");
            }
        }
    }
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let announce = matches!(cli.command, Command::Serve(_) | Command::Demo(_));
    let db = Database::open(&cli, announce).await?;
    let result = match &cli.command {
        Command::Migrate => migrate(&db.url).await,
        Command::Serve(args) => serve(&db.url, args, &cli.data_dir).await,
        Command::Demo(args) => demo(&db.url, args, &cli).await,
        Command::Topics(cmd) => topics(&db.url, cmd).await,
        Command::Tail(args) => tail(&db.url, args).await,
        Command::Groups(cmd) => groups(&db.url, cmd).await,
        Command::DeadLetters(cmd) => dead_letters(&db.url, cmd).await,
    };
    db.close();
    result
}

async fn migrate(url: &str) -> anyhow::Result<()> {
    let applied = apply_migrations(url).await?;
    if applied.is_empty() {
        println!(
            "schema is current (version {})",
            crate::migrate::latest_version()
        );
    } else {
        println!("applied migrations {applied:?}");
    }
    Ok(())
}

/// Migrations plus the log's day partitions.
pub async fn apply_migrations(url: &str) -> anyhow::Result<Vec<i32>> {
    let mut client = crate::db::connect(url).await?;
    let applied = crate::migrate::run(&mut client).await?;
    let tx = client.transaction().await?;
    event_log::ensure_day_partitions(&tx).await?;
    tx.commit().await?;
    Ok(applied)
}

/// Handles of the roles a process runs.
struct Running {
    tasks: Vec<(&'static str, tokio::task::JoinHandle<anyhow::Result<()>>)>,
    trigger: shutdown::ShutdownTrigger,
    http_addr: Option<SocketAddr>,
}

/// What `serve` and `demo` start.
struct RoleSettings<'a> {
    roles: &'a [Role],
    http_addr: SocketAddr,
    lease: Duration,
    mail: &'a MailArgs,
    data_dir: &'a std::path::Path,
}

async fn start_roles(url: &str, settings: &RoleSettings<'_>) -> anyhow::Result<Running> {
    let (roles, http_addr, lease) = (settings.roles, settings.http_addr, settings.lease);
    let (trigger, shutdown) = shutdown::channel();
    let mut tasks = Vec::new();
    let mut bound = None;
    if roles.contains(&Role::Api) {
        let pool = crate::db::pool(url, 16)?;
        crate::db::check(&pool).await?;
        let listener = tokio::net::TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("cannot listen on {http_addr}"))?;
        bound = Some(listener.local_addr()?);
        tracing::info!(addr = %listener.local_addr()?, "order API listening");
        let s = shutdown.clone();
        tasks.push(("api", tokio::spawn(crate::http::serve(listener, pool, s))));
    }
    if roles.contains(&Role::Relay) {
        let config = RelayConfig {
            lease_ttl: lease,
            ..RelayConfig::default()
        };
        let relay_name = config.relay_name.clone();
        let relay = Relay::new(url, config);
        let leadership = relay.leadership();
        let s = shutdown.clone();
        tasks.push((
            "relay",
            tokio::spawn(async move {
                relay.run(s).await;
                Ok(())
            }),
        ));
        let s = shutdown.clone();
        let url = url.to_string();
        tasks.push((
            "maintenance",
            tokio::spawn(async move {
                crate::relay::run_maintenance(url, relay_name, leadership, s).await;
                Ok(())
            }),
        ));
    }
    if roles.contains(&Role::Mail) {
        let mail = settings.mail;
        let target = match &mail.smtp_url {
            Some(url) => crate::mail::SmtpTarget::parse(url)?,
            None => crate::mail::SmtpTarget::Files {
                dir: std::path::absolute(settings.data_dir.join("mail"))?,
            },
        };
        let from: lettre::message::Mailbox = crate::order::EmailAddress::parse(&mail.mail_from)
            .map_err(|e| anyhow::anyhow!("MAIL_FROM: {e}"))?
            .as_str()
            .parse()?;
        tracing::info!(transport = %target, "mail worker sends through {target}");
        let worker = crate::mail::MailWorker::new(
            crate::db::pool(url, 16)?,
            target.transport(mail.smtp_pool_size, mail.smtp_timeout_secs)?,
            from,
            crate::mail::RetryPolicy {
                max_attempts: mail.mail_max_attempts,
                ..Default::default()
            },
        );
        let mut group = crate::group::GroupConfig::new(
            crate::mail::MAIL_GROUP,
            &[crate::order::ORDER_CREATED_TOPIC],
        );
        group.session_timeout = mail.session_timeout_secs;
        group.offset_reset = mail.mail_offset_reset;
        group.heartbeat_interval = (mail.session_timeout_secs / 5).min(Duration::from_secs(1));
        let consumer = crate::consumer::ConsumerConfig::new(group);
        let s = shutdown.clone();
        let url = url.to_string();
        tasks.push((
            "mail",
            tokio::spawn(async move {
                crate::consumer::run(&url, consumer, std::sync::Arc::new(worker), s).await
            }),
        ));
    }
    Ok(Running {
        tasks,
        trigger,
        http_addr: bound,
    })
}

impl Running {
    /// Waits for Ctrl-C / SIGTERM or for a role to stop, then stops all.
    async fn wait(mut self) -> anyhow::Result<()> {
        let failure = {
            let any_exit = futures_util::future::select_all(self.tasks.iter_mut().map(|(_, t)| t));
            tokio::select! {
                _ = shutdown::signal() => None,
                (result, index, _) = any_exit => Some((index, result)),
            }
        };
        self.trigger.trigger();
        let mut error = None;
        if let Some((index, result)) = failure {
            let name = self.tasks[index].0;
            error = Some(match result {
                Ok(Ok(())) => anyhow::anyhow!("the {name} role stopped unexpectedly"),
                Ok(Err(e)) => e.context(format!("the {name} role failed")),
                Err(e) => anyhow::anyhow!("the {name} role panicked: {e}"),
            });
            self.tasks.remove(index);
        }
        for (_, task) in self.tasks {
            let _ = task.await;
        }
        error.map_or(Ok(()), Err)
    }
}

async fn serve(url: &str, args: &ServeArgs, data_dir: &std::path::Path) -> anyhow::Result<()> {
    if !args.no_migrate {
        apply_migrations(url).await?;
    }
    let running = start_roles(
        url,
        &RoleSettings {
            roles: &args.roles,
            http_addr: args.http_addr,
            lease: args.relay_lease_secs,
            mail: &args.mail,
            data_dir,
        },
    )
    .await?;
    running.wait().await
}

async fn demo(url: &str, args: &DemoArgs, cli: &Cli) -> anyhow::Result<()> {
    apply_migrations(url).await?;
    let running = start_roles(
        url,
        &RoleSettings {
            roles: &[Role::Api, Role::Relay, Role::Mail],
            http_addr: args.http_addr,
            lease: Duration::from_secs(3),
            mail: &args.mail,
            data_dir: &cli.data_dir,
        },
    )
    .await?;
    let addr = running.http_addr.context("the API did not start")?;
    let placed = place_sample_orders(addr, args.orders).await?;
    println!("placed {} sample orders: {placed:?}", placed.len());

    // Wait (with a deadline) until the relay moved them into the log.
    let client = crate::db::connect(url).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let ids: Vec<String> = placed.iter().map(|id| id.to_string()).collect();
    loop {
        let rows = client
            .query(
                "SELECT partition, \"offset\", key, payload FROM event_log
                 WHERE topic = 'order-created' AND key = ANY($1) ORDER BY key::bigint",
                &[&ids],
            )
            .await?;
        if rows.len() == ids.len() {
            println!("\nin the event log (topic order-created):");
            for r in rows {
                let payload: serde_json::Value = r.get(3);
                println!(
                    "  partition {} offset {} key {}  {}",
                    r.get::<_, i32>(0),
                    r.get::<_, i64>(1),
                    r.get::<_, String>(2),
                    payload
                );
            }
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the relay did not move the sample orders into the log within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And until the mail worker delivered their confirmations.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let sent: i64 = client
            .query_one(
                "SELECT count(*) FROM mail_deliveries d JOIN event_log e
                    ON e.topic = d.topic AND e.partition = d.partition AND e.\"offset\" = d.\"offset\"
                 WHERE d.group_id = 'mail-service' AND d.status = 'sent' AND e.key = ANY($1)",
                &[&ids],
            )
            .await?
            .get(0);
        if sent == ids.len() as i64 {
            let target = args.mail.smtp_url.as_deref().map(|u| {
                crate::mail::SmtpTarget::parse(u)
                    .map_or_else(|_| "SMTP".to_string(), |t| t.to_string())
            });
            println!(
                "\n{sent} confirmation mails sent to {}",
                target.unwrap_or_else(|| format!(
                    "{}/ (.eml files)",
                    cli.data_dir.join("mail").display()
                ))
            );
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the mail worker did not send the sample confirmations within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let db_hint = if cli.database_url.is_some() {
        String::new()
    } else {
        format!(" (with DATABASE_URL={url} while this runs)")
    };
    println!("\nwhere to look{db_hint}:");
    println!("  curl -s -X POST http://{addr}/orders -H 'content-type: application/json' \\");
    println!("       -d '{{\"user_id\": 1, \"email\": \"ada@example.com\", \"amount\": 4200}}'");
    println!("  curl -s http://{addr}/orders/{}", placed[0]);
    println!("  outbox-relay topics describe order-created");
    println!("  outbox-relay tail order-created --max 10");
    println!("  outbox-relay groups describe mail-service");
    if args.no_wait {
        return running.stop().await;
    }
    println!("\nserving on http://{addr}; Ctrl-C to stop");
    running.wait().await
}

impl Running {
    /// Stops every role and waits for them (shutdown without a signal).
    async fn stop(self) -> anyhow::Result<()> {
        self.trigger.trigger();
        for (_, task) in self.tasks {
            let _ = task.await;
        }
        Ok(())
    }
}

/// Places sample orders through the API itself, as a client would.
async fn place_sample_orders(addr: SocketAddr, count: u32) -> anyhow::Result<Vec<i64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut ids = Vec::new();
    for i in 1..=count {
        let body = serde_json::json!({
            "user_id": i,
            "email": format!("customer{i}@example.com"),
            "amount": 1000 * i as i64 + 99,
        })
        .to_string();
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "POST /orders HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let json_body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(json_body)
            .with_context(|| format!("unexpected API answer: {response}"))?;
        let id = value["order_id"]
            .as_i64()
            .with_context(|| format!("unexpected API answer: {response}"))?;
        ids.push(id);
    }
    Ok(ids)
}

async fn topics(url: &str, cmd: &TopicsCommand) -> anyhow::Result<()> {
    let mut client = crate::db::connect(url).await?;
    match cmd {
        TopicsCommand::List { output } => {
            let topics = event_log::list_topics(&client).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&topics)?),
                Output::Table => {
                    println!("{:<32} {:>10} {:>14}", "TOPIC", "PARTITIONS", "RETENTION");
                    for t in topics {
                        println!(
                            "{:<32} {:>10} {:>14}",
                            t.name,
                            t.partitions,
                            human_duration(t.retention_seconds)
                        );
                    }
                }
            }
        }
        TopicsCommand::Describe { topic, output } => {
            let info = event_log::topic(&client, topic).await?;
            let partitions = event_log::partition_offsets(&client, topic).await?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "topic": info.name,
                        "partition_count": info.partitions,
                        "retention_seconds": info.retention_seconds,
                        "partitions": partitions,
                    }))?
                ),
                Output::Table => {
                    println!(
                        "Topic: {}\tPartitionCount: {}\tRetention: {}",
                        info.name,
                        info.partitions,
                        human_duration(info.retention_seconds)
                    );
                    for p in partitions {
                        println!(
                            "\tTopic: {}\tPartition: {}\tLogStartOffset: {}\tLogEndOffset: {}",
                            info.name, p.partition, p.log_start_offset, p.log_end_offset
                        );
                    }
                }
            }
        }
        TopicsCommand::Create {
            topic,
            partitions,
            retention_days,
        } => {
            event_log::create_topic(&mut client, topic, *partitions, *retention_days).await?;
            println!("created topic {topic} with {partitions} partitions");
        }
    }
    Ok(())
}

fn human_duration(seconds: i64) -> String {
    if seconds % 86_400 == 0 {
        format!("{}d", seconds / 86_400)
    } else if seconds % 3600 == 0 {
        format!("{}h", seconds / 3600)
    } else {
        format!("{seconds}s")
    }
}

async fn tail(url: &str, args: &TailArgs) -> anyhow::Result<()> {
    let client = crate::db::connect(url).await?;
    let all = event_log::partition_offsets(&client, &args.topic).await?;
    let partitions: Vec<i32> = match args.partition {
        Some(p) => {
            event_log::offsets_of(&client, &args.topic, p).await?;
            vec![p]
        }
        None => all.iter().map(|p| p.partition).collect(),
    };
    if let Some(n) = args.from_offset {
        if n < 0 {
            bail!("--from-offset must be 0 or more");
        }
    }
    let mut positions = Vec::new();
    for &p in &partitions {
        let start = match (args.from_offset, args.from_time) {
            (Some(offset), _) => offset,
            (None, Some(time)) => event_log::offset_for_time(&client, &args.topic, p, time).await?,
            (None, None) => 0,
        };
        positions.push((p, start));
    }
    let mut remaining = args.max.unwrap_or(u64::MAX);
    let stdout = std::io::stdout();
    loop {
        let mut progressed = false;
        for (partition, next) in positions.iter_mut() {
            while remaining > 0 {
                let page = (remaining.min(1000)) as i64;
                let records =
                    event_log::read(&client, &args.topic, *partition, *next, page).await?;
                if records.is_empty() {
                    break;
                }
                let mut out = stdout.lock();
                for record in &records {
                    use std::io::Write;
                    serde_json::to_writer(&mut out, record)?;
                    writeln!(out)?;
                    *next = record.offset + 1;
                }
                remaining -= records.len() as u64;
                progressed = true;
            }
        }
        if remaining == 0 || !args.follow {
            return Ok(());
        }
        if !progressed {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown::signal() => return Ok(()),
            }
        }
    }
}

async fn groups(url: &str, cmd: &GroupsCommand) -> anyhow::Result<()> {
    let client = crate::db::connect(url).await?;
    let mut out = String::new();
    use std::fmt::Write;
    match cmd {
        GroupsCommand::List { output } => {
            let groups = crate::group::list_groups(&client).await?;
            match output {
                Output::Json => out = serde_json::to_string_pretty(&groups)?,
                Output::Table => {
                    for g in groups {
                        writeln!(out, "{g}")?;
                    }
                }
            }
        }
        GroupsCommand::Describe { group, output } => {
            let described = crate::group::describe(&client, group)
                .await?
                .ok_or_else(|| anyhow::anyhow!("consumer group {group:?} does not exist"))?;
            match output {
                Output::Json => out = serde_json::to_string_pretty(&described)?,
                Output::Table => {
                    if described.members.is_empty() {
                        writeln!(out, "Consumer group '{group}' has no active members.\n")?;
                    }
                    writeln!(
                        out,
                        "{:<16} {:<20} {:>9} {:>14} {:>14} {:>8}  {:<40} HOST",
                        "GROUP",
                        "TOPIC",
                        "PARTITION",
                        "CURRENT-OFFSET",
                        "LOG-END-OFFSET",
                        "LAG",
                        "CONSUMER-ID"
                    )?;
                    for p in &described.partitions {
                        let host = p
                            .owner
                            .as_ref()
                            .and_then(|o| described.members.iter().find(|m| &m.member_id == o))
                            .map_or("-", |m| m.host.as_str());
                        writeln!(
                            out,
                            "{:<16} {:<20} {:>9} {:>14} {:>14} {:>8}  {:<40} {}",
                            described.group,
                            p.topic,
                            p.partition,
                            p.committed_offset.map_or("-".into(), |o| o.to_string()),
                            p.log_end_offset,
                            p.lag.map_or("-".into(), |l| l.to_string()),
                            p.owner.as_deref().unwrap_or("-"),
                            host
                        )?;
                    }
                    writeln!(
                        out,
                        "\nstate: {}, {} members",
                        described.state,
                        described.members.len()
                    )?;
                    if !described.members.is_empty() {
                        writeln!(
                            out,
                            "\n{:<40} {:<20} {:<14} {:<25} PARTITIONS",
                            "CONSUMER-ID", "HOST", "CLIENT-ID", "LAST-HEARTBEAT"
                        )?;
                        for m in &described.members {
                            writeln!(
                                out,
                                "{:<40} {:<20} {:<14} {:<25} {}",
                                m.member_id,
                                m.host,
                                m.client_id,
                                m.last_heartbeat
                                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                                m.partitions.join(",")
                            )?;
                        }
                    }
                }
            }
        }
    }
    print_out(&out)
}

async fn dead_letters(url: &str, cmd: &DeadLettersCommand) -> anyhow::Result<()> {
    let mut client = crate::db::connect(url).await?;
    let mut out = String::new();
    use std::fmt::Write;
    match cmd {
        DeadLettersCommand::List { group, output } => {
            let letters = crate::mail::list_dead_letters(&client, group.as_deref()).await?;
            match output {
                Output::Json => out = serde_json::to_string_pretty(&letters)?,
                Output::Table => {
                    writeln!(
                        out,
                        "{:>6} {:<14} {:<16} {:>9} {:>8} {:>8}  REASON",
                        "ID", "GROUP", "TOPIC", "PARTITION", "OFFSET", "ATTEMPTS"
                    )?;
                    for d in letters {
                        writeln!(
                            out,
                            "{:>6} {:<14} {:<16} {:>9} {:>8} {:>8}  {}{}",
                            d.id,
                            d.group,
                            d.topic,
                            d.partition,
                            d.offset,
                            d.attempts,
                            d.reason,
                            d.last_error.map(|e| format!(" ({e})")).unwrap_or_default()
                        )?;
                    }
                }
            }
        }
        DeadLettersCommand::Retry { id, all } => {
            let n =
                crate::mail::retry_dead_letters(&mut client, if *all { None } else { *id }).await?;
            if n == 0 && !*all {
                bail!("no parked dead letter with id {}", id.unwrap_or_default());
            }
            writeln!(out, "republished {n} dead letter(s) through the outbox")?;
        }
        DeadLettersCommand::Discard { id } => {
            if !crate::mail::discard_dead_letter(&client, *id).await? {
                bail!("no parked dead letter with id {id}");
            }
            writeln!(out, "discarded dead letter {id}")?;
        }
    }
    print_out(&out)
}

/// Prints without panicking on a closed pipe (`… | head`).
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        stdout.write_all(b"\n")?;
    }
    Ok(())
}
