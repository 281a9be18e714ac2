//! Notifications, read on the process's `LISTEN` connection to their
//! database, one for every channel (`log::listen`).
//!
//! * `event_log_appended`: one `NOTIFY` per relay batch (never in a
//!   writer's transaction), naming the partitions it appended to and each
//!   one's new log end offset, so a consumer wakes only the workers of those
//!   partitions, and only those that have not read that far ([`Appends`]).
//!   A relay in the same process also announces its batch right after its
//!   commit ([`appended_here`]), ahead of its own `NOTIFY`, and hands over
//!   a small batch's records with it: a worker whose next offset is the
//!   first of them takes them instead of reading them back ([`Wake`]).
//! * `outbox_written`: a writer (the order API in a process without the
//!   relay) says it committed outbox rows, in a tiny transaction of its own
//!   after its commit ([`OutboxNotifier`]); the relay wakes at once instead
//!   of waiting for its next poll ([`listen_outbox_written`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;

use super::Record;

/// The channel the relay notifies once per appended batch.
pub const APPENDED_CHANNEL: &str = "event_log_appended";

/// The channel writers notify after committing outbox rows.
pub const OUTBOX_WRITTEN_CHANNEL: &str = "outbox_written";

/// Longest payload sent (Postgres takes up to 8,000 bytes); see [`payload`].
const MAX_PAYLOAD: usize = 7_000;

/// The payload naming the partitions a batch appended to, each with its
/// new log end offset: `topic\tp:end,p:end` lines. Too long, it names the
/// partitions only (`topic\tp,p`, which wakes their workers whatever they
/// have read), and longer still nothing (which wakes every worker).
pub fn payload(appended: &[(&str, i32, i64)]) -> String {
    use std::fmt::Write;
    let mut appended = appended.to_vec();
    // Sorted by topic, so each topic is one line.
    appended.sort_unstable();
    let lines = |with_ends: bool| {
        let mut text = String::new();
        let mut last_topic = None;
        for &(topic, partition, end) in &appended {
            if last_topic == Some(topic) {
                text.push(',');
            } else {
                if last_topic.is_some() {
                    text.push('\n');
                }
                text.push_str(topic);
                text.push('\t');
                last_topic = Some(topic);
            }
            let _ = write!(text, "{partition}");
            if with_ends {
                let _ = write!(text, ":{end}");
            }
        }
        text
    };
    // The shorter forms are built only when the longer one does not fit.
    let with_ends = lines(true);
    if with_ends.len() <= MAX_PAYLOAD {
        return with_ends;
    }
    Some(lines(false))
        .filter(|partitions_only| partitions_only.len() <= MAX_PAYLOAD)
        .unwrap_or_default()
}

/// The partitions a payload names, with their log end offset where it
/// says (an older relay, or a long list, names partitions only); None for
/// "every partition".
fn parse_payload(text: &str) -> Option<Vec<(&str, i32, Option<i64>)>> {
    if text.is_empty() {
        return None;
    }
    let mut appended = Vec::new();
    for line in text.lines() {
        let (topic, list) = line.split_once('\t')?;
        for item in list.split(',') {
            let (partition, end) = match item.split_once(':') {
                Some((partition, end)) => (partition, Some(end.parse().ok()?)),
                None => (item, None),
            };
            appended.push((topic, partition.parse().ok()?, end));
        }
    }
    Some(appended)
}

/// What a partition's workers have been told: the highest log end offset
/// announced, how many announcements gave none (a notification that named
/// no end, or a reconnect that may have missed some), and the records
/// handed over with the announcement of `end` (those just below it).
#[derive(Clone, Default)]
struct Announced {
    end: i64,
    unknown: u64,
    records: Option<Arc<[Record]>>,
}

/// Why [`PartitionAppends::past`] returned.
pub enum Wake {
    /// Records at the worker's next offset may be in the log: read them.
    Read,
    /// The records from the worker's next offset to the announced end,
    /// committed by a relay in this process: no read needed.
    Handed(Arc<[Record]>),
}

/// Wake-ups for records appended to the log, per partition and for all.
/// Its subscription ends once every clone is dropped (and the process's
/// `LISTEN` connection with it, if nothing else listens there).
#[derive(Clone)]
pub struct Appends {
    inner: Arc<AppendsInner>,
}

struct AppendsInner {
    all: watch::Sender<u64>,
    partitions: Mutex<HashMap<String, HashMap<i32, watch::Sender<Announced>>>>,
    /// Never sent on: its receiver in the listening task sees it closed
    /// when this is dropped.
    _alive: watch::Sender<()>,
}

/// One partition's wake-ups, for its worker.
pub struct PartitionAppends {
    announced: watch::Receiver<Announced>,
    unknown_seen: u64,
}

