//! The relay's connections: the one its batches run on, and the second one
//! that reads drain batches ahead and writes them ahead; each with its
//! statements prepared once, both bounded by the lease on the server side.

use std::time::Duration;

use anyhow::Context;
use tokio_postgres::{Client, Statement};

use super::append::{APPEND_BATCH, PARK_ROWS};
use super::drain::SELECT_BATCH_NOW;
use super::lease::{
    ACQUIRE_LEASE, END_EXPIRED_HOLDER, LOCK_STATE_WITH_HEADS, RELEASE_LEASE, RENEW_LEASE,
    SESSION_SETTINGS,
};
use super::{Relay, Role};

/// The relay's statements, prepared once per connection: a batch is then two
/// pipelined round trips with no Parse/Describe per statement. `PEEK` and
/// `SELECT_BATCH` are not among them: they are sent unnamed, to be planned
/// with their snapshots each time (see `select_batch_params`).
/// `SELECT_BATCH_NOW` is, as it calls a function that plans its statement
/// for every call.
pub(super) struct Prepared {
    pub acquire: Statement,
    pub renew: Statement,
    pub release: Statement,
    pub end_expired: Statement,
    pub lock_state_with_heads: Statement,
    pub select_batch_now: Statement,
    pub append: Statement,
    pub park: Statement,
}

impl Prepared {
    async fn on(client: &Client) -> Result<Prepared, tokio_postgres::Error> {
        let all = futures_util::future::try_join_all(
            [
                ACQUIRE_LEASE,
                RENEW_LEASE,
                RELEASE_LEASE,
                END_EXPIRED_HOLDER,
                LOCK_STATE_WITH_HEADS,
                SELECT_BATCH_NOW,
                APPEND_BATCH,
                PARK_ROWS,
            ]
            .map(|sql| client.prepare(sql)),
        )
        .await?;
        let mut all = all.into_iter();
        let mut next = || all.next().expect("one statement each");
        Ok(Prepared {
            acquire: next(),
            renew: next(),
            release: next(),
            end_expired: next(),
            lock_state_with_heads: next(),
            select_batch_now: next(),
            append: next(),
            park: next(),
        })
    }
}

/// The relay's second connection (see `mover`): it reads a drain's next
/// batch while the current one commits and, from the batch after that, writes
/// every other batch, so its statements are prepared and its backend's
/// `NOTIFY`s are skipped by this process's listeners too.
pub(super) struct Second {
    pub client: Client,
    pub prepared: Prepared,
    _announcing: crate::log::notify::AnnouncingBackend,
}

impl Relay {
    /// A connection with the relay's session bounds, and its backend's
    /// process id.
    async fn connect(&self) -> anyhow::Result<(Client, i32)> {
        let client = self.db.connect().await?;
        let (bound, lock_wait) = session_bounds(self.config.lease_ttl);
        let settings = client
            .query_one(SESSION_SETTINGS, &[&bound, &lock_wait])
            .await?;
        Ok((client, settings.get(0)))
    }

    pub(super) async fn client(&mut self) -> anyhow::Result<&mut (Client, Prepared)> {
        if self.client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            if self.client.is_some() && matches!(self.role, Role::Leader { .. }) {
                // The lease records the old backend: step down and take the
                // lease again on the new connection (it is ours, at once).
                self.set_role(Role::Standby);
                anyhow::bail!("the relay's connection closed");
            }
            let (client, pid) = self.connect().await?;
            let prepared = Prepared::on(&client)
                .await
                .context("preparing the relay's statements")?;
            // Its batches' `NOTIFY` is for other processes: this one is
            // told by `move_batch` itself.
            self.announcing = Some(crate::log::notify::AnnouncingBackend::register(
                self.db.url(),
                pid,
            ));
            self.client = Some((client, prepared));
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// The second connection, connected when missing; None when it cannot
    /// be had (the relay then reads and writes each batch itself).
    pub(super) async fn take_second(&mut self) -> Option<Second> {
        if let Some(second) = self.second.take().filter(|c| !c.client.is_closed()) {
            return Some(second);
        }
        let connected = async {
            let (client, pid) = self.connect().await?;
            let prepared = Prepared::on(&client).await?;
            anyhow::Ok(Second {
                client,
                prepared,
                _announcing: crate::log::notify::AnnouncingBackend::register(self.db.url(), pid),
            })
        };
        match connected.await {
            Ok(second) => Some(second),
            Err(e) => {
                tracing::debug!(
                    error = format!("{e:#}"),
                    "no second connection; reading and writing batches in turn"
                );
                None
            }
        }
    }
}

/// Server-side bounds of a relay session, from the lease: a transaction
/// idle longer than the lease, or at least a second, is ended by Postgres,
/// so a frozen leader's locks go within about a lease; row locks are waited
/// for at most a fifth of the lease (at most 200 ms), after which a standby
/// looks for an expired holder to end.
fn session_bounds(lease: Duration) -> (String, String) {
    let bound = lease.max(Duration::from_secs(1));
    let lock_wait = (lease / 5).min(Duration::from_millis(200));
    (
        format!("{}ms", bound.as_millis()),
        format!("{}ms", lock_wait.as_millis().max(1)),
    )
}
