//! A consumer-group member: heartbeats, rebalances, and one worker per
//! partition it owns, running its [`PartitionWork`] (usually [`Records`],
//! a [`RecordHandler`] per record, see [`super::records`]). The member
//! waits for new records on a LISTEN connection of its own (a pooled
//! connection would drop the notifications), with a slow poll as a
//! fallback.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

pub use super::partition::{Lease, OwnedPartition, PartitionWork, Stop};
pub use super::records::{RecordHandler, Records};
pub use super::ConsumerConfig;
use crate::db::Db;
use crate::group::{Assignment, Membership};
use crate::shutdown::Shutdown;

struct PartitionWorker {
    assignment: Assignment,
    stop: watch::Sender<Stop>,
    /// The task lives in the member's `JoinSet`: dropping the member (or
    /// aborting `run`) aborts every partition worker with it.
    task: AbortHandle,
}

impl PartitionWorker {
    fn stop_now(&self) {
        let _ = self.stop.send(Stop::Now);
        self.task.abort();
    }
}

/// Heartbeats, claims, releases.
const MEMBERSHIP_POOL_SIZE: usize = 2;

/// A member's own connections, beside its reads and commits: heartbeats
/// and claims, and LISTEN.
pub const MEMBER_OWN_CONNECTIONS: usize = MEMBERSHIP_POOL_SIZE + 1;

/// A group member as a role of the process: its connections are reserved
/// when it is built, its membership begins when it runs.
pub struct Consumer<W> {
    name: &'static str,
    db: Db,
    config: ConsumerConfig,
    work: Arc<W>,
    reads: deadpool_postgres::Pool,
    membership: deadpool_postgres::Pool,
}

impl<H: RecordHandler> Consumer<Records<H>> {
    /// A member that runs `handler` over each record of its partitions.
    pub fn new(
        name: &'static str,
        db: impl Into<Db>,
        config: ConsumerConfig,
        handler: Arc<H>,
    ) -> anyhow::Result<Consumer<Records<H>>> {
        Consumer::with_work(name, db, config, Arc::new(Records(handler)))
    }
}

impl<W: PartitionWork> Consumer<W> {
    /// A member that runs `work` on each partition it owns.
    pub fn with_work(
        name: &'static str,
        db: impl Into<Db>,
        config: ConsumerConfig,
        work: Arc<W>,
    ) -> anyhow::Result<Consumer<W>> {
        let db = db.into();
        let bounds = config.group.session_bounds();
        let reads = db.bounded_pool("consumer reads", config.read_connections, bounds)?;
        let membership = db.bounded_pool("group membership", MEMBERSHIP_POOL_SIZE, bounds)?;
        db.reserve("consumer LISTEN", 1)?;
        Ok(Consumer {
            name,
            db,
            config,
            work,
            reads,
            membership,
        })
    }
}

impl<W: PartitionWork> crate::service::Service for Consumer<W> {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let membership = Membership::join_with(self.membership, self.config.group.clone()).await?;
        let result = run_member(
            &self.db,
            self.reads,
            Arc::new(membership),
            self.config,
            self.work.clone(),
            shutdown,
        )
        .await;
        self.work.stopped().await;
        result
    }
}

/// Runs a group member until `shutdown`: heartbeats, rebalances, and one
/// worker per owned partition.
pub async fn run<H: RecordHandler>(
    db: impl Into<Db>,
    config: ConsumerConfig,
    handler: Arc<H>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    use crate::service::Service;
    Consumer::new("consumer", db, config, handler)?
        .run(shutdown)
        .await
}

