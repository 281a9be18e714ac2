//! The mail role: the worker as a member of the mail group, on the
//! connections the process's budget leaves it.

use std::sync::Arc;

use super::{MailSettings, MailWorker};
use crate::db::Db;
use crate::group::consumer::{Consumer, Records, MEMBER_OWN_CONNECTIONS};

/// The mail worker's pool (ledger reads and writes, dead letters), and its
/// group's reads and commits, when the budget allows.
const LEDGER_CONNECTIONS: usize = 16;
const READ_CONNECTIONS: usize = 8;

/// The mail role as the process runs it.
pub type MailConsumer = Consumer<Records<MailWorker>>;

/// The mail role on `db`, leaving `later` connections of the budget to the
/// roles built after it.
pub fn role(db: &Db, settings: &MailSettings, later: usize) -> anyhow::Result<MailConsumer> {
    tracing::info!(transport = %settings.target, "mail worker ready");
    let (reads, ledger) = mail_connections(db.remaining().map(|left| left.saturating_sub(later)));
    let mut consumer = settings.consumer_config();
    consumer.read_connections = reads;
    let worker = MailWorker::from_settings(
        db.bounded_pool("mail worker", ledger, consumer.group.session_bounds())?,
        settings,
    )?;
    Consumer::new("mail", db, consumer, Arc::new(worker))
}

/// The mail role's reads-and-commits and ledger connections within `left`
/// (what `--max-db-connections` leaves it): the defaults if they fit, else
/// both shrunk (a third to reads), at least 2 each. The member's own
/// connections are never shrunk, so a burst of mails that takes every
/// ledger connection cannot delay a heartbeat or a commit; waiting for a
/// connection is back-pressure.
fn mail_connections(left: Option<usize>) -> (usize, usize) {
    let shared = left.map_or(usize::MAX, |left| {
        left.saturating_sub(MEMBER_OWN_CONNECTIONS)
    });
    if shared >= READ_CONNECTIONS + LEDGER_CONNECTIONS {
        return (READ_CONNECTIONS, LEDGER_CONNECTIONS);
    }
    let reads = (shared / 3).max(2);
    (reads, shared.saturating_sub(reads).max(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mail_role_shrinks_its_shared_connections_to_the_budget_never_its_own() {
        assert_eq!(mail_connections(None), (8, 16));
        assert_eq!(mail_connections(Some(64)), (8, 16));
        assert_eq!(mail_connections(Some(27)), (8, 16));
        assert_eq!(mail_connections(Some(20)), (5, 12));
        // 3 of the member's own, 2 for reads and commits, 3 for the ledger.
        assert_eq!(mail_connections(Some(8)), (2, 3));
        // Below the minimum: the budget check refuses it with the figures.
        assert_eq!(mail_connections(Some(5)), (2, 2));
    }
}
