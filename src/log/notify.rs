//! Notifications, read on dedicated LISTEN connections (a pooled connection
//! would drop them: tokio-postgres' `Connection` future discards them, so
//! these are read with `poll_message`), reconnected when they drop.
//!
//! * `event_log_appended`: one `NOTIFY` per relay batch (never in a
//!   writer's transaction), naming the partitions it appended to, so a
//!   consumer wakes only the workers of those partitions ([`Appends`]).
//! * `outbox_written`: a writer (the order API in a process without the
//!   relay) says it committed outbox rows, in a tiny transaction of its own
//!   after its commit ([`OutboxNotifier`]); the relay wakes at once instead
//!   of waiting for its next poll ([`listen_outbox_written`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;

/// The channel the relay notifies once per appended batch.
pub const APPENDED_CHANNEL: &str = "event_log_appended";

/// The channel writers notify after committing outbox rows.
pub const OUTBOX_WRITTEN_CHANNEL: &str = "outbox_written";

/// Longest payload: a batch touching more partitions names none (everyone wakes).
const MAX_PAYLOAD: usize = 7_000;

/// The payload naming the partitions a batch appended to:
/// `topic\tp,p,p` lines; empty when too long (which wakes everyone).
pub fn payload<'a>(touched: impl IntoIterator<Item = (&'a str, i32)>) -> String {
    let mut by_topic: std::collections::BTreeMap<&str, Vec<i32>> = Default::default();
    for (topic, partition) in touched {
        by_topic.entry(topic).or_default().push(partition);
    }
    let mut text = String::new();
    for (topic, partitions) in by_topic {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(topic);
        text.push('\t');
        let list: Vec<String> = partitions.iter().map(i32::to_string).collect();
        text.push_str(&list.join(","));
    }
    if text.len() > MAX_PAYLOAD {
        String::new()
    } else {
        text
    }
}

/// The partitions a payload names; None for "every partition".
fn parse_payload(text: &str) -> Option<Vec<(String, i32)>> {
    if text.is_empty() {
        return None;
    }
    let mut touched = Vec::new();
    for line in text.lines() {
        let (topic, list) = line.split_once('\t')?;
        for p in list.split(',') {
            touched.push((topic.to_string(), p.parse().ok()?));
        }
    }
    Some(touched)
}

/// Wake-ups for records appended to the log, per partition and for all.
#[derive(Clone)]
pub struct Appends {
    inner: Arc<AppendsInner>,
}

struct AppendsInner {
    all: watch::Sender<u64>,
    partitions: Mutex<HashMap<(String, i32), watch::Sender<u64>>>,
}

impl Appends {
    fn new() -> Appends {
        Appends {
            inner: Arc::new(AppendsInner {
                all: watch::channel(0).0,
                partitions: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Changes whenever anything is appended.
    pub fn subscribe_all(&self) -> watch::Receiver<u64> {
        self.inner.all.subscribe()
    }

    /// Changes when a batch appended to this partition (or to partitions
    /// the notification did not name).
    pub fn subscribe(&self, topic: &str, partition: i32) -> watch::Receiver<u64> {
        let mut partitions = self.inner.partitions.lock().expect("appends lock");
        partitions
            .entry((topic.to_string(), partition))
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn appended(&self, payload: &str) {
        self.inner.all.send_modify(|n| *n += 1);
        let partitions = self.inner.partitions.lock().expect("appends lock");
        match parse_payload(payload) {
            Some(touched) => {
                for key in touched {
                    if let Some(sender) = partitions.get(&key) {
                        sender.send_modify(|n| *n += 1);
                    }
                }
            }
            None => {
                for sender in partitions.values() {
                    sender.send_modify(|n| *n += 1);
                }
            }
        }
    }

    fn everything(&self) {
        self.appended("");
    }
}

/// Listens for the relay's notifications, from now on.
pub fn listen(database_url: &str) -> anyhow::Result<Appends> {
    let appends = Appends::new();
    let sink = appends.clone();
    listen_channel(
        database_url,
        APPENDED_CHANNEL,
        move |payload| match payload {
            Some(text) => sink.appended(text),
            // (Re)connected: something may have been missed meanwhile.
            None => sink.everything(),
        },
    )?;
    Ok(appends)
}

/// Wakes `wake` whenever a writer notifies `outbox_written`.
pub fn listen_outbox_written(
    database_url: &str,
    wake: impl Fn() + Send + 'static,
) -> anyhow::Result<()> {
    listen_channel(database_url, OUTBOX_WRITTEN_CHANNEL, move |_| wake())
}

/// A dedicated LISTEN connection on `channel`, reconnected when it drops;
/// `on` gets each notification's payload, and `None` after (re)connecting.
/// It stops when `on` no longer matters: never, for the process's roles.
fn listen_channel(
    database_url: &str,
    channel: &'static str,
    on: impl Fn(Option<&str>) + Send + 'static,
) -> anyhow::Result<()> {
    let config = crate::db::parse_url(database_url)?;
    tokio::spawn(async move {
        loop {
            match config.connect(tokio_postgres::NoTls).await {
                Ok((client, mut connection)) => {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    let statement = format!("LISTEN {channel}");
                    let listen = client.batch_execute(&statement);
                    // Drive the connection while LISTEN is sent, then read notifications.
                    tokio::pin!(listen);
                    let mut listening = false;
                    loop {
                        tokio::select! {
                            result = &mut listen, if !listening => {
                                if result.is_err() { break; }
                                listening = true;
                                on(None);
                            }
                            message = messages.next() => match message {
                                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                    on(Some(n.payload()));
                                }
                                Some(Ok(_)) => {}
                                _ => break,
                            },
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, channel, "LISTEN connection failed"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    Ok(())
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
mod tests {
    use super::*;

    #[test]
    fn payloads_name_partitions_by_topic() {
        let text = payload([("order-created", 3), ("order-created", 5), ("other", 0)]);
        assert_eq!(text, "order-created\t3,5\nother\t0");
        assert_eq!(
            parse_payload(&text),
            Some(vec![
                ("order-created".into(), 3),
                ("order-created".into(), 5),
                ("other".into(), 0)
            ])
        );
        assert_eq!(parse_payload(""), None);
        assert_eq!(parse_payload("garbage"), None);
        let many = payload((0..5000).map(|p| ("order-created", p)));
        assert!(many.is_empty(), "too long: wakes everyone");
    }
}
