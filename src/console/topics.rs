//! Topics and the record browser: partitions with log start and end and
//! retention; records of a partition from an offset, a time (the time
//! index) or the newest, a page at a time; and a key's records, searched in
//! the partition Kafka's partitioner gives the key, a window of offsets a
//! step (the log has no key index: see sql/0011_console.sql).
//!
//! Every read is bounded — [`page::BROWSE_TIMEOUT`] per statement and a
//! page of rows — and when a bound is hit the page says so and offers to
//! go on: never an empty page that hides a timeout.

use axum::extract::{Path, Query, State};
use maud::{html, Markup};

use super::page::{self, Ctx, Failure};
use super::Console;
use crate::log::{LogError, Record};

/// Records on one page.
const RECORDS_PER_PAGE: i64 = 20;

/// Offsets of the key's partition searched per step (newest first): each
/// step reads this many records by position at most.
const KEY_SEARCH_WINDOW: i64 = 50_000;

impl From<LogError> for Failure {
    fn from(e: LogError) -> Failure {
        match e {
            LogError::UnknownTopic(t) => {
                Failure::not_found("unknown_topic", format!("there is no topic {t:?}"))
            }
            e @ LogError::UnknownPartition { .. } => {
                Failure::not_found("unknown_partition", e.to_string())
            }
            LogError::Db(e) => e.into(),
            e => Failure::bad_request("invalid_topic", e.to_string()),
        }
    }
}

pub async fn list(State(console): State<Console>, ctx: Ctx) -> Result<Markup, Failure> {
    let client = console.browse.get().await?;
    let topics = crate::log::topics::list_topics(&**client).await?;
    let heads = crate::log::topics::all_partition_offsets(&**client).await?;
    Ok(ctx.page(
        "Topics",
        html! {
            table #topics {
                tr { th { "topic" } th.num { "partitions" } th.num { "retained records" } th.num { "appended (log end offsets)" } th { "retention" } }
                @for t in &topics {
                    @let mine = heads.iter().filter(|h| h.topic == t.name);
                    @let (retained, end) = mine.fold((0i64, 0i64), |(r, e), h| (r + h.log_end_offset - h.log_start_offset, e + h.log_end_offset));
                    tr {
                        td { a href={(ctx.base) "/topics/" (page::enc(&t.name))} { (t.name) } }
                        td.num { (t.partitions) }
                        td.num { (page::count(retained)) }
                        td.num { (page::count(end)) }
                        td { (retention(t.retention_seconds)) }
                    }
                }
            }
            @if topics.is_empty() { p { "No topics yet." } }
        },
    ))
}

fn retention(seconds: i64) -> String {
    if seconds % 86_400 == 0 {
        format!("{} days", seconds / 86_400)
    } else {
        format!("{:.1} hours", seconds as f64 / 3600.0)
    }
}

#[derive(serde::Deserialize)]
pub struct KeySearch {
    key: Option<String>,
    /// Search below this offset (the next step back); default the log end.
    before: Option<String>,
}

/// Longest key searched for (the outbox refuses longer ones).
const MAX_KEY_BYTES: usize = 1024;

