//! Order lookup: by order id or email → the order, its events in the log
//! (topic, partition, offset, times, trace id), its confirmation mail's
//! state (the ledger's word, as `GET /orders/{id}` gives it), and the
//! replays that mailed it again.

use axum::extract::{Query, State};
use maud::{html, Markup};

use super::page::{self, Ctx, Failure};
use super::Console;
use crate::app::mail::ConfirmationMail;
use crate::app::order::ORDER_CREATED_TOPIC;

/// Orders listed for one email at most.
const ORDERS_PER_EMAIL: i64 = 50;

const ORDERS_BY_EMAIL: &str = "
    SELECT id, created_at, amount FROM orders WHERE lower(email) = lower($1)
     ORDER BY id DESC LIMIT $2";

/// The replays that sent an event again (the runs of its topic, each by
/// its primary key).
const REPLAYS_OF_EVENT: &str = "
    SELECT d.run_id, d.status, d.updated_at, d.last_error FROM replay_deliveries d
     WHERE d.run_id IN (SELECT id FROM replay_runs WHERE topic = $1)
       AND d.partition = $2 AND d.\"offset\" = $3
     ORDER BY d.run_id";

#[derive(serde::Deserialize)]
pub struct Lookup {
    #[serde(default)]
    q: String,
}

pub async fn page(
    State(console): State<Console>,
    ctx: Ctx,
    Query(lookup): Query<Lookup>,
) -> Result<Markup, Failure> {
    let q = lookup.q.trim();
    if q.len() > 320 {
        return Err(Failure::bad_request(
            "query_too_long",
            "an order id or email is at most 320 characters",
        ));
    }
    let form = html! {
        form method="get" action={(ctx.base) "/orders"} {
            label { "Order id or email " input name="q" value=(q) required maxlength="320"; }
            " " button type="submit" { "Find" }
        }
    };
    if q.is_empty() {
        return Ok(ctx.page("Orders", form));
    }
    let mut client = console.browse.get().await?;
    if let Ok(id) = q.parse::<i64>() {
        if id <= 0 {
            return Err(Failure::bad_request(
                "invalid_order_id",
                "the order id must be a positive integer",
            ));
        }
        let body = order(&mut client, &ctx, id).await?;
        return Ok(ctx.page(&format!("Order {id}"), html! { (form) (body) }));
    }
    if !q.contains('@') {
        return Err(Failure::bad_request(
            "invalid_lookup",
            format!("{q:?} is neither an order id nor an email address"),
        ));
    }
    let rows = client
        .query(ORDERS_BY_EMAIL, &[&q, &ORDERS_PER_EMAIL])
        .await?;
    if rows.len() == 1 {
        let id: i64 = rows[0].get(0);
        let body = order(&mut client, &ctx, id).await?;
        return Ok(ctx.page(&format!("Order {id}"), html! { (form) (body) }));
    }
    Ok(ctx.page(
        "Orders",
        html! {
            (form)
            @if rows.is_empty() { p { "No order for that email." } }
            @else {
                p { (rows.len()) " orders, newest first" @if rows.len() as i64 == ORDERS_PER_EMAIL { " (the newest " (ORDERS_PER_EMAIL) " shown)" } ":" }
                table {
                    tr { th { "order" } th { "placed" } th.num { "amount" } }
                    @for r in &rows {
                        tr {
                            td { a href={(ctx.base) "/orders?q=" (r.get::<_, i64>(0))} { (r.get::<_, i64>(0)) } }
                            td { (page::time(&r.get(1))) }
                            td.num { (r.get::<_, i64>(2)) }
                        }
                    }
                }
            }
        },
    ))
}

