//! `dead-letters list|retry|discard`.

use std::io::Write;

use anyhow::bail;
use clap::Subcommand;

use super::output::{self, or_dash, Output, Table};
use crate::group::dead_letters::{DeadLetterStatus, Selection};

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Dead letters with their reason and last error (parked ones by default).
    List {
        /// Only this consumer group's.
        #[arg(long)]
        group: Option<String>,
        /// Which ones: parked (waiting for an operator), retried, discarded, or all.
        #[arg(long, value_enum, default_value_t = StatusFilter::Parked)]
        status: StatusFilter,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Publish a parked dead letter's record again (a new event with a `retry-of` header).
    Retry {
        /// The dead letter's id (from `dead-letters list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Retry every parked dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Mark a parked dead letter as discarded (kept for the record, never retried).
    Discard {
        /// The dead letter's id (from `dead-letters list`).
        id: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFilter {
    Parked,
    Retried,
    Discarded,
    All,
}

pub async fn run(
    url: &str,
    cmd: &DeadLettersCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let mut client = crate::db::connect(url).await?;
    match cmd {
        DeadLettersCommand::List {
            group,
            status,
            output,
        } => {
            let status = match status {
                StatusFilter::Parked => Some(DeadLetterStatus::Parked),
                StatusFilter::Retried => Some(DeadLetterStatus::Retried),
                StatusFilter::Discarded => Some(DeadLetterStatus::Discarded),
                StatusFilter::All => None,
            };
            let letters =
                crate::group::dead_letters::list_dead_letters(&client, group.as_deref(), status)
                    .await?;
            output::print(out, *output, &letters, |letters| {
                let mut table = Table::new(&[
                    ">ID",
                    "GROUP",
                    "TOPIC",
                    ">PARTITION",
                    ">OFFSET",
                    "KEY",
                    "STATUS",
                    ">ATTEMPTS",
                    "REASON",
                    "LAST-ERROR",
                ]);
                for d in letters {
                    table.row(vec![
                        d.id.to_string(),
                        d.group.clone(),
                        d.topic.clone(),
                        d.partition.to_string(),
                        d.offset.to_string(),
                        or_dash(d.key.clone()),
                        d.status.as_str().to_string(),
                        d.attempts.to_string(),
                        d.reason.clone(),
                        or_dash(d.last_error.as_deref().map(one_line)),
                    ]);
                }
                table.render()
            })
        }
        DeadLettersCommand::Retry { id, all } => {
            let selection = match id {
                Some(id) if !*all => Selection::one(*id),
                _ => Selection::all(),
            };
            let n = crate::group::dead_letters::retry_dead_letters(&mut client, &selection).await?;
            if n == 0 && !*all {
                bail!("no parked dead letter with id {}", id.unwrap_or_default());
            }
            writeln!(out, "republished {n} dead letter(s) through the outbox")?;
            Ok(())
        }
        DeadLettersCommand::Discard { id } => {
            let selection = Selection::one(*id);
            if crate::group::dead_letters::discard_dead_letters(&client, &selection).await? == 0 {
                bail!("no parked dead letter with id {id}");
            }
            writeln!(out, "discarded dead letter {id}")?;
            Ok(())
        }
    }
}

/// A multi-line SMTP error on one table line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
