//! Runs: created from a plan, found again by their command, listed and
//! described (the operator's view).

use std::collections::HashMap;

use anyhow::Context;
use serde::Serialize;
use tokio_postgres::Client;

use crate::log::ranges::PartitionRange;

const RUN: &str = "
    SELECT id, topic, request, state, created_at, updated_at, finished_at FROM replay_runs WHERE id = $1";

const RUNS: &str = "
    SELECT id, topic, request, state, created_at, updated_at, finished_at FROM replay_runs ORDER BY id";

const IN_DOUBT: &str = "
    SELECT partition, \"offset\" FROM replay_deliveries
     WHERE run_id = $1 AND status = 'sending' ORDER BY partition, \"offset\"";

const RUN_DEAD_LETTERS: &str = "
    SELECT partition, \"offset\", reason, last_error, attempts FROM replay_deliveries
     WHERE run_id = $1 AND status IN ('failed', 'unknown') ORDER BY partition, \"offset\"";

/// Per run: events by status in its ledger.
const RUN_COUNTS: &str = "
    SELECT run_id, status, count(*) FROM replay_deliveries
     WHERE $1::int8 IS NULL OR run_id = $1 GROUP BY run_id, status";

const RUN_PARTITIONS: &str = "
    SELECT partition, from_offset, to_offset, next_offset FROM replay_partitions
     WHERE run_id = $1 ORDER BY partition";

/// An unfinished run of the same command.
const FIND_UNFINISHED: &str = "
    SELECT id FROM replay_runs WHERE topic = $1 AND request = $2 AND state <> 'done'
     ORDER BY id DESC LIMIT 1";

const CREATE_RUN: &str = "
    INSERT INTO replay_runs (topic, request) VALUES ($1, $2) RETURNING id";

const CREATE_RUN_PARTITIONS: &str = "
    INSERT INTO replay_partitions (run_id, partition, from_offset, to_offset, next_offset)
    SELECT $1, v.partition, v.from_offset, v.to_offset, v.from_offset
      FROM unnest($2::int4[], $3::int8[], $4::int8[]) AS v(partition, from_offset, to_offset)";

/// A run's plan for one partition, and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunPartition {
    pub partition: i32,
    pub from_offset: i64,
    pub to_offset: i64,
    /// Every offset below is settled (the run's cursor).
    pub next_offset: i64,
}

/// A run as `replay list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub id: i64,
    pub topic: String,
    /// The command's bounds, as given.
    pub request: serde_json::Value,
    /// `running`, `interrupted` or `done`.
    pub state: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Events in the plan.
    pub total: i64,
    pub sent: i64,
    pub failed: i64,
    pub unknown: i64,
    /// In flight when the run stopped: may or may not have gone out.
    pub in_doubt: i64,
}

/// A run with its partitions and its dead letters (`replay describe`).
#[derive(Debug, Clone, Serialize)]
pub struct RunDescription {
    #[serde(flatten)]
    pub run: Run,
    pub partitions: Vec<RunPartition>,
    pub dead_letters: Vec<RunDeadLetter>,
    /// (partition, offset) of the events in doubt.
    pub in_doubt_events: Vec<(i32, i64)>,
}

/// An event the run could not mail.
#[derive(Debug, Clone, Serialize)]
pub struct RunDeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub reason: Option<String>,
    pub last_error: Option<String>,
    pub attempts: i32,
}

/// Creates a run for `ranges` (the plan) of `topic`.
pub async fn create_run(
    client: &mut Client,
    topic: &str,
    request: &serde_json::Value,
    ranges: &[PartitionRange],
) -> anyhow::Result<i64> {
    let tx = client.transaction().await?;
    let id: i64 = tx.query_one(CREATE_RUN, &[&topic, request]).await?.get(0);
    let partitions: Vec<i32> = ranges.iter().map(|r| r.partition).collect();
    let from: Vec<i64> = ranges.iter().map(|r| r.from).collect();
    let to: Vec<i64> = ranges.iter().map(|r| r.to).collect();
    tx.execute(CREATE_RUN_PARTITIONS, &[&id, &partitions, &from, &to])
        .await?;
    tx.commit().await?;
    Ok(id)
}

/// The newest unfinished run made by the same command, if any.
pub async fn find_unfinished(
    client: &Client,
    topic: &str,
    request: &serde_json::Value,
) -> anyhow::Result<Option<i64>> {
    Ok(client
        .query_opt(FIND_UNFINISHED, &[&topic, request])
        .await?
        .map(|r| r.get(0)))
}

const NEWEST_RUNS: &str = "
    SELECT id, topic, request, state, created_at, updated_at, finished_at FROM replay_runs
     ORDER BY id DESC LIMIT $1";