impl PartitionAppends {
    /// Returns once records at `next` or later may have been appended: an
    /// announced log end offset past `next`, or an announcement that gave
    /// none. Announcements of ends the worker has read up to (the `NOTIFY`
    /// of a batch already announced in-process, say) do not wake it.
    ///
    /// Cancel-safe for a worker whose `next` only grows: an announcement
    /// it consumed without returning was of an end it had read. A worker
    /// that moves `next` back must read again without waiting for this.
    /// If the listener is gone it never returns (the worker's slow poll
    /// still reads).
    pub async fn past(&mut self, next: i64) -> Wake {
        loop {
            if self.announced.changed().await.is_err() {
                return std::future::pending().await;
            }
            let announced = self.announced.borrow_and_update();
            if announced.unknown != self.unknown_seen {
                self.unknown_seen = announced.unknown;
                return Wake::Read;
            }
            if announced.end > next {
                // Handed records are the ones just below the end: they
                // do for a worker that reads next exactly where they start.
                return match &announced.records {
                    Some(records) if records.first().map(|r| r.offset) == Some(next) => {
                        Wake::Handed(records.clone())
                    }
                    _ => Wake::Read,
                };
            }
        }
    }
}

impl Appends {
    /// With the receiver that sees it dropped.
    fn new() -> (Appends, watch::Receiver<()>) {
        let (alive, dropped) = watch::channel(());
        let appends = Appends {
            inner: Arc::new(AppendsInner {
                all: watch::channel(0).0,
                partitions: Mutex::new(HashMap::new()),
                _alive: alive,
            }),
        };
        (appends, dropped)
    }

    /// Changes whenever anything is appended.
    pub fn subscribe_all(&self) -> watch::Receiver<u64> {
        self.inner.all.subscribe()
    }

    /// Wake-ups for one partition's worker.
    pub fn subscribe(&self, topic: &str, partition: i32) -> PartitionAppends {
        let mut partitions = self.inner.partitions.lock().expect("appends lock");
        let announced = partitions
            .entry(topic.to_string())
            .or_default()
            .entry(partition)
            .or_insert_with(|| watch::channel(Announced::default()).0)
            .subscribe();
        let unknown_seen = announced.borrow().unknown;
        PartitionAppends {
            announced,
            unknown_seen,
        }
    }
}

impl AppendsInner {
    /// Announces appends to the partitions named, each with its new end
    /// where known, and the records just below that end where handed over.
    fn announce<'a>(
        &self,
        appended: impl IntoIterator<Item = (&'a str, i32, Option<i64>, Option<Arc<[Record]>>)>,
    ) {
        self.all.send_modify(|n| *n += 1);
        let partitions = self.partitions.lock().expect("appends lock");
        for (topic, partition, end, records) in appended {
            let Some(sender) = partitions.get(topic).and_then(|p| p.get(&partition)) else {
                continue;
            };
            match end {
                // Only a higher end wakes: the same batch announced twice
                // (here, then by its NOTIFY) wakes once, and a late NOTIFY
                // of an older batch does not lower what is known. Records
                // held are always those of the end held.
                Some(end) => {
                    sender.send_if_modified(|a| {
                        let higher = end > a.end;
                        if higher {
                            a.end = end;
                            a.records = records;
                        }
                        higher
                    });
                }
                None => sender.send_modify(|a| {
                    a.unknown += 1;
                    a.records = None;
                }),
            }
        }
    }

    /// Something may have been appended anywhere: every worker wakes.
    /// What was known of the ends is forgotten too, so an end that no
    /// longer holds (a log restored from an older backup, a stray
    /// `NOTIFY`) cannot keep workers asleep after a reconnect.
    fn announce_everywhere(&self) {
        self.all.send_modify(|n| *n += 1);
        let partitions = self.partitions.lock().expect("appends lock");
        for sender in partitions.values().flat_map(HashMap::values) {
            sender.send_modify(|a| {
                *a = Announced {
                    end: 0,
                    unknown: a.unknown + 1,
                    records: None,
                }
            });
        }
    }

    fn notified(&self, payload: &str) {
        match parse_payload(payload) {
            Some(appended) => {
                self.announce(appended.into_iter().map(|(t, p, end)| (t, p, end, None)))
            }
            None => self.announce_everywhere(),
        }
    }
}

/// The process's listeners, by database URL, for [`appended_here`]. (Two
/// URLs for one database only miss the shortcut: their `NOTIFY` still
/// comes.)
static HERE: Mutex<Vec<(String, Weak<AppendsInner>)>> = Mutex::new(Vec::new());

/// A relay in this process committed a batch to `database_url`'s log,
/// `appended` giving each partition's new log end offset and, where the
/// relay hands them over, the batch's records of that partition (all of
/// them, in offset order, up to that end): wakes the listeners of this
/// process on that database at once, instead of after the batch's
/// `NOTIFY` has gone through Postgres and back. The `NOTIFY` still comes
/// (other processes need it); a worker it finds already past that end
/// stays asleep.
pub fn appended_here(database_url: &str, appended: &[(&str, i32, i64, Option<Arc<[Record]>>)]) {
    for_listeners_here(database_url, |listener| {
        listener.announce(
            appended
                .iter()
                .map(|(t, p, end, records)| (*t, *p, Some(*end), records.clone())),
        );
        false
    });
}

/// Whether a worker of this process listens to `database_url`'s log: only
/// then are a batch's records worth handing over.
pub fn listened_here(database_url: &str) -> bool {
    for_listeners_here(database_url, |listener| {
        !listener.partitions.lock().expect("appends lock").is_empty()
    })
}

