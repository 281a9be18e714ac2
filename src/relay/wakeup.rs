//! How writers wake the relay: a writer in this process wakes it directly;
//! one elsewhere sends `NOTIFY outbox_written`. Without either the relay
//! polls.

use std::sync::Arc;

/// Wakes an idle relay at once when a writer in this process committed (an
/// order placed through the API), or when `NOTIFY outbox_written` came from
/// a writer elsewhere. Without it the relay polls.
#[derive(Clone, Default)]
pub struct Wakeup(Arc<tokio::sync::Notify>);

impl Wakeup {
    /// Something was committed to the outbox.
    pub fn wake(&self) {
        self.0.notify_one();
    }

    pub(super) async fn woken(&self) {
        self.0.notified().await
    }
}

/// What a writer in this process does after committing outbox rows, so
/// that an idle relay moves them at once rather than at its next poll.
/// Never part of the writer's transaction: it adds nothing to its commit.
#[derive(Clone, Default)]
pub enum OutboxWritten {
    /// Nobody is told; the relay finds the rows by polling.
    #[default]
    Unsignalled,
    /// The relay runs in this process: wake it directly.
    Relay(Wakeup),
    /// The relay runs elsewhere: a coalesced `NOTIFY outbox_written`.
    Notify(crate::log::notify::OutboxNotifier),
}

impl OutboxWritten {
    /// Outbox rows were committed.
    pub fn committed(&self) {
        match self {
            OutboxWritten::Unsignalled => {}
            OutboxWritten::Relay(wakeup) => wakeup.wake(),
            OutboxWritten::Notify(notifier) => notifier.written(),
        }
    }
}
