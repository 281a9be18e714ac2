//! `kafka-api status`: the running Kafka front ends, their clients and the
//! groups they serve; `kafka-api hash-password`: a password hash for
//! KAFKA_API_USERS.

use std::io::{BufRead, Write};

use clap::Subcommand;

use super::output::{self, or_dash, Output, Table};
use crate::kafka_api::security::{PasswordHash, HASH_ITERATIONS};

#[derive(Debug, Subcommand)]
pub enum KafkaApiCommand {
    /// Listeners (each running kafka-api process), connected clients by
    /// client id and software (name/version from ApiVersions v3), and the
    /// Kafka-protocol groups with their state.
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Reads a password from stdin (one line) and prints its hash for a
    /// KAFKA_API_USERS entry (name:hash[:topics=…][:groups=…]).
    HashPassword,
}

pub async fn run(
    url: &str,
    cmd: &KafkaApiCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    match cmd {
        KafkaApiCommand::Status { output } => status(url, *output, out).await,
        KafkaApiCommand::HashPassword => hash_password(&mut std::io::stdin().lock(), out),
    }
}

/// `hash-password`, which needs no database.
fn hash_password(input: &mut dyn BufRead, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let mut password = String::new();
    input.read_line(&mut password)?;
    let password = password.strip_suffix('\n').unwrap_or(&password);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        anyhow::bail!("no password on stdin (give it as one line: echo -n … | outbox-relay kafka-api hash-password)");
    }
    writeln!(out, "{}", PasswordHash::new(password, HASH_ITERATIONS))?;
    Ok(())
}

async fn status(url: &str, output: Output, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let client = crate::db::connect(url).await?;
    let status = crate::kafka_api::status::status(&client).await?;
    output::print(out, output, &status, |status| {
        let mut text = String::new();
        if status.listeners.is_empty() {
            text.push_str("No kafka-api process is running (serve --roles …,kafka-api).\n");
        }
        for l in &status.listeners {
            let security = match (l.tls, l.sasl) {
                (true, true) => "TLS, SASL/PLAIN",
                (true, false) => "TLS",
                (false, true) => "SASL/PLAIN",
                (false, false) => "plaintext, no authentication",
            };
            text.push_str(&format!(
                "{} listening on {} (advertised {}), {security}, since {}\n",
                l.id,
                l.listen,
                l.advertised,
                l.started_at.format("%Y-%m-%d %H:%M:%S UTC")
            ));
            let mut clients = Table::new(&["  CLIENT-ID", "SOFTWARE", "USER", "PEER", "CONNECTED"]);
            for c in &l.clients {
                let software = match (&c.software_name, &c.software_version) {
                    (Some(name), Some(version)) => format!("{name} {version}"),
                    _ => "-".into(),
                };
                clients.row(vec![
                    format!("  {}", c.client_id),
                    software,
                    or_dash(c.user.clone()),
                    c.peer.clone(),
                    c.connected_at.format("%H:%M:%S").to_string(),
                ]);
            }
            text.push_str(&clients.render());
            text.push('\n');
        }
        let mut groups = Table::new(&["GROUP", "STATE", ">GENERATION", "ASSIGNOR", ">MEMBERS"]);
        for g in &status.groups {
            groups.row(vec![
                g.group.clone(),
                g.state.clone(),
                g.generation.to_string(),
                if g.assignor.is_empty() {
                    "-".into()
                } else {
                    g.assignor.clone()
                },
                g.members.to_string(),
            ]);
        }
        text.push('\n');
        text.push_str(&groups.render());
        text
    })
}