pub async fn topic(
    State(console): State<Console>,
    ctx: Ctx,
    Path(name): Path<String>,
    Query(search): Query<KeySearch>,
) -> Result<Markup, Failure> {
    let mut client = console.browse.get().await?;
    let topic = crate::log::topics::topic(&**client, &name).await?;
    let heads = crate::log::topics::partition_offsets(&**client, &name).await?;
    let key = search.key.filter(|k| !k.is_empty());
    if key.as_ref().is_some_and(|k| k.len() > MAX_KEY_BYTES) {
        return Err(Failure::bad_request(
            "key_too_long",
            format!("a key is at most {MAX_KEY_BYTES} bytes"),
        ));
    }
    // Every record of a key is in the partition Kafka's partitioner gives
    // it: that one is searched, newest first, a window of offsets a step.
    let before = match search.before.as_deref().filter(|b| !b.is_empty()) {
        None => None,
        Some(b) => Some(b.parse::<i64>().map_err(|_| {
            Failure::bad_request("invalid_offset", format!("{b:?} is not an offset"))
        })?),
    };
    let found = match &key {
        None => None,
        Some(key) => {
            let partition =
                crate::log::partitioner::partition_for_key(key, topic.partitions.max(1) as u32)
                    as i32;
            let heads = heads
                .iter()
                .find(|h| h.partition == partition)
                .cloned()
                .ok_or_else(|| Failure::internal(format!("no partition {partition} of {name}")))?;
            let to = before
                .unwrap_or(heads.log_end_offset)
                .clamp(heads.log_start_offset, heads.log_end_offset);
            let from = (to - KEY_SEARCH_WINDOW).max(heads.log_start_offset);
            let tx = page::bounded_read(&mut client, page::BROWSE_TIMEOUT).await?;
            let records = crate::log::read::records_of_key(
                &*tx,
                &name,
                partition,
                key,
                (from, to),
                RECORDS_PER_PAGE,
            )
            .await;
            Some((partition, from, to, heads.log_start_offset, records))
        }
    };
    let base = &ctx.base;
    let enc = page::enc(&name);
    Ok(ctx.page(
        &format!("Topic {name}"),
        html! {
            p { (topic.partitions) " partitions · retention " (retention(topic.retention_seconds)) }
            table #partitions {
                tr { th.num { "partition" } th.num { "log start" } th.num { "log end" } th.num { "retained" } th { "browse" } }
                @for h in &heads {
                    tr {
                        td.num { (h.partition) }
                        td.num { (h.log_start_offset) }
                        td.num { (h.log_end_offset) }
                        td.num { (page::count(h.log_end_offset - h.log_start_offset)) }
                        td {
                            a href={(base) "/topics/" (enc) "/" (h.partition) "?newest=1"} { "newest" } " · "
                            a href={(base) "/topics/" (enc) "/" (h.partition) "?from=" (h.log_start_offset)} { "oldest" }
                        }
                    }
                }
            }
            h2 { "Find by key" }
            form method="get" action={(base) "/topics/" (enc)} {
                label { "Key " input name="key" value=(key.as_deref().unwrap_or("")) maxlength="1024"; }
                " " button type="submit" { "Find" }
            }
            @if let Some((partition, from, to, start, records)) = &found {
                @let key_enc = page::enc(key.as_deref().unwrap_or(""));
                @let here = format!("{base}/topics/{enc}?key={key_enc}");
                @match records {
                    Err(LogError::Db(e)) if page::timed_out(e) => {
                        p.notice data-code="query_timeout" { "Searching offsets " (from) "–" (to - 1) " of partition " (partition) " took longer than " (page::BROWSE_TIMEOUT.as_millis()) " ms and was stopped, so nothing is shown — not because nothing matched. "
                            a href={(here) "&before=" (to)} { "Try again" } }
                    }
                    Err(e) => { p.error { "The search failed: " (e) } }
                    Ok(records) => {
                        p #key-search { "Partition " (partition) " (the key's, by Kafka's partitioner), offsets " (from) " to " (to - 1) ": "
                            (records.len()) " records, newest first"
                            @if records.len() as i64 == RECORDS_PER_PAGE { " (the newest " (RECORDS_PER_PAGE) ")" } "." }
                        @if !records.is_empty() { (record_table(&ctx, records)) }
                        @if let Some(last) = records.last().filter(|_| records.len() as i64 == RECORDS_PER_PAGE) {
                            p { a href={(here) "&before=" (last.offset)} { "More, older →" } }
                        } @else if from > start {
                            p { a href={(here) "&before=" (from)} { "Search further back (offsets before " (from) ") →" } }
                        } @else {
                            p.muted { "That is every retained record of the key." }
                        }
                    }
                }
            }
        },
    ))
}

#[derive(serde::Deserialize)]
pub struct Browse {
    from: Option<String>,
    time: Option<String>,
    newest: Option<String>,
}

/// Where a page of records starts.
enum Start {
    Offset(i64),
    Time(chrono::DateTime<chrono::Utc>),
    Newest,
}

fn start_of(browse: &Browse) -> Result<Start, Failure> {
    if let Some(from) = browse.from.as_deref().filter(|s| !s.is_empty()) {
        return from
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|o| *o >= 0)
            .map(Start::Offset)
            .ok_or_else(|| {
                Failure::bad_request(
                    "invalid_offset",
                    format!("{from:?} is not an offset (a whole number, 0 or more)"),
                )
            });
    }
    if let Some(time) = browse.time.as_deref().filter(|s| !s.is_empty()) {
        return crate::cli::parse::time(time.trim())
            .map(Start::Time)
            .map_err(|e| Failure::bad_request("invalid_time", e));
    }
    Ok(match browse.newest {
        Some(_) => Start::Newest,
        None => Start::Offset(0),
    })
}

