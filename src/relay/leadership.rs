//! Leadership: a standby takes the lease (ending the backend of an expired
//! holder that still holds its row), a leader renews it every third of its
//! length and steps down when it lost it, and gives it up on shutdown. The
//! lease's SQL is in `lease`.

use std::time::Instant;

use tokio_postgres::error::SqlState;

use super::{drain_from, Relay, Role, Snapshot, StepOutcome};

impl Relay {
    /// A standby's step: take the lease if it is free or expired.
    pub(super) async fn take_lease(&mut self) -> anyhow::Result<StepOutcome> {
        let ttl = self.config.lease_ttl.as_secs_f64();
        let name = self.config.relay_name.clone();
        let instance = self.config.instance_id.clone();
        let (client, prepared) = self.client().await?;
        let acquired = match client
            .query_opt(&prepared.acquire, &[&name, &instance, &ttl])
            .await
        {
            Ok(row) => row,
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                // Someone holds the lease row. If its lease expired, it is
                // frozen mid-batch: end its backend, take over next.
                for row in client.query(&prepared.end_expired, &[&name]).await? {
                    let pid: i32 = row.get(0);
                    tracing::warn!(pid, "ended the backend of an expired relay leader that still held the lease row");
                }
                return Ok(StepOutcome::Standby);
            }
            Err(e) => return Err(e.into()),
        };
        let Some(row) = acquired else {
            return Ok(StepOutcome::Standby);
        };
        let epoch: i64 = row.get(0);
        let relayed = Snapshot::parse(row.get(1))?;
        let drain = drain_from(row.get(2), row.get(3))?;
        tracing::info!(epoch, instance = %instance, "relay became leader");
        self.set_role(Role::Leader {
            epoch,
            renewed_at: Instant::now(),
            relayed,
            drain,
            empty_peek: None,
        });
        Ok(StepOutcome::BecameLeader { epoch })
    }

    /// Renews the lease at `epoch`, saving the last empty peek's snapshot
    /// as relayed, and re-reads the cursor; false when the lease is no
    /// longer ours.
    pub(super) async fn renew_lease(&mut self, epoch: i64) -> anyhow::Result<bool> {
        let ttl = self.config.lease_ttl.as_secs_f64();
        let name = self.config.relay_name.clone();
        let (peek, peeked_from) = match &self.role {
            Role::Leader {
                empty_peek: Some(peek),
                relayed,
                ..
            } => (Some(peek.text.clone()), Some(relayed.text.clone())),
            _ => (None, None),
        };
        let (client, prepared) = self.client().await?;
        let Some(row) = client
            .query_opt(&prepared.renew, &[&name, &epoch, &ttl, &peek, &peeked_from])
            .await?
        else {
            return Ok(false);
        };
        let relayed = Snapshot::parse(row.get(0))?;
        let drain_now = drain_from(row.get(1), row.get(2))?;
        if let Role::Leader {
            renewed_at,
            relayed: mirror,
            drain,
            empty_peek,
            ..
        } = &mut self.role
        {
            *renewed_at = Instant::now();
            *mirror = relayed;
            *drain = drain_now;
            *empty_peek = None;
        }
        Ok(true)
    }

    pub(super) fn lose_leadership(&mut self, epoch: i64) -> StepOutcome {
        tracing::warn!(epoch, "relay lost its lease to another process");
        self.set_role(Role::Standby);
        StepOutcome::LostLeadership
    }

    /// Gives the lease up so a standby takes over at once.
    pub async fn release(&mut self) -> anyhow::Result<()> {
        if let Role::Leader { epoch, .. } = self.role {
            let name = self.config.relay_name.clone();
            self.set_role(Role::Standby);
            let (client, prepared) = self.client().await?;
            client.execute(&prepared.release, &[&name, &epoch]).await?;
            tracing::info!(epoch, "relay released its lease");
        }
        Ok(())
    }
}