/// One order in full.
async fn order(client: &mut tokio_postgres::Client, ctx: &Ctx, id: i64) -> Result<Markup, Failure> {
    let Some(order) = crate::app::order::find(&*client, id).await? else {
        return Err(Failure::not_found(
            "order_not_found",
            format!("no order {id}"),
        ));
    };
    let (events, tail_unsearched) = events_of(client, id).await?;
    let client = &*client;
    let mail = crate::app::mail::confirmation_mail(client, id).await?;
    let mut replays = Vec::new();
    for e in &events {
        for r in client
            .query(REPLAYS_OF_EVENT, &[&e.topic, &e.partition, &e.offset])
            .await?
        {
            replays.push((
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, chrono::DateTime<chrono::Utc>>(2),
                r.get::<_, Option<String>>(3),
            ));
        }
    }
    let email = if ctx.can_see_payloads() {
        order.email.clone()
    } else {
        page::mask_emails(&order.email)
    };
    let base = &ctx.base;
    Ok(html! {
        dl #order {
            dt { "order" } dd { (order.order_id) }
            dt { "email" } dd { (email) }
            dt { "amount" } dd { (order.amount) }
            dt { "user" } dd { (order.user_id) }
            dt { "placed" } dd { (page::time(&order.created_at)) }
        }
        h2 { "Confirmation mail" }
        div #mail { (mail_state(ctx, &mail)) }
        h2 { "Events in the log" }
        @if let Some((partition, from, to)) = tail_unsearched {
            p.notice data-code="query_timeout" { "Offsets " (from) "–" (to - 1) " of partition " (partition) ", which the mail worker has not read yet, could not be searched within " (page::BROWSE_TIMEOUT.as_millis()) " ms: an event there is not shown. Reload to try again." }
        }
        @if events.is_empty() {
            p { "Not in the log yet: the relay has not moved its outbox row (see the " a href={(base) "/"} { "overview" } "'s backlog)." }
        } @else {
            table #events {
                tr { th { "topic" } th.num { "partition" } th.num { "offset" } th { "created" } th { "appended" } th { "trace id" } th { "retry of" } }
                @for e in &events {
                    tr {
                        td { (e.topic) }
                        td.num { (e.partition) }
                        td.num { a href={(base) "/topics/" (page::enc(&e.topic)) "/" (e.partition) "?from=" (e.offset)} { (e.offset) } }
                        td { (page::time(&e.created_at)) }
                        td { (page::time(&e.appended_at)) }
                        td { code { (trace_id(&e.headers).unwrap_or("–")) } }
                        td { (e.headers.get(crate::outbox::RETRY_OF_HEADER).and_then(|v| v.as_str()).unwrap_or("–")) }
                    }
                }
            }
        }
        h2 { "Replays that mailed it" }
        @if replays.is_empty() { p.muted { "None." } }
        @else {
            table #replays {
                tr { th { "run" } th { "status" } th { "when" } th { "last error" } }
                @for (run, status, at, error) in &replays {
                    tr {
                        td { a href={(base) "/replays/" (run)} { (run) } }
                        td { (status) }
                        td { (page::time(at)) }
                        td { (ctx.shown(error.as_deref().unwrap_or("–"))) }
                    }
                }
            }
        }
    })
}

/// Where the ledger and the dead letters saw an order's events (their key
/// indexes): the events the mail worker has read.
const EVENT_POSITIONS: &str = "
    SELECT partition, \"offset\" FROM mail_deliveries WHERE key = $1 AND topic = $2
     UNION
    SELECT partition, \"offset\" FROM dead_letters WHERE key = $1 AND topic = $2";

/// The mail group's next offset in a partition.
const MAIL_GROUP_COMMITTED: &str = "
    SELECT committed_offset FROM group_partitions WHERE group_id = $1 AND topic = $2 AND partition = $3";

