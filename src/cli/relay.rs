//! `relay status`: who leads, until when, and what is waiting.

use std::io::Write;

use clap::Subcommand;

use super::output::{self, or_dash, Output};

#[derive(Debug, Subcommand)]
pub enum RelayCommand {
    /// The lease holder, its epoch and expiry, the backlog and its oldest row's age.
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

pub async fn run(
    url: &str,
    cmd: &RelayCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let client = crate::db::connect(url).await?;
    match cmd {
        RelayCommand::Status { output } => {
            let status = crate::relay::status(&client, crate::relay::DEFAULT_RELAY_NAME).await?;
            output::print(out, *output, &status, |s| {
                let leader = match (&s.holder, s.leader_alive) {
                    (Some(holder), true) => holder.clone(),
                    (Some(holder), false) => format!("none (lease of {holder} expired)"),
                    (None, _) => "none".to_string(),
                };
                format!(
                    "Relay: {}\tLeader: {}\tEpoch: {}\tLeaseExpires: {}\n\
                     Backlog: {} rows\tOldestAge: {:.3}s\tDraining: {}\n",
                    s.relay,
                    leader,
                    s.epoch,
                    or_dash(
                        s.lease_expires_at
                            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                    ),
                    s.backlog,
                    s.oldest_age_seconds,
                    s.draining
                )
            })
        }
    }
}