async fn run_member<W: PartitionWork>(
    db: &Db,
    pool: deadpool_postgres::Pool,
    membership: Arc<Membership>,
    config: ConsumerConfig,
    work: Arc<W>,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let appended = crate::log::notify::listen(db.url())?;
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut workers: HashMap<(String, i32), PartitionWorker> = HashMap::new();
    // Partitions being handed over: finishing their in-flight records.
    let mut handing_over: HashMap<(String, i32), PartitionWorker> = HashMap::new();
    // When the last successful heartbeat was *sent*: our session runs from there.
    let mut session_start = Instant::now();
    // Stop working a little before others may take our partitions over.
    let self_fence_after = config
        .group
        .session_timeout
        .saturating_sub(config.group.heartbeat_interval);
    tracing::info!(group = %config.group.group_id, member = %config.group.member_id, "joined consumer group");
    // Exported from the start (at 0), so a panel or an alert sees a series.
    super::metrics::group_metrics()
        .rebalances
        .with_label_values(&[&config.group.group_id]);
    let mut last_logged_assignment: Vec<String> = Vec::new();
    let mut progress = crate::group::progress::BacklogProgress::new();

    loop {
        while tasks.try_join_next().is_some() {}
        // A worker that failed (say, the database went away) is restarted
        // by this heartbeat if the partition is still ours.
        workers.retain(|_, w| !w.task.is_finished());
        // Hand-overs whose worker has committed and stopped: release now.
        let done: Vec<(String, i32)> = handing_over
            .iter()
            .filter(|(_, w)| w.task.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for key in done {
            let worker = handing_over.remove(&key).expect("listed above");
            release(&membership, &worker.assignment).await;
        }

        // Our partitions may be taken over once our session runs out: stop
        // working on them first, and never wait on a heartbeat past that.
        let left = self_fence_after.saturating_sub(session_start.elapsed());
        if left.is_zero() && !(workers.is_empty() && handing_over.is_empty()) {
            tracing::warn!("no heartbeat within the session timeout; stopping all partitions");
            for (_, worker) in workers.drain().chain(handing_over.drain()) {
                worker.stop_now();
            }
        }
        let mut limit = config.group.session_timeout / 3;
        if !(workers.is_empty() && handing_over.is_empty()) {
            limit = limit.min(left.max(Duration::from_millis(100)));
        }
        let sent_at = Instant::now();
        let heartbeat = tokio::select! {
            result = tokio::time::timeout(limit, membership.heartbeat()) => {
                result.unwrap_or_else(|_| Err(anyhow::anyhow!("heartbeat timed out")))
            }
            _ = shutdown.recv() => break,
        };
        match heartbeat {
            Ok(rebalance) => {
                session_start = sent_at;
                let owned: HashMap<(String, i32), i64> = rebalance
                    .owned
                    .iter()
                    .map(|a| ((a.topic.clone(), a.partition), a.epoch))
                    .collect();
                // Lost (taken over, or fenced by a new epoch): stop at once, no commit.
                let lost: Vec<(String, i32)> = workers
                    .iter()
                    .filter(|(key, w)| {
                        owned.get(*key) != Some(&w.assignment.epoch)
                            && !rebalance.to_release.contains(&w.assignment)
                    })
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in lost {
                    tracing::warn!(topic = %key.0, partition = key.1, "partition lost; stopping its work");
                    workers.remove(&key).expect("listed above").stop_now();
                }
                // Hand-overs: finish, commit, then release (on a later
                // heartbeat, so heartbeats go on meanwhile).
                for assignment in &rebalance.to_release {
                    let key = (assignment.topic.clone(), assignment.partition);
                    if let Some(worker) = workers.remove(&key) {
                        let _ = worker.stop.send(Stop::Gracefully);
                        handing_over.insert(key, worker);
                    } else if !handing_over.contains_key(&key) {
                        release(&membership, assignment).await;
                    }
                }
                for assignment in rebalance.owned {
                    let key = (assignment.topic.clone(), assignment.partition);
                    // One worker per partition: a partition still finishing
                    // its hand-over is released first, then claimed anew.
                    if workers.contains_key(&key) || handing_over.contains_key(&key) {
                        continue;
                    }
                    let (stop_tx, stop_rx) = watch::channel(Stop::Running);
                    let span = tracing::info_span!(
                        "consumer.partition",
                        group = %config.group.group_id,
                        topic = %assignment.topic,
                        partition = assignment.partition,
                        epoch = assignment.epoch,
                    );
                    let partition = OwnedPartition {
                        pool: pool.clone(),
                        config: config.clone(),
                        assignment: assignment.clone(),
                        appended: appended.subscribe(&assignment.topic, assignment.partition),
                        stop: stop_rx,
                    };
                    let work = work.clone();
                    let task = tasks.spawn(tracing::Instrument::instrument(
                        async move {
                            let (topic, number) = (partition.assignment.topic.clone(), partition.assignment.partition);
                            if let Err(e) = work.run_partition(partition).await {
                                tracing::warn!(topic = %topic, partition = number, error = format!("{e:#}"),
                                    "partition worker failed; the next heartbeat restarts it");
                            }
                        },
                        span,
                    ));
                    workers.insert(
                        key,
                        PartitionWorker {
                            assignment,
                            stop: stop_tx,
                            task,
                        },
                    );
                }
                let mut assigned: Vec<&(String, i32)> = workers.keys().collect();
                assigned.sort();
                let assigned: Vec<String> =
                    assigned.iter().map(|(t, p)| format!("{t}:{p}")).collect();
                if assigned != last_logged_assignment {
                    super::metrics::group_metrics()
                        .rebalances
                        .with_label_values(&[&config.group.group_id])
                        .inc();
                    tracing::info!(group = %config.group.group_id, partitions = %assigned.join(","), "assignment changed");
                    last_logged_assignment = assigned;
                }
            }
            Err(e)
                if e.downcast_ref::<crate::group::membership::GroupError>()
                    .is_some() =>
            {
                // Replaced by a newer incarnation: drop everything, commit nothing.
                for (_, worker) in workers.drain().chain(handing_over.drain()) {
                    worker.stop_now();
                }
                tasks.abort_all();
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "group heartbeat failed; retrying");
                // Near the session timeout others may take our partitions:
                // stop working on them rather than race a new owner.
                if session_start.elapsed() >= self_fence_after
                    && !(workers.is_empty() && handing_over.is_empty())
                {
                    tracing::warn!(
                        "no heartbeat within the session timeout; stopping all partitions"
                    );
                    for (_, worker) in workers.drain().chain(handing_over.drain()) {
                        worker.stop_now();
                    }
                }
            }
        }
        if !workers.is_empty() {
            progress
                .sample(&pool, &config.group.group_id, &config.group.member_id)
                .await;
        }
        tokio::select! {
            _ = tokio::time::sleep(config.group.heartbeat_interval) => {}
            _ = shutdown.recv() => break,
        }
    }

    // Graceful shutdown: finish or abandon in-flight work, commit, release, leave.
    let stopping: Vec<PartitionWorker> = workers
        .into_values()
        .chain(handing_over.into_values())
        .collect();
    for worker in &stopping {
        let _ = worker.stop.send(Stop::Gracefully);
    }
    while tasks.join_next().await.is_some() {}
    for worker in stopping {
        release(&membership, &worker.assignment).await;
    }
    membership.leave().await?;
    tracing::info!(group = %config.group.group_id, member = %config.group.member_id, "left consumer group");
    Ok(())
}

async fn release(membership: &Membership, assignment: &Assignment) {
    if let Err(e) = membership.release(assignment).await {
        // Not fatal: the partition frees itself when our session times out.
        tracing::warn!(
            error = format!("{e:#}"),
            partition = assignment.partition,
            "could not release a partition"
        );
    }
}
