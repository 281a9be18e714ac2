//! The overview: the pipeline as a picture (writers → outbox → relay → log
//! → groups → sinks) with live figures, pushed over server-sent events.
//!
//! One read a second, whoever watches: a single task (started by the first
//! watcher, ended after the last) reads the figures in one short
//! transaction — the statements a `/metrics` scrape runs — and every open
//! page gets the same snapshot. Rates are the difference of two snapshots.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use deadpool_postgres::Pool;
use maud::{html, Markup};
use tokio::sync::watch;

use super::page::{self, Ctx, Failure};
use super::Console;

/// How often the figures are read while someone watches.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The pipeline's figures at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub read_at: Option<chrono::DateTime<chrono::Utc>>,
    pub relay: Option<crate::relay::RelayStatus>,
    /// Per topic: partitions, records retained, log end offsets summed.
    pub topics: BTreeMap<String, TopicFigures>,
    /// Per group.
    pub groups: BTreeMap<String, GroupFigures>,
    pub dead_letters: i64,
    /// Outbox rows the relay parked (counted up to [`PARKED_COUNTED`]).
    pub parked_rows: i64,
    /// Records appended per second, all topics (None on the first read).
    pub appended_per_second: Option<f64>,
    /// Records the mail group finished per second.
    pub mailed_per_second: Option<f64>,
    /// Why the last read failed, if it did.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct TopicFigures {
    pub partitions: usize,
    pub retained: i64,
    pub end_offsets: i64,
}

#[derive(Debug, Clone, Default)]
pub struct GroupFigures {
    pub members: i64,
    pub lag: i64,
    pub lag_seconds: f64,
    pub committed: i64,
    pub dead_letters: i64,
}

/// Parked outbox rows are counted up to this (the count stays an index-free
/// read of a bounded number of rows).
pub const PARKED_COUNTED: i64 = 10_000;

const PARKED_ROWS: &str = "SELECT count(*) FROM (SELECT 1 FROM outbox_parked LIMIT $1) p";

/// Reads the figures in one transaction bounded to two seconds.
async fn read(client: &mut tokio_postgres::Client) -> anyhow::Result<Snapshot> {
    let tx = client.build_transaction().read_only(true).start().await?;
    tx.batch_execute("SET LOCAL statement_timeout = '2s'")
        .await?;
    let relay = crate::relay::status(&tx, crate::relay::DEFAULT_RELAY_NAME)
        .await
        .ok();
    let heads = crate::log::topics::all_partition_offsets(&tx).await?;
    let lags = crate::group::admin::partition_lags(&tx).await?;
    let members = crate::group::admin::live_member_counts(&tx).await?;
    let parked = crate::group::dead_letters::parked_count(&tx).await?;
    let parked_rows: i64 = tx.query_one(PARKED_ROWS, &[&PARKED_COUNTED]).await?.get(0);
    tx.commit().await?;

    let mut snapshot = Snapshot {
        read_at: Some(chrono::Utc::now()),
        relay,
        parked_rows,
        ..Snapshot::default()
    };
    for h in heads {
        let t = snapshot.topics.entry(h.topic).or_default();
        t.partitions += 1;
        t.retained += h.log_end_offset - h.log_start_offset;
        t.end_offsets += h.log_end_offset;
    }
    for l in lags {
        let g = snapshot.groups.entry(l.group).or_default();
        g.lag += l.lag;
        g.lag_seconds = g.lag_seconds.max(l.lag_seconds);
        g.committed += l.committed_offset.unwrap_or(0);
    }
    for (group, n) in members {
        snapshot.groups.entry(group).or_default().members = n;
    }
    for (group, n) in parked {
        snapshot.dead_letters += n;
        snapshot.groups.entry(group).or_default().dead_letters = n;
    }
    Ok(snapshot)
}

/// The snapshot every watcher shares, and the task that refreshes it.
pub struct Hub {
    pool: Pool,
    latest: watch::Sender<Arc<Snapshot>>,
    /// Whether the refreshing task runs (changed under this lock only).
    running: Arc<Mutex<bool>>,
}

impl Hub {
    pub fn new(pool: Pool) -> Hub {
        Hub {
            pool,
            latest: watch::channel(Arc::new(Snapshot::default())).0,
            running: Arc::new(Mutex::new(false)),
        }
    }

    /// A watcher: the current snapshot, then each new one. Starts the
    /// refreshing task if it is not running.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        let mut running = self.running.lock().expect("not poisoned");
        let receiver = self.latest.subscribe();
        if !*running {
            *running = true;
            tokio::spawn(refresh(
                self.pool.clone(),
                self.latest.clone(),
                self.running.clone(),
            ));
        }
        receiver
    }

    /// The figures now: the shared snapshot if it is fresh, else one read.
    pub async fn now(&self) -> Result<Arc<Snapshot>, Failure> {
        let latest = self.latest.borrow().clone();
        let fresh = latest.read_at.is_some_and(|t| {
            chrono::Utc::now() - t < chrono::Duration::from_std(REFRESH * 2).unwrap_or_default()
        });
        if fresh {
            return Ok(latest);
        }
        let mut client = self.pool.get().await?;
        Ok(Arc::new(read(&mut client).await?))
    }
}

