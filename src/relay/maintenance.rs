//! The relay leader's upkeep, a role beside the relay: delete outbox rows
//! already in the log, keep the log's day partitions ahead, apply
//! retention. It works only while this process's relay leads, on one
//! connection kept between passes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::Relay;
use crate::shutdown::Shutdown;

/// How often the upkeep runs.
const PASS_INTERVAL: Duration = Duration::from_secs(5);
/// How often partitions and retention are looked at (in a pass).
const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// Outbox rows deleted per statement, until caught up.
const DELETE_CHUNK: i64 = 50_000;

pub struct Maintenance {
    db: crate::db::Db,
    relay_name: String,
    leadership: Arc<AtomicBool>,
    client: Option<Client>,
    last_retention: Option<Instant>,
}

/// What one [`Maintenance::step`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MaintenanceOutcome {
    pub outbox_rows_removed: u64,
    pub retention: Option<crate::log::storage::RetentionOutcome>,
}

impl Maintenance {
    /// Upkeep that runs while `relay` leads.
    pub fn new(relay: &Relay) -> Maintenance {
        Maintenance {
            db: relay.db.clone(),
            relay_name: relay.config.relay_name.clone(),
            leadership: relay.leadership(),
            client: None,
            last_retention: None,
        }
    }

    /// One pass of upkeep (whether or not this process leads: callers check).
    pub async fn step(&mut self, shutdown: &Shutdown) -> anyhow::Result<MaintenanceOutcome> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(self.db.connect().await?);
        }
        let client = self.client.as_mut().expect("connected above");
        let mut outcome = MaintenanceOutcome::default();
        // In chunks, until caught up: keeps up with any relay rate.
        loop {
            let n = delete_relayed_outbox_rows(client, &self.relay_name, DELETE_CHUNK).await?;
            outcome.outbox_rows_removed += n;
            if n < DELETE_CHUNK as u64 || shutdown.is_triggered() {
                break;
            }
        }
        if self
            .last_retention
            .is_none_or(|t| t.elapsed() >= RETENTION_INTERVAL)
        {
            let tx = client.transaction().await?;
            crate::log::storage::ensure_day_partitions(&tx).await?;
            tx.commit().await?;
            outcome.retention = Some(crate::log::storage::enforce_retention(client).await?);
            self.last_retention = Some(Instant::now());
        }
        Ok(outcome)
    }
}

impl crate::service::Service for Maintenance {
    fn name(&self) -> &'static str {
        "maintenance"
    }

    async fn run(mut self, mut shutdown: Shutdown) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PASS_INTERVAL) => {}
                _ = shutdown.recv() => return Ok(()),
            }
            if !self.leadership.load(Ordering::Relaxed) {
                continue;
            }
            match self.step(&shutdown).await {
                Ok(outcome) => {
                    if outcome.outbox_rows_removed > 0 {
                        tracing::debug!(
                            removed = outcome.outbox_rows_removed,
                            "removed relayed outbox rows"
                        );
                    }
                    if let Some(retention) = outcome.retention.filter(|r| *r != Default::default())
                    {
                        tracing::info!(?retention, "retention applied");
                    }
                }
                Err(e) => {
                    self.client = None;
                    tracing::warn!(error = format!("{e:#}"), "relay maintenance failed");
                }
            }
        }
    }
}

/// Up to `$1` outbox rows of transactions that completed before relay `$2`'s
/// `relayed_snapshot`.
const DELETE_RELAYED: &str = "
    DELETE FROM outbox o USING (
        SELECT id FROM outbox
         WHERE txid < (SELECT pg_snapshot_xmin(relayed_snapshot) FROM relay_state WHERE relay = $2)
         LIMIT $1) d
     WHERE o.id = d.id";

/// Deletes up to `limit` outbox rows that are certainly in the log: those
/// of transactions that completed before `relayed_snapshot` was taken.
pub async fn delete_relayed_outbox_rows(
    client: &Client,
    relay_name: &str,
    limit: i64,
) -> anyhow::Result<u64> {
    let removed = client
        .execute(DELETE_RELAYED, &[&limit, &relay_name])
        .await?;
    Ok(removed)
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(super) fn statements() -> Vec<(&'static str, String)> {
    vec![(
        "relay::maintenance::DELETE_RELAYED",
        DELETE_RELAYED.to_string(),
    )]
}
