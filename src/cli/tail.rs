//! `tail`: records of a topic as JSON lines (like `kcat -C -J`).

use std::io::Write;
use std::time::Duration;

use anyhow::bail;
use chrono::{DateTime, Utc};

use super::parse;
use crate::log;
use crate::shutdown;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TailOutput {
    /// One JSON object per record and line.
    Json,
}

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// The topic to read.
    pub topic: String,
    /// Only this partition (default: all, one after the other).
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(0..))]
    pub partition: Option<i32>,
    /// Start at this offset in every partition read (clamped to the log start).
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i64).range(0..),
          conflicts_with_all = ["from_time", "last"])]
    pub from_offset: Option<i64>,
    /// Start at the first record created at or after this time (RFC 3339 or
    /// YYYY-MM-DD), as Kafka's offsetsForTimes.
    #[arg(long, value_parser = parse::time, conflicts_with = "last")]
    pub from_time: Option<DateTime<Utc>>,
    /// Start N records before the log end of every partition read (kcat -o -N).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub last: Option<u64>,
    /// Only records with this key; reads only the partition the key maps to.
    #[arg(long)]
    pub key: Option<String>,
    /// Stop after this many records in all.
    #[arg(long)]
    pub max: Option<u64>,
    /// Keep waiting for new records until Ctrl-C.
    #[arg(long)]
    pub follow: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = TailOutput::Json)]
    pub output: TailOutput,
}

pub async fn run(url: &str, args: &TailArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let client = crate::db::connect(url).await?;
    let all = log::partition_offsets(&client, &args.topic).await?;
    let key_partition = args
        .key
        .as_deref()
        .map(|key| crate::log::partitioner::partition_for_key(key, all.len() as u32) as i32);
    let partitions: Vec<log::PartitionOffsets> = match (args.partition, key_partition) {
        (Some(p), Some(k)) if p != k => bail!(
            "key {:?} is in partition {k}, not in partition {p}",
            args.key.as_deref().unwrap_or_default()
        ),
        (Some(p), _) | (None, Some(p)) => {
            vec![log::offsets_of(&client, &args.topic, p).await?]
        }
        (None, None) => all,
    };
    let mut positions = Vec::new();
    for p in &partitions {
        let start = match (args.from_offset, args.from_time, args.last) {
            (Some(offset), _, _) => offset,
            (None, Some(time), _) => {
                log::offset_for_time(&client, &args.topic, p.partition, time).await?
            }
            (None, None, Some(n)) => p
                .log_end_offset
                .saturating_sub(n.min(i64::MAX as u64) as i64),
            (None, None, None) => 0,
        };
        positions.push((p.partition, start));
    }
    let mut remaining = args.max.unwrap_or(u64::MAX);
    // Following waits for the relay's notification rather than polling.
    let listener = if args.follow {
        Some(crate::log::notify::listen(url)?)
    } else {
        None
    };
    let mut appended = listener
        .as_ref()
        .map(crate::log::notify::Appends::subscribe_all);
    loop {
        let mut progressed = false;
        for (partition, next) in positions.iter_mut() {
            while remaining > 0 {
                let records = log::read(&client, &args.topic, *partition, *next, 1000).await?;
                let Some(last) = records.last() else {
                    break;
                };
                *next = last.offset + 1;
                progressed = true;
                for record in &records {
                    if args.key.is_some() && record.key != args.key {
                        continue;
                    }
                    serde_json::to_writer(&mut *out, record)?;
                    writeln!(out)?;
                    remaining -= 1;
                    if remaining == 0 {
                        break;
                    }
                }
            }
        }
        out.flush()?;
        let Some(appended) = appended.as_mut().filter(|_| remaining > 0) else {
            return Ok(());
        };
        if !progressed {
            // A notification missed while reconnecting is caught by the
            // slow re-read.
            tokio::select! {
                _ = appended.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown::signal() => return Ok(()),
            }
        }
    }
}
