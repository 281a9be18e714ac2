//! A member's progress through a backlog: while the partitions it owns are
//! far behind their log end, one INFO line every few seconds says how fast
//! it goes and how long is left (records/s, lag, ETA), instead of silence
//! or a line per record.

use std::time::Duration;

use tokio::time::Instant;

/// How often the line is written while behind.
const EVERY: Duration = Duration::from_secs(5);
/// Below this many records behind, nothing is written.
const BEHIND: i64 = 1_000;

/// The owned partitions' lag (records from the committed offset, or the
/// log start, to the log end), the sum of their committed offsets, and how
/// many there are.
pub(crate) const MEMBER_LAG: &str = "
    SELECT coalesce(sum(h.log_end_offset
                        - greatest(coalesce(p.committed_offset, 0), h.log_start_offset)), 0)::int8,
           coalesce(sum(p.committed_offset), 0)::int8,
           count(*)
      FROM group_partitions p
      JOIN partition_heads h ON h.topic = p.topic AND h.partition = p.partition
     WHERE p.group_id = $1 AND p.owner = $2";

/// The last sample, and when the next is due.
pub(super) struct BacklogProgress {
    last: Option<Sample>,
    next_at: Instant,
}

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    committed: i64,
    partitions: i64,
}

impl BacklogProgress {
    pub(super) fn new() -> BacklogProgress {
        BacklogProgress {
            last: None,
            next_at: Instant::now() + EVERY,
        }
    }

    /// Samples the member's lag once [`EVERY`] has passed, and writes the
    /// line if it is [`BEHIND`]. A failed read is skipped (the heartbeat
    /// says what is wrong with the database).
    pub(super) async fn sample(
        &mut self,
        pool: &deadpool_postgres::Pool,
        group: &str,
        member: &str,
    ) {
        if Instant::now() < self.next_at {
            return;
        }
        self.next_at = Instant::now() + EVERY;
        let row = async {
            let client = pool.get().await?;
            anyhow::Ok(client.query_one(MEMBER_LAG, &[&group, &member]).await?)
        }
        .await;
        let Ok(row) = row else {
            return;
        };
        let (lag, committed, partitions): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let now = Sample {
            at: Instant::now(),
            committed,
            partitions,
        };
        let last = self.last.replace(now);
        if lag < BEHIND {
            return;
        }
        // A rate only between samples of the same partitions.
        let rate = last
            .filter(|last| last.partitions == partitions && committed >= last.committed)
            .map(|last| (committed - last.committed) as f64 / (now.at - last.at).as_secs_f64());
        match rate {
            Some(rate) if rate > 0.0 => tracing::info!(
                group,
                lag,
                records_per_s = rate.round() as i64,
                eta_s = (lag as f64 / rate).round() as i64,
                "draining a backlog"
            ),
            _ => tracing::info!(group, lag, "draining a backlog"),
        }
    }
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![("group::progress::MEMBER_LAG", MEMBER_LAG.to_string())]
}
