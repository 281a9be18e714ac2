//! The process's `LISTEN` connections: one per database (and tokio
//! runtime), shared by every channel listened on there, reconnected when it
//! drops and closed once nobody listens.
//!
//! Postgres wakes every listening backend of a database for each `NOTIFY`,
//! whatever its channel: with a connection per channel, a relay batch's
//! notification also woke the backend listening for `outbox_written`.
//! Notifications are read with `poll_message` (a pooled connection's
//! `Connection` future discards them).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;

/// What a subscriber is told: a notification's payload and the notifying
/// backend's process id, or `None` once its channel is listened on after
/// a (re)connection (something may have been missed meanwhile).
type OnNotification = Box<dyn Fn(Option<(&str, i32)>) + Send>;

/// The shared connection of each database (by URL) that has a subscriber,
/// per tokio runtime, with its task. Per runtime: a runtime's tasks stop
/// with it, so a subscriber served by another runtime's connection would
/// go silent when that one shut down, and its removal (a task of its own
/// runtime) could leave the other's connection open for good. The task is
/// kept to drop the entries of runtimes that have shut down (their tasks
/// are finished and never leave the registry themselves).
static CONNECTIONS: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

struct Registered {
    url: String,
    runtime: tokio::runtime::Id,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

static NEXT_SUBSCRIBER: AtomicU64 = AtomicU64::new(0);

struct Shared {
    subscribers: Mutex<Vec<Subscriber>>,
    /// A subscriber came or went.
    changed: tokio::sync::Notify,
}

struct Subscriber {
    id: u64,
    channel: &'static str,
    on: OnNotification,
    /// Told (with `None`) since the connection in use began.
    told: bool,
}

/// Calls `on` with every notification on `channel` in the database at
/// `database_url` (and `None` after each (re)connection), until `until`
/// completes.
pub(super) fn listen(
    database_url: &str,
    channel: &'static str,
    on: impl Fn(Option<(&str, i32)>) + Send + 'static,
    until: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = crate::db::parse_url(database_url)?;
    let id = NEXT_SUBSCRIBER.fetch_add(1, Ordering::Relaxed);
    let subscriber = Subscriber {
        id,
        channel,
        on: Box::new(on),
        told: false,
    };
    // Under the registry's lock, so the connection's task cannot see its
    // last subscriber gone and leave between the lookup and the push.
    let shared = {
        let runtime = tokio::runtime::Handle::current().id();
        let mut connections = CONNECTIONS.lock().expect("listen registry lock");
        connections.retain(|r| !r.task.is_finished());
        let existing = connections
            .iter()
            .find(|r| r.url == database_url && r.runtime == runtime)
            .map(|r| r.shared.clone());
        let shared = existing.unwrap_or_else(|| {
            let shared = Arc::new(Shared {
                subscribers: Mutex::new(Vec::new()),
                changed: tokio::sync::Notify::new(),
            });
            let task = tokio::spawn(run(config, shared.clone()));
            connections.push(Registered {
                url: database_url.to_string(),
                runtime,
                shared: shared.clone(),
                task,
            });
            shared
        });
        shared.subscribers().push(subscriber);
        shared
    };
    shared.changed.notify_one();
    tokio::spawn(async move {
        until.await;
        shared.subscribers().retain(|s| s.id != id);
        shared.changed.notify_one();
    });
    Ok(())
}

impl Shared {
    fn subscribers(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        self.subscribers.lock().expect("listen subscribers lock")
    }

    /// Leaves the registry if nobody listens any more; false if somebody does.
    fn leave_if_unused(self: &Arc<Self>) -> bool {
        let mut connections = CONNECTIONS.lock().expect("listen registry lock");
        if !self.subscribers().is_empty() {
            return false;
        }
        connections.retain(|r| !Arc::ptr_eq(&r.shared, self));
        true
    }

    /// Tells the subscribers of `listened` channels not told yet.
    fn tell_new(&self, listened: &HashSet<&'static str>) {
        for subscriber in self.subscribers().iter_mut() {
            if !subscriber.told && listened.contains(subscriber.channel) {
                subscriber.told = true;
                (subscriber.on)(None);
            }
        }
    }
}

/// The connection's task: (re)connects, `LISTEN`s on every channel a
/// subscriber wants, and hands each notification to its channel's
/// subscribers; ends once nobody listens.
async fn run(config: tokio_postgres::Config, shared: Arc<Shared>) {
    loop {
        if shared.leave_if_unused() {
            return;
        }
        // Set when the connection ended because nobody listened any more.
        let mut unused = false;
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, mut connection)) => {
                let client = Arc::new(client);
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let mut listened: HashSet<&'static str> = HashSet::new();
                let mut asked: HashSet<&'static str> = HashSet::new();
                let mut listening = FuturesUnordered::new();
                for subscriber in shared.subscribers().iter_mut() {
                    subscriber.told = false;
                }
                shared.changed.notify_one();
                loop {
                    tokio::select! {
                        () = shared.changed.notified() => {
                            let wanted: Vec<&'static str> =
                                shared.subscribers().iter().map(|s| s.channel).collect();
                            if wanted.is_empty() {
                                unused = true;
                                break;
                            }
                            for channel in wanted {
                                if asked.insert(channel) {
                                    let client = client.clone();
                                    listening.push(async move {
                                        client.batch_execute(&format!("LISTEN {channel}")).await.map(|()| channel)
                                    });
                                }
                            }
                            shared.tell_new(&listened);
                        }
                        Some(result) = listening.next() => match result {
                            Ok(channel) => {
                                listened.insert(channel);
                                shared.tell_new(&listened);
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "LISTEN failed");
                                break;
                            }
                        },
                        message = messages.next() => match message {
                            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                for subscriber in shared.subscribers().iter() {
                                    if subscriber.told && subscriber.channel == n.channel() {
                                        (subscriber.on)(Some((n.payload(), n.process_id())));
                                    }
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => break,
                        },
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "LISTEN connection failed"),
        }
        // A subscriber that came meanwhile gets a new connection at once.
        if !unused {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
