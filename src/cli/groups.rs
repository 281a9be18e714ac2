//! `groups list|describe`, shaped like `kafka-consumer-groups`.

use std::io::Write;

use clap::Subcommand;

use super::output::{self, or_dash, Output, Table};

#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// List consumer groups.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// State, members, and per partition: committed offset, log end offset, lag, owner.
    Describe {
        /// The consumer group (e.g. mail-service).
        group: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

pub async fn run(
    url: &str,
    cmd: &GroupsCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let client = crate::db::connect(url).await?;
    match cmd {
        GroupsCommand::List { output } => {
            let groups = crate::group::admin::list_groups(&client).await?;
            output::print(out, *output, &groups, |groups| {
                groups.iter().map(|g| format!("{g}\n")).collect()
            })
        }
        GroupsCommand::Describe { group, output } => {
            let described = crate::group::admin::describe(&client, group)
                .await?
                .ok_or_else(|| anyhow::anyhow!("consumer group {group:?} does not exist"))?;
            output::print(out, *output, &described, |d| {
                let mut text = String::new();
                if d.members.is_empty() {
                    text.push_str(&format!(
                        "Consumer group '{group}' has no active members.\n\n"
                    ));
                }
                let mut partitions = Table::new(&[
                    "GROUP",
                    "TOPIC",
                    ">PARTITION",
                    ">CURRENT-OFFSET",
                    ">LOG-END-OFFSET",
                    ">LAG",
                    "CONSUMER-ID",
                    "HOST",
                ]);
                for p in &d.partitions {
                    let host = p
                        .owner
                        .as_ref()
                        .and_then(|o| d.members.iter().find(|m| &m.member_id == o))
                        .map(|m| m.host.clone());
                    partitions.row(vec![
                        d.group.clone(),
                        p.topic.clone(),
                        p.partition.to_string(),
                        or_dash(p.committed_offset),
                        p.log_end_offset.to_string(),
                        or_dash(p.lag),
                        or_dash(p.owner.clone()),
                        or_dash(host),
                    ]);
                }
                text.push_str(&partitions.render());
                text.push_str(&format!(
                    "\nstate: {}, {} members\n",
                    d.state,
                    d.members.len()
                ));
                if !d.members.is_empty() {
                    let mut members = Table::new(&[
                        "CONSUMER-ID",
                        "HOST",
                        "CLIENT-ID",
                        "LAST-HEARTBEAT",
                        "PARTITIONS",
                    ]);
                    for m in &d.members {
                        members.row(vec![
                            m.member_id.clone(),
                            m.host.clone(),
                            m.client_id.clone(),
                            m.last_heartbeat
                                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                            m.partitions.join(","),
                        ]);
                    }
                    text.push('\n');
                    text.push_str(&members.render());
                }
                text
            })
        }
    }
}