/// Runs `visit` on each live listener of this process on `database_url`
/// until it returns true; says whether one did.
fn for_listeners_here(database_url: &str, mut visit: impl FnMut(&AppendsInner) -> bool) -> bool {
    let here = HERE.lock().expect("listeners lock");
    here.iter()
        .filter(|(url, _)| url == database_url)
        .filter_map(|(_, listener)| listener.upgrade())
        .any(|listener| visit(&listener))
}

/// The backends (by process id) whose batches a relay of this process
/// announces here itself ([`appended_here`]), by database URL: their
/// `NOTIFY` is for other processes. It often reaches this process's
/// listener before the relay has read its own `COMMIT`'s answer, and would
/// then wake the workers to read what the relay is about to hand them.
static ANNOUNCING: Mutex<Vec<(String, i32)>> = Mutex::new(Vec::new());

/// A relay's connection whose appends it announces in this process; its
/// notifications are ignored here while this is held.
pub struct AnnouncingBackend {
    database_url: String,
    pid: i32,
}

impl AnnouncingBackend {
    /// The relay's connection to `database_url` is backend `pid`.
    pub fn register(database_url: &str, pid: i32) -> AnnouncingBackend {
        ANNOUNCING
            .lock()
            .expect("announcing lock")
            .push((database_url.to_string(), pid));
        AnnouncingBackend {
            database_url: database_url.to_string(),
            pid,
        }
    }
}

impl Drop for AnnouncingBackend {
    fn drop(&mut self) {
        let mut announcing = ANNOUNCING.lock().expect("announcing lock");
        if let Some(at) = announcing
            .iter()
            .position(|(url, pid)| *url == self.database_url && *pid == self.pid)
        {
            announcing.swap_remove(at);
        }
    }
}

fn announced_here(database_url: &str, pid: i32) -> bool {
    ANNOUNCING
        .lock()
        .expect("announcing lock")
        .iter()
        .any(|(url, announcing)| url == database_url && *announcing == pid)
}

/// Listens for the relay's notifications, from now on, until the
/// `Appends` returned and its clones are dropped. Those of a relay in this
/// process are skipped: it announces its batches here itself.
pub fn listen(database_url: &str) -> anyhow::Result<Appends> {
    let (appends, mut dropped) = Appends::new();
    let sink = Arc::downgrade(&appends.inner);
    {
        let mut here = HERE.lock().expect("listeners lock");
        here.retain(|(_, listener)| listener.strong_count() > 0);
        here.push((database_url.to_string(), sink.clone()));
    }
    let url = database_url.to_string();
    super::listen::listen(
        database_url,
        APPENDED_CHANNEL,
        move |notification| {
            let Some(sink) = sink.upgrade() else { return };
            match notification {
                Some((_, from)) if announced_here(&url, from) => {}
                Some((text, _)) => sink.notified(text),
                // (Re)connected: something may have been missed meanwhile.
                None => sink.announce_everywhere(),
            }
        },
        async move {
            // Resolves (with an error) once the sender is dropped.
            let _ = dropped.changed().await;
        },
    )?;
    Ok(appends)
}

/// Wakes `wake` whenever a writer notifies `outbox_written`.
pub fn listen_outbox_written(
    database_url: &str,
    wake: impl Fn() + Send + 'static,
) -> anyhow::Result<()> {
    super::listen::listen(
        database_url,
        OUTBOX_WRITTEN_CHANNEL,
        move |_| wake(),
        std::future::pending(),
    )
}

/// Tells the relay, in a process of its own, that outbox rows were
/// committed: one `NOTIFY outbox_written` at a time in its own tiny
/// transaction, never in the writer's (a NOTIFY in the writer's transaction
/// takes a global lock at commit). Calls while one is being sent coalesce
/// into one more.
#[derive(Clone)]
pub struct OutboxNotifier {
    pending: Arc<tokio::sync::Notify>,
}

impl OutboxNotifier {
    /// Starts the notifier on a connection of its own.
    pub fn start(database_url: &str) -> anyhow::Result<OutboxNotifier> {
        let pending = Arc::new(tokio::sync::Notify::new());
        let url = database_url.to_string();
        let waiting = pending.clone();
        tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            loop {
                waiting.notified().await;
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = crate::db::connect(&url).await.ok();
                }
                if let Some(c) = &client {
                    if let Err(e) = c.batch_execute(NOTIFY_OUTBOX_WRITTEN).await {
                        tracing::debug!(error = %e, "NOTIFY outbox_written failed");
                        client = None;
                    }
                }
            }
        });
        Ok(OutboxNotifier { pending })
    }

    /// Outbox rows were committed (coalesced with calls meanwhile).
    pub fn written(&self) {
        self.pending.notify_one();
    }
}

/// `NOTIFY outbox_written` (a statement of its own: its own transaction).
const NOTIFY_OUTBOX_WRITTEN: &str = "NOTIFY outbox_written";

#[cfg(test)]
#[path = "notify_tests.rs"]
mod tests;