pub async fn records(
    State(console): State<Console>,
    ctx: Ctx,
    Path((name, partition)): Path<(String, String)>,
    Query(browse): Query<Browse>,
) -> Result<Markup, Failure> {
    let partition: i32 = partition.parse().map_err(|_| {
        Failure::bad_request(
            "invalid_partition",
            format!("{partition:?} is not a partition number"),
        )
    })?;
    let start = start_of(&browse)?;
    let mut client = console.browse.get().await?;
    let offsets = crate::log::topics::offsets_of(&**client, &name, partition).await?;
    let tx = page::bounded_read(&mut client, page::BROWSE_TIMEOUT).await?;
    let from = match start {
        Start::Offset(o) => Ok(o.max(offsets.log_start_offset)),
        Start::Newest => {
            Ok((offsets.log_end_offset - RECORDS_PER_PAGE).max(offsets.log_start_offset))
        }
        Start::Time(t) => crate::log::read::offset_for_time_within(&*tx, &name, &offsets, t).await,
    };
    let read = match from {
        Ok(from) => crate::log::read::read(&*tx, &name, partition, from, RECORDS_PER_PAGE)
            .await
            .map(|r| (from, r)),
        Err(e) => Err(e),
    };
    let base = &ctx.base;
    let here = format!("{base}/topics/{}/{partition}", page::enc(&name));
    let form = html! {
        form method="get" action=(here) {
            label { "From offset " input name="from" size="10" inputmode="numeric"; }
            " or time " input name="time" size="24" placeholder="2026-12-01T00:00:00Z";
            " " button type="submit" { "Go" }
            " · " a href={(here) "?newest=1"} { "newest" }
        }
    };
    let body = match read {
        Err(LogError::Db(e)) if page::timed_out(&e) => html! {
            (form)
            p.notice data-code="query_timeout" { "Reading this page took longer than " (page::BROWSE_TIMEOUT.as_millis()) " ms and was stopped, so no records are shown — not because there are none. "
                a href=(here_with(&here, &browse)) { "Try again" } }
        },
        Err(e) => return Err(e.into()),
        Ok((from, records)) => {
            let next = records.last().map(|r| r.offset + 1);
            html! {
                (form)
                p { "Offsets " (offsets.log_start_offset) " to " (offsets.log_end_offset - 1) " retained; showing from " (from) "." }
                @if records.is_empty() {
                    @if from >= offsets.log_end_offset { p { "No record at or past offset " (from) " yet (the log end is " (offsets.log_end_offset) ")." } }
                    @else { p { "No records." } }
                } @else { (record_table(&ctx, &records)) }
                p {
                    @if from > offsets.log_start_offset { a href={(here) "?from=" ((from - RECORDS_PER_PAGE).max(offsets.log_start_offset))} { "← Previous" } " " }
                    @if let Some(next) = next.filter(|n| *n < offsets.log_end_offset) { a href={(here) "?from=" (next)} { "Next →" } }
                }
            }
        }
    };
    Ok(ctx.page(&format!("{name} · partition {partition}"), body))
}

fn here_with(here: &str, browse: &Browse) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("from", &browse.from),
        ("time", &browse.time),
        ("newest", &browse.newest),
    ] {
        if let Some(v) = v {
            query.append_pair(k, v);
        }
    }
    format!("{here}?{}", query.finish())
}

/// Records, payloads and headers pretty-printed (masked without the permission).
fn record_table(ctx: &Ctx, records: &[Record]) -> Markup {
    let reveal = ctx.can_see_payloads();
    html! {
        table.records {
            tr { th.num { "partition" } th.num { "offset" } th { "key" } th { "created / appended" } th { "headers" } th { "payload" } }
            @for r in records {
                tr data-offset=(r.offset) {
                    td.num { (r.partition) }
                    td.num { (r.offset) }
                    td { code { (ctx.shown(r.key.as_deref().unwrap_or("–"))) } }
                    td { (page::time(&r.created_at)) br; span.muted { (page::time(&r.appended_at)) } }
                    td { pre { (page::json(&r.headers, reveal)) } }
                    td { pre.payload { (page::json(&r.payload, reveal)) } }
                }
            }
        }
    }
}
