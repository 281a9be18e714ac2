//! The `outbox-relay` command line: one file per command group, each
//! writing its output to an injected writer (so outputs are testable in
//! process), with table/JSON rendering in [`output`].
//!
//! Usage errors are clap's (full message, exit 2); runtime errors are one
//! line (see `main.rs`). Every command but `migrate`, `serve` and `demo`
//! first checks that the database has this binary's schema and says how to
//! get it when not.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::embedded::{ClusterOptions, EmbeddedPostgres};

mod dead_letters;
mod demo;
mod groups;
mod kafka;
mod output;
mod parked;
mod parse;
mod relay;
mod replay;
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
    /// Run the service roles (order API, relay, mail worker) until Ctrl-C / SIGTERM.
    Serve(ServeArgs),
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
}

/// Runs the parsed command, writing its output to stdout.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    run_with_output(cli, &mut stdout).await
}

/// Runs the parsed command, writing its output to `out`.
pub async fn run_with_output(cli: Cli, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    // Settings are checked before anything starts (no database, no port).
    let plan = match &cli.command {
        Command::Serve(args) => Some(serve::Plan::new(args, &cli.data_dir)?),
        Command::Demo(args) => Some(demo::plan(args, &cli.data_dir)?),
        Command::Replay(cmd) => {
            replay::check(cmd, &cli.data_dir)?;
            None
        }
        _ => None,
    };
    let announce = plan.is_some();
    let db = Database::open(&cli, announce).await?;
    let result = async {
        match &cli.command {
            Command::Migrate | Command::Serve(_) | Command::Demo(_) => {}
            _ => crate::migrate::require_current(&db.url).await?,
        }
        match &cli.command {
            Command::Migrate => migrate(&db.url, out).await,
            Command::Serve(_) => serve::run(&db.url, plan.expect("built above")).await,
            Command::Demo(args) => {
                demo::run(&db, args, plan.expect("built above"), &cli, out).await
            }
            Command::Topics(cmd) => topics::run(&db.url, cmd, out).await,
            Command::Tail(args) => tail::run(&db.url, args, out).await,
            Command::Groups(cmd) => groups::run(&db.url, cmd, out).await,
            Command::DeadLetters(cmd) => dead_letters::run(&db.url, cmd, out).await,
            Command::Relay(cmd) => relay::run(&db.url, cmd, out).await,
            Command::Replay(cmd) => replay::run(&db.url, cmd, &cli.data_dir, out).await,
            Command::Parked(cmd) => parked::run(&db.url, cmd, out).await,
            Command::Kafka(cmd) => kafka::run(&db.url, cmd, out).await,
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
        let options = ClusterOptions {
            data_dir: cli.data_dir.clone(),
            durable: true,
            extra_settings: Vec::new(),
        };
        let cluster =
            tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&options)).await??;
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
            eprintln!(
                "DATABASE_URL is not set: using the embedded Postgres in {} ({})",
                cluster.data_dir().display(),
                database.url
            );
        }
        Ok(database)
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
                eprintln!("warning: could not stop the embedded Postgres: {e:#}");
            }
        }
    }
}
