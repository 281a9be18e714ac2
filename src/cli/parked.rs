//! `parked list|redrive`: outbox rows the relay could not place.

use std::io::Write;

use anyhow::bail;
use clap::Subcommand;

use super::output::{self, or_dash, Output, Table};

#[derive(Debug, Subcommand)]
pub enum ParkedCommand {
    /// Outbox rows parked by the relay, with the reason.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Move parked rows whose topic now exists back into the outbox (each
    /// reaches the log once, with its original created_at); the others stay.
    Redrive {
        /// The parked row's outbox id (from `parked list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Every parked row.
        #[arg(long)]
        all: bool,
    },
}

pub async fn run(
    url: &str,
    cmd: &ParkedCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let mut client = crate::db::connect(url).await?;
    match cmd {
        ParkedCommand::List { output } => {
            let rows = crate::relay::parked::list(&client).await?;
            output::print(out, *output, &rows, |rows| {
                let mut table = Table::new(&[">OUTBOX-ID", "TOPIC", "KEY", "CREATED", "REASON"]);
                for r in rows {
                    table.row(vec![
                        r.outbox_id.to_string(),
                        r.topic.clone(),
                        or_dash(r.key.clone()),
                        r.created_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        r.reason.clone(),
                    ]);
                }
                table.render()
            })
        }
        ParkedCommand::Redrive { id, all } => {
            let done =
                crate::relay::parked::redrive(&mut client, if *all { None } else { *id }).await?;
            if done.redriven.is_empty() && done.still_parked.is_empty() && !*all {
                bail!("no parked row with outbox id {}", id.unwrap_or_default());
            }
            writeln!(out, "re-driven into the outbox: {}", done.redriven.len())?;
            for (outbox_id, topic, reason) in &done.still_parked {
                writeln!(out, "still parked: {outbox_id} ({topic}): {reason}")?;
            }
            Ok(())
        }
    }
}
