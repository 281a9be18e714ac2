//! Consumer groups with Kafka's semantics, coordinated only through
//! Postgres (docs/invariants.md, 6 and 7).
//!
//! * [`membership`]: a member heartbeats its row in `group_members`; it is
//!   dead once `heartbeat_at + session_timeout` has passed. Each (group,
//!   topic, partition) row in `group_partitions` has an owner and an epoch
//!   that bumps on every change of owner; a commit succeeds only while
//!   `owner = me AND epoch = my epoch`, so a member that lost a partition
//!   cannot commit for it.
//! * [`assign`]: the cooperative, incremental assignment as a pure function.
//! * [`consumer`]: a member's runtime (heartbeats, rebalances, one worker
//!   per owned partition); [`records`]: the worker that runs a
//!   [`consumer::RecordHandler`] over a partition's records.
//! * [`admin`]: list and describe groups (the operator's view).
//! * `progress`: a member's progress through a backlog, logged.
//! * [`dead_letters`]: records a group's handler gave up on.
//! * [`delivery`]: the delivery policy consumers share: retries, parking
//!   (fenced), one attempt per event at a time, counted.

pub mod admin;
pub mod assign;
pub mod consumer;
pub mod dead_letters;
pub mod delivery;
pub mod membership;
mod metrics;
pub mod partition;
pub(crate) mod progress;
pub mod records;

use std::time::Duration;

pub use membership::{commit, start_offset, Membership};

/// What a group with no committed offset for a partition starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    /// The log start offset: nothing already in the log is missed.
    Earliest,
    /// The log end offset: only records appended from now on.
    Latest,
}

#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub group_id: String,
    pub topics: Vec<String>,
    /// The member's identity: random per process, or the static instance
    /// id (see [`GroupConfig::with_instance_id`]).
    pub member_id: String,
    /// This start of the member: a newer incarnation of the same static
    /// member fences an older one still running.
    pub incarnation: String,
    pub host: String,
    pub client_id: String,
    pub session_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub offset_reset: OffsetReset,
}

impl GroupConfig {
    pub fn new(group_id: &str, topics: &[&str]) -> GroupConfig {
        let host = crate::host_name();
        GroupConfig {
            group_id: group_id.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            member_id: format!(
                "{group_id}-{host}-{}-{:06x}",
                std::process::id(),
                rand::random::<u32>() & 0xff_ffff
            ),
            incarnation: format!("{}-{:08x}", std::process::id(), rand::random::<u32>()),
            host,
            client_id: "outbox-relay".into(),
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            offset_reset: OffsetReset::Earliest,
        }
    }

    /// Bounds for the member's database sessions: a member frozen inside a
    /// transaction (holding a partition's row lock) loses it well within
    /// its session timeout, and a claim never waits long on such a lock.
    pub fn session_bounds(&self) -> crate::db::SessionBounds {
        crate::db::SessionBounds {
            idle_in_transaction: (self.session_timeout / 2).max(Duration::from_millis(500)),
            lock_wait: (self.session_timeout / 5).min(Duration::from_secs(1)),
            statement: None,
        }
    }

    /// Static membership (Kafka's `group.instance.id`, KIP-345): the
    /// member's identity survives restarts, so a member restarted with the
    /// same id takes its partitions back at once instead of after the
    /// session timeout; a second process running with the same id fences
    /// the first.
    pub fn with_instance_id(mut self, instance_id: &str) -> GroupConfig {
        self.member_id = instance_id.to_string();
        self
    }
}

/// A partition this member owns, at the epoch it was granted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Assignment {
    pub topic: String,
    pub partition: i32,
    pub epoch: i64,
}

/// What one heartbeat decided.
#[derive(Debug, Default)]
pub struct Rebalance {
    /// Every partition this member owns now (after claims).
    pub owned: Vec<Assignment>,
    /// Partitions this member should hand over: stop processing, commit,
    /// then call [`Membership::release`].
    pub to_release: Vec<Assignment>,
}

/// How a member of a group runs its partitions.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub group: GroupConfig,
    /// Records read ahead per partition (in flight or queued behind a key).
    pub max_in_flight_per_partition: usize,
    /// How often progress is committed while records complete.
    pub commit_interval: Duration,
    /// On shutdown or hand-over, how long in-flight records may finish.
    pub shutdown_grace: Duration,
    /// Connections for reading partitions and committing offsets (the
    /// membership's heartbeats and claims have two of their own).
    pub read_connections: usize,
}

impl ConsumerConfig {
    pub fn new(group: GroupConfig) -> ConsumerConfig {
        ConsumerConfig {
            group,
            max_in_flight_per_partition: 128,
            commit_interval: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(10),
            read_connections: 8,
        }
    }
}
