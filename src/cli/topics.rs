//! `topics list|describe|create|alter`.

use std::io::Write;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::output::{self, human_duration, Output, Table};
use super::parse;
use crate::log;

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// List topics with their partition count and retention.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Per partition: log start offset and log end offset (like kafka-topics --describe).
    Describe {
        /// The topic to describe.
        topic: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Create a topic (its partition count is fixed: adding partitions would move keys).
    Create {
        /// Name: 1 to 249 of A-Z a-z 0-9 . _ -
        topic: String,
        /// Number of partitions (1 to 10000).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(i32).range(1..=10_000))]
        partitions: i32,
        /// Retention in days (more than 0, at most 36500).
        #[arg(long, default_value = "35", value_parser = parse::retention_days)]
        retention_days: Duration,
    },
    /// Change a topic's retention (its partition count is fixed).
    Alter {
        /// The topic to change.
        topic: String,
        /// Records older than this (by append time) fall below the log start:
        /// 35d, 72h, 90m (more than 0, at most 100 years).
        #[arg(long, value_parser = parse::span)]
        retention: Duration,
    },
}

pub async fn run(
    url: &str,
    cmd: &TopicsCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let mut client = crate::db::connect(url).await?;
    match cmd {
        TopicsCommand::List { output } => {
            let topics = log::list_topics(&client).await?;
            output::print(out, *output, &topics, |topics| {
                let mut table = Table::new(&["TOPIC", ">PARTITIONS", ">RETENTION"]);
                for t in topics {
                    table.row(vec![
                        t.name.clone(),
                        t.partitions.to_string(),
                        human_duration(t.retention_seconds),
                    ]);
                }
                table.render()
            })
        }
        TopicsCommand::Describe { topic, output } => {
            let info = log::topic(&client, topic).await?;
            let partitions = log::partition_offsets(&client, topic).await?;
            let described = json!({
                "topic": info.name,
                "partition_count": info.partitions,
                "retention_seconds": info.retention_seconds,
                "partitions": partitions,
            });
            output::print(out, *output, &described, |_| {
                // kafka-topics.sh --describe's shape.
                let mut text = format!(
                    "Topic: {}\tPartitionCount: {}\tRetention: {}\n",
                    info.name,
                    info.partitions,
                    human_duration(info.retention_seconds)
                );
                for p in &partitions {
                    text.push_str(&format!(
                        "\tTopic: {}\tPartition: {}\tLogStartOffset: {}\tLogEndOffset: {}\n",
                        info.name, p.partition, p.log_start_offset, p.log_end_offset
                    ));
                }
                text
            })
        }
        TopicsCommand::Create {
            topic,
            partitions,
            retention_days,
        } => {
            log::create_topic(&mut client, topic, *partitions, *retention_days).await?;
            writeln!(out, "created topic {topic} with {partitions} partitions")?;
            Ok(())
        }
        TopicsCommand::Alter { topic, retention } => {
            log::topics::alter_retention(&client, topic, *retention).await?;
            writeln!(
                out,
                "topic {topic}: retention {}",
                human_duration(retention.as_secs() as i64)
            )?;
            Ok(())
        }
    }
}