/// An order's events: those the mail worker read (found by position through
/// the ledger's and the dead letters' key indexes), and those it has not
/// read yet (searched in the key's partition past the group's offset,
/// bounded). The log itself has no key index (see sql/0011_console.sql).
/// The second value names the unread range when its search was cut short.
async fn events_of(
    client: &mut tokio_postgres::Client,
    id: i64,
) -> Result<(Vec<crate::log::Record>, Option<(i32, i64, i64)>), Failure> {
    let key = id.to_string();
    let topic = ORDER_CREATED_TOPIC;
    let partitions = crate::log::topics::topic(&*client, topic).await?.partitions;
    let partition =
        crate::log::partitioner::partition_for_key(&key, partitions.max(1) as u32) as i32;
    let heads = crate::log::topics::offsets_of(&*client, topic, partition).await?;
    let committed: Option<i64> = client
        .query_opt(
            MAIL_GROUP_COMMITTED,
            &[&crate::app::mail::MAIL_GROUP, &topic, &partition],
        )
        .await?
        .and_then(|r| r.get(0));
    // The ledger after the group's offset: an event the worker reads in
    // between is then in one or the other.
    let mut events = Vec::new();
    for row in client.query(EVENT_POSITIONS, &[&key, &topic]).await? {
        let (partition, offset): (i32, i64) = (row.get(0), row.get(1));
        events.extend(
            crate::log::read::read(&*client, topic, partition, offset, 1)
                .await?
                .into_iter()
                .filter(|r| r.offset == offset),
        );
    }
    let from = committed
        .unwrap_or(heads.log_start_offset)
        .max(heads.log_start_offset);
    let to = heads.log_end_offset;
    let mut unsearched = None;
    if from < to {
        let tx = client.build_transaction().read_only(true).start().await?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            page::BROWSE_TIMEOUT.as_millis()
        ))
        .await?;
        match crate::log::read::records_of_key(&tx, topic, partition, &key, (from, to), 100).await {
            Ok(unread) => events.extend(unread),
            Err(crate::log::LogError::Db(e)) if page::timed_out(&e) => {
                unsearched = Some((partition, from, to))
            }
            Err(e) => return Err(e.into()),
        }
    }
    events.sort_by_key(|r| (r.partition, r.offset));
    events.dedup_by_key(|r| (r.partition, r.offset));
    Ok((events, unsearched))
}

/// The mail's state in words, with what to do about it.
fn mail_state(ctx: &Ctx, mail: &ConfirmationMail) -> Markup {
    let base = &ctx.base;
    match mail {
        ConfirmationMail::Sent {
            sent_at,
            message_id,
        } => html! {
            p { span.ok data-state="sent" { "sent" } " " (sent_at.as_ref().map(page::time).unwrap_or_default())
                span.muted { " · Message-ID " code { (message_id) } } }
        },
        ConfirmationMail::Pending {
            attempts,
            last_error,
        } => html! {
            p { span.warn data-state="pending" { "pending" } " · " (attempts) " attempts so far" }
            @if let Some(e) = last_error { p { "last error: " code.last-error { (ctx.shown(e)) } } }
            @if *attempts == 0 { p.muted { "Waiting for its turn: see the mail-service group's lag on the " a href={(base) "/"} { "overview" } "." } }
        },
        ConfirmationMail::DeadLetter {
            dead_letter_id,
            reason,
            last_error,
        } => html! {
            p { span.bad data-state="dead_letter" { "failed: dead letter" }
                @if let Some(id) = dead_letter_id { " " a href={(base) "/dead-letters?id=" (id)} { "#" (id) " — re-drive or discard" } } }
            @if let Some(r) = reason { p { "reason: " (ctx.shown(r)) } }
            @if let Some(e) = last_error { p { "last error: " code.last-error { (ctx.shown(e)) } } }
        },
        ConfirmationMail::OutcomeUnknown {
            attempts,
            last_error,
        } => html! {
            p { span.bad data-state="outcome_unknown" { "outcome unknown" } " after " (attempts) " attempts: the SMTP server took the message but never gave a final answer; it may have been delivered." }
            @if let Some(e) = last_error { p { "last error: " code.last-error { (ctx.shown(e)) } } }
        },
    }
}

/// The trace id of a record's `traceparent` header (W3C: version-traceid-spanid-flags).
fn trace_id(headers: &serde_json::Value) -> Option<&str> {
    headers
        .get(crate::trace_context::TRACEPARENT)?
        .as_str()?
        .split('-')
        .nth(1)
}

pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        (
            "console::orders::ORDERS_BY_EMAIL",
            ORDERS_BY_EMAIL.to_string(),
        ),
        (
            "console::orders::REPLAYS_OF_EVENT",
            REPLAYS_OF_EVENT.to_string(),
        ),
    ]
}
