//! The `outbox-relay` command line: one file per command group, each
//! writing its output to an injected writer (so outputs are testable in
//! process), with table/JSON rendering in [`output`].
//!
//! Usage errors are clap's (full message, exit 2); runtime errors are one
//! line (see `main.rs`). Every command but `migrate`, `serve` and `demo`
//! first checks that the database has this binary's schema and says how to
//! get it when not.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::embedded::{ClusterOptions, EmbeddedPostgres};

mod dead_letters;
mod demo;
mod groups;
mod kafka;
mod kafka_api;
mod output;
mod parked;
pub mod parse;
mod relay;
pub mod replay;
mod serve;
mod tail;
mod topics;

pub use output::Output;
pub use serve::{KafkaArgs, MailArgs, Role, ServeArgs};

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Transactional outbox relay on Postgres: outbox → partitioned event log → consumer groups → mail",
    arg_required_else_help = true
)]
pub struct Cli {
    /// Postgres URL (postgres://user:password@host:5432/db). When unset, a
    /// private cluster is started from the locally installed Postgres
    /// binaries, with its data in --data-dir.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Data directory of the embedded cluster (used without DATABASE_URL;
    /// the cluster is in its postgres/, the default .eml files in its mail/).
    /// Default: $XDG_DATA_HOME/outbox-relay, else /var/lib/outbox-relay as
    /// root, else ~/.local/share/outbox-relay, wherever the command runs.
    #[arg(long, env = "OUTBOX_RELAY_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,

    /// Log at DEBUG (RUST_LOG, when set, decides instead).
    #[arg(short, long, global = true)]
    pub verbose: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending schema migrations.
    Migrate,
    /// Run the service roles (order API, relay, mail worker) until Ctrl-C / SIGTERM.
    Serve(Box<ServeArgs>),
    /// Run the pipeline, place sample orders, show where they went, then keep
    /// serving until Ctrl-C (or exit with --no-wait).
    Demo(demo::DemoArgs),
    /// List, describe, create or alter topics.
    #[command(subcommand)]
    Topics(topics::TopicsCommand),
    /// Print records of a topic, one JSON object per line.
    Tail(tail::TailArgs),
    /// Inspect consumer groups (like kafka-consumer-groups).
    #[command(subcommand)]
    Groups(groups::GroupsCommand),
    /// List, retry or discard dead letters.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(dead_letters::DeadLettersCommand),
    /// The relay's lease and backlog.
    #[command(subcommand)]
    Relay(relay::RelayCommand),
    /// Mail a range of order-created again (by time or offset) under a run of
    /// its own, without touching the live group; list and describe runs.
    Replay(replay::ReplayCommand),
    /// Outbox rows the relay parked (unknown topic): list, re-drive.
    #[command(subcommand)]
    Parked(parked::ParkedCommand),
    /// The Kafka mirror (serve --roles …,kafka): its progress per partition.
    #[command(subcommand)]
    Kafka(kafka::KafkaCommand),
    /// The Kafka protocol on the log (serve --roles …,kafka-api): listeners,
    /// clients and groups; password hashes for its users.
    #[command(subcommand, name = "kafka-api")]
    KafkaApi(kafka_api::KafkaApiCommand),
}

impl Cli {
    /// The data directory: `--data-dir`, else [`default_data_dir`].
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }
}

/// The platform's data directory for this user, the same from any working
/// directory: `$XDG_DATA_HOME/outbox-relay`; else, as root,
/// `/var/lib/outbox-relay` (Postgres runs as another user, who cannot enter
/// root's home); else `~/.local/share/outbox-relay`.
pub fn default_data_dir() -> PathBuf {
    let absolute = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(data) = absolute("XDG_DATA_HOME") {
        return data.join("outbox-relay");
    }
    if crate::embedded::is_root() {
        return PathBuf::from("/var/lib/outbox-relay");
    }
    match absolute("HOME") {
        Some(home) => home.join(".local/share/outbox-relay"),
        None => PathBuf::from(".outbox-relay"),
    }
}

/// A line on stderr for the operator; a closed stderr is not an error
/// (`eprintln!` would panic).
pub(crate) fn tell(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Runs the parsed command, writing its output to stdout.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    run_with_output(cli, &mut stdout).await
}

