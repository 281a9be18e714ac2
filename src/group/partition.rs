//! A partition as a member owns it: its [`Lease`] (which fences every
//! write made on the group's behalf), the [`PartitionWork`] the member runs
//! on it, and how that work is told to stop. Below both the member runtime
//! (`consumer`) and the record loop (`records`).

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

use super::{Assignment, ConsumerConfig};

/// A partition as one member owns it: the member, and the epoch its
/// ownership began at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub group_id: String,
    pub member_id: String,
    pub topic: String,
    pub partition: i32,
    pub epoch: i64,
}

/// How a partition worker is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// Finish (within the grace period), commit, then return.
    Gracefully,
    /// Lost ownership: drop everything, commit nothing.
    Now,
}

/// What a member does with each partition it owns, from the moment it owns
/// it until [`OwnedPartition::stop`] says otherwise. [`Records`](super::records::Records) (a
/// [`RecordHandler`](super::records::RecordHandler) per record) is the usual one; the Kafka mirror moves
/// whole batches in offset order.
pub trait PartitionWork: Send + Sync + 'static {
    /// Works on `partition` until told to stop, or fenced. A returned
    /// error is logged; the next heartbeat restarts the partition from its
    /// committed offset if it is still this member's.
    fn run_partition(
        self: Arc<Self>,
        partition: OwnedPartition,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Called once the member has stopped (see [`RecordHandler::stopped`](super::records::RecordHandler::stopped)).
    fn stopped(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// A partition as handed to [`PartitionWork`].
pub struct OwnedPartition {
    /// The member's read pool (reads and fenced commits).
    pub pool: deadpool_postgres::Pool,
    pub config: ConsumerConfig,
    pub assignment: Assignment,
    /// Wakes the worker when the relay appended past where it reads.
    pub appended: crate::log::notify::PartitionAppends,
    /// How the member tells the work to stop (`Gracefully`: finish, commit,
    /// return; `Now`: the partition is lost, commit nothing).
    pub stop: watch::Receiver<Stop>,
}

impl OwnedPartition {
    /// Where work on the partition starts: the group's committed offset, or
    /// the reset policy's end when there is none.
    pub async fn start_offset(&self) -> anyhow::Result<i64> {
        let client = self.pool.get().await?;
        crate::group::start_offset(
            &**client,
            &self.config.group.group_id,
            &self.assignment.topic,
            self.assignment.partition,
            self.config.group.offset_reset,
        )
        .await
    }
}