/// The newest `limit` runs, newest first, with their counts.
pub async fn newest_runs(client: &Client, limit: i64) -> anyhow::Result<Vec<Run>> {
    let mut runs = Vec::new();
    for row in client.query(NEWEST_RUNS, &[&limit]).await? {
        let id: i64 = row.get(0);
        let partitions = run_partitions(client, id).await?;
        let counts = run_counts(client, Some(id)).await?;
        runs.push(run_from(&row, &partitions, counts.get(&id)));
    }
    Ok(runs)
}

/// Every run, oldest first, with its counts.
pub async fn list_runs(client: &Client) -> anyhow::Result<Vec<Run>> {
    let rows = client.query(RUNS, &[]).await?;
    let counts = run_counts(client, None).await?;
    let mut runs = Vec::new();
    for row in rows {
        let id: i64 = row.get(0);
        let partitions = run_partitions(client, id).await?;
        runs.push(run_from(&row, &partitions, counts.get(&id)));
    }
    Ok(runs)
}

/// One run in full.
pub async fn describe_run(client: &Client, id: i64) -> anyhow::Result<RunDescription> {
    let row = client
        .query_opt(RUN, &[&id])
        .await?
        .with_context(|| format!("no replay run {id}"))?;
    let partitions = run_partitions(client, id).await?;
    let counts = run_counts(client, Some(id)).await?;
    let dead_letters = client
        .query(RUN_DEAD_LETTERS, &[&id])
        .await?
        .iter()
        .map(|r| RunDeadLetter {
            partition: r.get(0),
            offset: r.get(1),
            reason: r.get(2),
            last_error: r.get(3),
            attempts: r.get(4),
        })
        .collect();
    let in_doubt_events = client
        .query(IN_DOUBT, &[&id])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(RunDescription {
        run: run_from(&row, &partitions, counts.get(&id)),
        partitions,
        dead_letters,
        in_doubt_events,
    })
}

pub(super) async fn run_partitions(client: &Client, id: i64) -> anyhow::Result<Vec<RunPartition>> {
    Ok(client
        .query(RUN_PARTITIONS, &[&id])
        .await?
        .iter()
        .map(|r| RunPartition {
            partition: r.get(0),
            from_offset: r.get(1),
            to_offset: r.get(2),
            next_offset: r.get(3),
        })
        .collect())
}

async fn run_counts(
    client: &Client,
    id: Option<i64>,
) -> anyhow::Result<HashMap<i64, HashMap<String, i64>>> {
    let mut counts: HashMap<i64, HashMap<String, i64>> = HashMap::new();
    for row in client.query(RUN_COUNTS, &[&id]).await? {
        counts
            .entry(row.get(0))
            .or_default()
            .insert(row.get(1), row.get(2));
    }
    Ok(counts)
}

fn run_from(
    row: &tokio_postgres::Row,
    partitions: &[RunPartition],
    counts: Option<&HashMap<String, i64>>,
) -> Run {
    let count = |status: &str| counts.and_then(|c| c.get(status)).copied().unwrap_or(0);
    Run {
        id: row.get(0),
        topic: row.get(1),
        request: row.get(2),
        state: row.get(3),
        created_at: row.get(4),
        updated_at: row.get(5),
        finished_at: row.get(6),
        total: partitions
            .iter()
            .map(|p| (p.to_offset - p.from_offset).max(0))
            .sum(),
        sent: count("sent"),
        failed: count("failed"),
        unknown: count("unknown"),
        in_doubt: count("sending"),
    }
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement.
pub(super) fn statements() -> Vec<(&'static str, String)> {
    [
        ("app::replay::runs::CREATE_RUN", CREATE_RUN),
        (
            "app::replay::runs::CREATE_RUN_PARTITIONS",
            CREATE_RUN_PARTITIONS,
        ),
        ("app::replay::runs::FIND_UNFINISHED", FIND_UNFINISHED),
        ("app::replay::runs::RUN", RUN),
        ("app::replay::runs::RUNS", RUNS),
        ("app::replay::runs::NEWEST_RUNS", NEWEST_RUNS),
        ("app::replay::runs::RUN_PARTITIONS", RUN_PARTITIONS),
        ("app::replay::runs::RUN_COUNTS", RUN_COUNTS),
        ("app::replay::runs::RUN_DEAD_LETTERS", RUN_DEAD_LETTERS),
        ("app::replay::runs::IN_DOUBT", IN_DOUBT),
    ]
    .into_iter()
    .map(|(name, sql)| (name, sql.to_string()))
    .collect()
}
