//! `kafka status`: how far the Kafka mirror is, per partition.

use std::io::Write;

use clap::Subcommand;

use super::output::{self, or_dash, Output, Table};

#[derive(Debug, Subcommand)]
pub enum KafkaCommand {
    /// Per partition: log end offset, mirrored offset (everything below it
    /// is in Kafka), lag, and the mirror member working on it.
    Status {
        /// Only this log topic.
        #[arg(long)]
        topic: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

pub async fn run(
    url: &str,
    cmd: &KafkaCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let client = crate::db::connect(url).await?;
    match cmd {
        KafkaCommand::Status { topic, output } => {
            let partitions = crate::kafka::status::mirror_status(&client, topic.as_deref()).await?;
            output::print(out, *output, &partitions, |partitions| {
                let mut table = Table::new(&[
                    "TOPIC",
                    ">PARTITION",
                    ">LOG-END-OFFSET",
                    ">MIRRORED-OFFSET",
                    ">LAG",
                    "MIRROR-MEMBER",
                ]);
                for p in partitions {
                    table.row(vec![
                        p.topic.clone(),
                        p.partition.to_string(),
                        p.log_end_offset.to_string(),
                        or_dash(p.mirrored_offset),
                        p.lag.to_string(),
                        or_dash(p.owner.clone()),
                    ]);
                }
                table.render()
            })
        }
    }
}