/// Reads a snapshot every [`REFRESH`] while anyone watches.
async fn refresh(pool: Pool, latest: watch::Sender<Arc<Snapshot>>, running: Arc<Mutex<bool>>) {
    let mut previous: Option<(Instant, i64, Option<i64>)> = None;
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        {
            let mut running = running.lock().expect("not poisoned");
            if latest.receiver_count() == 0 {
                *running = false;
                return;
            }
        }
        let read = match pool.get().await {
            Ok(mut client) => read(&mut client).await,
            Err(e) => Err(e.into()),
        };
        let snapshot = match read {
            Ok(mut snapshot) => {
                let appended: i64 = snapshot.topics.values().map(|t| t.end_offsets).sum();
                let mailed = snapshot
                    .groups
                    .get(crate::app::mail::MAIL_GROUP)
                    .map(|g| g.committed);
                let now = Instant::now();
                if let Some((then, appended_then, mailed_then)) = previous {
                    let seconds = now.duration_since(then).as_secs_f64().max(0.001);
                    snapshot.appended_per_second =
                        Some((appended - appended_then).max(0) as f64 / seconds);
                    if let (Some(m), Some(t)) = (mailed, mailed_then) {
                        snapshot.mailed_per_second = Some((m - t).max(0) as f64 / seconds);
                    }
                }
                previous = Some((now, appended, mailed));
                snapshot
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "console: reading the overview failed");
                Snapshot {
                    read_at: Some(chrono::Utc::now()),
                    error: Some(format!("{e:#}")),
                    ..(**latest.borrow()).clone()
                }
            }
        };
        latest.send_replace(Arc::new(snapshot));
    }
}

pub async fn page(State(console): State<Console>, ctx: Ctx) -> Result<Markup, Failure> {
    let snapshot = console.overview.now().await?;
    Ok(ctx.page(
        "Overview",
        html! {
            form method="get" action={(ctx.base) "/orders"} {
                label { "Find an order by id or email " input name="q" required maxlength="320" placeholder="4711 or ada@example.com"; }
                " " button type="submit" { "Find" }
            }
            div #live hx-ext="sse" sse-connect={(ctx.base) "/events"} sse-swap="overview" {
                (figures(&ctx.base, &snapshot))
            }
        },
    ))
}

/// The live stream: the figures as an HTML fragment, on every new snapshot.
pub async fn events(
    State(console): State<Console>,
    ctx: Ctx,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let receiver = console.overview.watch();
    let stream =
        futures_util::stream::unfold((receiver, ctx.base), |(mut receiver, base)| async move {
            receiver.changed().await.ok()?;
            let snapshot = receiver.borrow_and_update().clone();
            let html = figures(&base, &snapshot).into_string();
            Some((
                Ok(Event::default().event("overview").data(html)),
                (receiver, base),
            ))
        });
    let stream = futures_util::StreamExt::take_until(stream, console.closed());
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn seconds(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{s:.0} s")
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

fn rate(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.1}/s"))
}

/// The pipeline with its figures (the part the stream replaces).
pub fn figures(base: &str, s: &Snapshot) -> Markup {
    html! {
        @if let Some(error) = &s.error { p.error data-code="overview_unavailable" { "The figures could not be read: " (error) } }
        div.pipeline {
            div.stage { h3 { "Writers" } p.muted { "orders API, any service's INSERT" } }
            span.arrow { "→" }
            div.stage #outbox {
                h3 { "Outbox" }
                @if let Some(r) = &s.relay {
                    div.figure data-test="outbox-backlog" { (page::count(r.backlog)) }
                    div.muted { "waiting · oldest " (seconds(r.oldest_age_seconds)) }
                } @else { div.muted { "no relay has run yet" } }
            }
            span.arrow { "→" }
            div.stage #relay {
                h3 { "Relay" }
                @if let Some(r) = &s.relay {
                    @if r.leader_alive { div.ok { "leader " (r.holder.as_deref().unwrap_or("?")) } }
                    @else { div.bad { "no live leader" } }
                    div.muted { "epoch " (r.epoch) @if r.draining { " · draining" } }
                }
                div.figure { (rate(s.appended_per_second)) }
                @if s.parked_rows > 0 {
                    div { a.warn href={(base) "/parked"} {
                        (page::count(s.parked_rows)) @if s.parked_rows >= PARKED_COUNTED { "+" } " parked rows" } }
                }
            }
            span.arrow { "→" }
            div.stage #log {
                h3 { "Log" }
                @for (topic, t) in &s.topics {
                    div { a href={(base) "/topics/" (page::enc(topic))} { (topic) } ": "
                          span.num { (page::count(t.end_offsets)) } span.muted { " appended, " (t.partitions) " partitions" } }
                }
            }
            span.arrow { "→" }
            div.stage #groups {
                h3 { "Groups" }
                table {
                    tr { th { "group" } th.num { "members" } th.num { "lag" } th.num { "lag s" } }
                    @for (group, g) in &s.groups {
                        tr data-group=(group) {
                            td { a href={(base) "/groups/" (page::enc(group))} { (group) } }
                            td.num { (g.members) }
                            td.num.lag { (page::count(g.lag)) }
                            td.num { (seconds(g.lag_seconds)) }
                        }
                    }
                }
            }
            span.arrow { "→" }
            div.stage #sinks {
                h3 { "Sinks" }
                div { "mail: " span.figure { (rate(s.mailed_per_second)) } }
                div {
                    a class=(if s.dead_letters > 0 { "bad" } else { "" }) href={(base) "/dead-letters"} {
                        (page::count(s.dead_letters)) " dead letters" }
                }
            }
        }
        p.muted { "Read " (s.read_at.map(|t| page::time(&t)).unwrap_or_default()) ", every second while this page is open." }
    }
}

pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![("console::overview::PARKED_ROWS", PARKED_ROWS.to_string())]
}