/// Runs the parsed command, writing its output to `out`.
pub async fn run_with_output(cli: Cli, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    // Needs no database: answered before one is opened (or started).
    if let Command::KafkaApi(cmd @ kafka_api::KafkaApiCommand::HashPassword) = &cli.command {
        return kafka_api::run("", cmd, out).await;
    }
    // Settings are checked before anything starts (no database, no port).
    let data_dir = cli.data_dir();
    let settings = match &cli.command {
        Command::Serve(args) => Some(serve::settings(args, &data_dir)?),
        Command::Demo(args) => Some(demo::settings(args, &data_dir)?),
        Command::Replay(cmd) => {
            replay::check(cmd, &data_dir)?;
            None
        }
        _ => None,
    };
    let announce = settings.is_some();
    let db = Database::open(&cli, announce).await?;
    let result = async {
        match &cli.command {
            Command::Migrate | Command::Serve(_) | Command::Demo(_) => {}
            _ => crate::migrate::require_current(&db.url)
                .await
                .with_context(|| db.describe())?,
        }
        match &cli.command {
            Command::Migrate => migrate(&db.url, out).await,
            Command::Serve(_) => serve::run(&db.url, settings.expect("built above")).await,
            Command::Demo(args) => {
                demo::run(&db, args, settings.expect("built above"), &cli, out).await
            }
            Command::Topics(cmd) => topics::run(&db.url, cmd, out).await,
            Command::Tail(args) => tail::run(&db.url, args, out).await,
            Command::Groups(cmd) => groups::run(&db.url, cmd, out).await,
            Command::DeadLetters(cmd) => dead_letters::run(&db.url, cmd, out).await,
            Command::Relay(cmd) => relay::run(&db.url, cmd, out).await,
            Command::Replay(cmd) => replay::run(&db.url, cmd, &data_dir, out).await,
            Command::Parked(cmd) => parked::run(&db.url, cmd, out).await,
            Command::Kafka(cmd) => kafka::run(&db.url, cmd, out).await,
            Command::KafkaApi(cmd) => kafka_api::run(&db.url, cmd, out).await,
        }
    }
    .await;
    db.close();
    result
}

/// An error as one line: the context chain joined by `: `, Postgres'
/// multi-line details folded in.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

async fn migrate(url: &str, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let applied = crate::migrate::apply_all(url).await?;
    if applied.is_empty() {
        writeln!(
            out,
            "schema is current (version {})",
            crate::migrate::latest_version()
        )?;
    } else {
        writeln!(out, "applied migrations {applied:?}")?;
    }
    Ok(())
}

/// The database a command talks to: the given URL, or the embedded cluster.
pub(crate) struct Database {
    pub url: String,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    async fn open(cli: &Cli, announce: bool) -> anyhow::Result<Database> {
        if let Some(url) = &cli.database_url {
            crate::db::parse_url(url)?;
            return Ok(Database {
                url: url.clone(),
                embedded: None,
            });
        }
        let data_dir = cli.data_dir();
        if cli.data_dir.is_none() && Path::new(".outbox-relay/PG_VERSION").exists() {
            tell(format_args!(
                "note: ./.outbox-relay holds a cluster of an earlier version, no longer the default; \
                 --data-dir .outbox-relay uses it"
            ));
        }
        // A data directory that is itself a cluster is one made before the
        // cluster moved into its postgres/: it is used where it is.
        let cluster_dir = if data_dir.join("PG_VERSION").exists() {
            data_dir.clone()
        } else {
            data_dir.join("postgres")
        };
        let options = ClusterOptions {
            data_dir: cluster_dir,
            durable: true,
            extra_settings: Vec::new(),
        };
        let cluster = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&options))
            .await?
            .with_context(|| format!("the embedded Postgres in {}", data_dir.display()))?;
        // Stopped when this process ends, however it ends (a clean exit
        // stops it first, below).
        if cluster.started_here {
            cluster.stop_after_exit_of(std::process::id())?;
        }
        let database = Database {
            url: cluster.url("outbox"),
            embedded: Some(cluster),
        };
        let cluster = database.embedded.as_ref().expect("set above");
        if let Err(e) = crate::embedded::ensure_database(&cluster.url("postgres"), "outbox").await {
            database.close();
            return Err(e);
        }
        let cluster = database.embedded.as_ref().expect("set above");
        if announce {
            tell(format_args!(
                "DATABASE_URL is not set: using the embedded Postgres in {} ({})",
                cluster.data_dir().display(),
                database.url
            ));
        }
        Ok(database)
    }

    /// Which database this is, for messages: host:port/db (never the
    /// password), and the embedded cluster's data directory.
    pub fn describe(&self) -> String {
        let place = crate::db::parse_url(&self.url)
            .map(|config| crate::db::describe(&config))
            .unwrap_or_else(|_| "an unparsable URL".into());
        match &self.embedded {
            Some(cluster) => format!(
                "database {place} (the embedded Postgres in {})",
                cluster.data_dir().display()
            ),
            None => format!("database {place}"),
        }
    }

    /// True when this is the embedded cluster (no DATABASE_URL).
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Stops the embedded server if this process started it (another
    /// `serve` may be using one it found running).
    fn close(self) {
        if let Some(cluster) = self.embedded.filter(|c| c.started_here) {
            if let Err(e) = cluster.stop() {
                tell(format_args!(
                    "warning: could not stop the embedded Postgres: {e:#}"
                ));
            }
        }
    }
}
