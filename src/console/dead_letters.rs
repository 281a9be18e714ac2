//! Dead letters (records a group gave up on) and parked outbox rows (rows
//! the relay could not place): listed with reason, attempts and last
//! error; re-driven or discarded — one, a selection, or all matching a
//! filter — after a preview with the count, through the same functions as
//! the CLI. Only parked ones move, so doing it twice delivers once.

use axum::body::Bytes;
use axum::extract::{Query, State};
use maud::{html, Markup};
use serde_json::json;

use super::page::{self, Ctx, Failure, PAGE_ROWS};
use super::Console;
use crate::group::dead_letters::{self, DeadLetterStatus, Selection};

/// Longest filter value accepted.
const MAX_FILTER_BYTES: usize = 1024;

/// A dead-letter filter as the page's query or form gives it.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Filter {
    #[serde(default)]
    group: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    status: String,
    /// One dead letter (a link from an order's page).
    #[serde(default)]
    id: String,
    /// Ids above this (the next page).
    #[serde(default)]
    after: String,
}

fn nonempty(s: &str) -> Option<String> {
    Some(s.trim().to_string()).filter(|s| !s.is_empty())
}

impl Filter {
    fn checked(&self) -> Result<(Selection, Option<DeadLetterStatus>, i64), Failure> {
        for (name, value) in [
            ("group", &self.group),
            ("key", &self.key),
            ("reason", &self.reason),
        ] {
            if value.len() > MAX_FILTER_BYTES {
                return Err(Failure::bad_request(
                    "filter_too_long",
                    format!("the {name} filter is at most {MAX_FILTER_BYTES} bytes"),
                ));
            }
        }
        let number = |name: &str, value: &str| -> Result<Option<i64>, Failure> {
            nonempty(value)
                .map(|v| {
                    v.parse::<i64>().map_err(|_| {
                        Failure::bad_request(
                            "invalid_filter",
                            format!("{name} {v:?} is not a number"),
                        )
                    })
                })
                .transpose()
        };
        let status = match self.status.as_str() {
            "" | "parked" => Some(DeadLetterStatus::Parked),
            "retried" => Some(DeadLetterStatus::Retried),
            "discarded" => Some(DeadLetterStatus::Discarded),
            "all" => None,
            other => {
                return Err(Failure::bad_request(
                    "invalid_filter",
                    format!("{other:?} is not a status (parked, retried, discarded, all)"),
                ))
            }
        };
        Ok((
            Selection {
                ids: number("id", &self.id)?.map(|id| vec![id]),
                group: nonempty(&self.group),
                key: nonempty(&self.key),
                reason: nonempty(&self.reason),
                up_to: None,
            },
            status,
            number("after", &self.after)?.unwrap_or(0),
        ))
    }
}

pub async fn list(
    State(console): State<Console>,
    ctx: Ctx,
    Query(filter): Query<Filter>,
) -> Result<Markup, Failure> {
    let (selection, status, after) = filter.checked()?;
    let client = console.browse.get().await?;
    let letters = dead_letters::list_page(&**client, &selection, status, after, PAGE_ROWS).await?;
    let (matching, _) = dead_letters::count_parked(&**client, &selection).await?;
    let base = &ctx.base;
    let reveal = ctx.can_see_payloads();
    let write = ctx.can_write();
    let table = html! {
        @if letters.is_empty() { p { "None." } }
        @else {
            table #dead-letters {
                tr { @if write { th { "" } } th.num { "id" } th { "group" } th { "record" } th { "key" } th { "status" } th { "reason" } th.num { "attempts" } th { "last error" } th { "parked" } th { "payload" } }
                @for d in &letters {
                    tr data-id=(d.id) {
                        @if write { td { @if d.status == DeadLetterStatus::Parked { input type="checkbox" name="id" value=(d.id) aria-label={"select " (d.id)}; } } }
                        td.num { (d.id) }
                        td { (d.group) }
                        td { a href={(base) "/topics/" (page::enc(&d.topic)) "/" (d.partition) "?from=" (d.offset)} { (d.topic) ":" (d.partition) "@" (d.offset) } }
                        td { @if let Some(k) = &d.key { @if reveal { a href={(base) "/orders?q=" (page::enc(k))} { (k) } } @else { (ctx.shown(k)) } } @else { "–" } }
                        td.status { (d.status.as_str()) }
                        td { (ctx.shown(&d.reason)) }
                        td.num { (d.attempts) }
                        td { code { (ctx.shown(d.last_error.as_deref().unwrap_or("–"))) } }
                        td { (page::time(&d.parked_at)) }
                        td { pre { (page::json(&d.payload, reveal)) } }
                    }
                }
            }
        }
    };
    Ok(ctx.page(
        "Dead letters",
        html! {
            form #filter method="get" action={(base) "/dead-letters"} {
                label { "Group " input name="group" value=(filter.group) size="14" maxlength="1024"; } " "
                label { "Key " input name="key" value=(filter.key) size="10" maxlength="1024"; } " "
                label { "Reason " input name="reason" value=(filter.reason) size="16" maxlength="1024"; } " "
                label { "Status " select name="status" {
                    @for s in ["parked", "retried", "discarded", "all"] { option selected[filter.status == s] { (s) } }
                } } " "
                button type="submit" { "Filter" }
            }
            p #matching { strong { (page::count(matching)) } " parked dead letter(s) match this filter." }
            @if write {
                form #act method="post" action={(base) "/dead-letters/act"} {
                    (ctx.csrf())
                    input type="hidden" name="step" value="preview";
                    input type="hidden" name="group" value=(filter.group);
                    input type="hidden" name="key" value=(filter.key);
                    input type="hidden" name="reason" value=(filter.reason);
                    (table)
                    @if matching > 0 {
                        p {
                            label { input type="radio" name="scope" value="selected" checked; " the selected ones" } " "
                            label { input type="radio" name="scope" value="filter"; " all " (page::count(matching)) " matching the filter" } " "
                            button.primary type="submit" name="action" value="retry" { "Re-drive…" } " "
                            button.danger type="submit" name="action" value="discard" { "Discard…" }
                        }
                    }
                }
            } @else { (table) }
            @if let Some(last) = letters.last().filter(|_| letters.len() as i64 == PAGE_ROWS) {
                a href={(base) "/dead-letters?group=" (page::enc(&filter.group)) "&key=" (page::enc(&filter.key)) "&reason=" (page::enc(&filter.reason)) "&status=" (page::enc(&filter.status)) "&after=" (last.id)} { "Next page →" }
            }
        },
    ))
}

/// `POST /dead-letters/act`: `step=preview` counts what `action` (retry or
/// discard) would act on; `step=confirm` does it.
pub async fn act(State(console): State<Console>, ctx: Ctx, body: Bytes) -> Result<Markup, Failure> {
    let form = page::FormFields::parse(&body);
    let ids = form.all("id");
    let field = |k: &str| form.get(k);
    let action = field("action");
    if action != "retry" && action != "discard" {
        return Err(Failure::bad_request(
            "invalid_action",
            format!("{action:?} is not an action on dead letters (retry, discard)"),
        ));
    }
    let filter = Filter {
        group: field("group"),
        key: field("key"),
        reason: field("reason"),
        ..Filter::default()
    };
    let (mut selection, _, _) = filter.checked()?;
    if field("scope") != "filter" {
        let ids: Vec<i64> = ids
            .iter()
            .map(|id| {
                id.parse().map_err(|_| {
                    Failure::bad_request(
                        "invalid_selection",
                        format!("{id:?} is not a dead letter id"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Err(Failure::bad_request(
                "empty_selection",
                "select at least one dead letter, or choose all matching the filter",
            ));
        }
        selection.ids = Some(ids);
    }
    // A confirm acts on what its preview counted, not on what was parked since.
    if field("step") == "confirm" {
        selection.up_to = Some(field("up_to").parse().map_err(|_| {
            Failure::bad_request(
                "invalid_selection",
                "confirm a preview (its highest id is missing)",
            )
        })?);
    }
    let mut client = console.pool.get().await?;
    let (count, up_to) = dead_letters::count_parked(&**client, &selection).await?;
    let previewed: i64 = field("previewed").parse().unwrap_or(count);
    let verb = if action == "retry" {
        "Re-drive"
    } else {
        "Discard"
    };
    let detail = json!({
        "action": action, "ids": selection.ids, "group": selection.group,
        "key": selection.key, "reason": selection.reason, "previewed": previewed,
    });
    match field("step").as_str() {
        "preview" => Ok(ctx.page(
            &format!("{verb} dead letters: preview"),
            html! {
                p #preview-count { strong { (count) } " parked dead letter(s) would be "
                    (if action == "retry" { "published again through the outbox (each a new event with a retry-of header)." } else { "marked discarded (kept for the record, never retried)." }) }
                @if count > 0 {
                    form #confirm method="post" action={(ctx.base) "/dead-letters/act"} {
                        (ctx.csrf())
                        input type="hidden" name="step" value="confirm";
                        input type="hidden" name="action" value=(action);
                        input type="hidden" name="scope" value=(field("scope"));
                        input type="hidden" name="group" value=(filter.group);
                        input type="hidden" name="key" value=(filter.key);
                        input type="hidden" name="reason" value=(filter.reason);
                        @for id in selection.ids.iter().flatten() { input type="hidden" name="id" value=(id); }
                        input type="hidden" name="up_to" value=(up_to.unwrap_or(0));
                        input type="hidden" name="previewed" value=(count);
                        button class=(if action == "retry" { "primary" } else { "danger" }) type="submit" { (verb) " " (count) }
                        " " a href={(ctx.base) "/dead-letters"} { "Cancel" }
                    }
                }
            },
        )),
        "confirm" => {
            let done = if action == "retry" {
                dead_letters::retry_dead_letters(&mut client, &selection).await?
            } else {
                dead_letters::discard_dead_letters(&**client, &selection).await?
            };
            let name = if action == "retry" { "retry-dead-letters" } else { "discard-dead-letters" };
            super::audit::record(&**client, &ctx, name, selection.group.as_deref().unwrap_or("any group"), detail, &format!("{done} of {previewed}")).await?;
            Ok(ctx.page(
                &format!("{verb} dead letters"),
                html! {
                    p.ok #done { (if action == "retry" { "Re-drove " } else { "Discarded " }) (done) " dead letters."
                        @if (done as i64) < previewed { " (" (previewed - done as i64) " of the " (previewed) " previewed were no longer parked: acted on meanwhile.)" } }
                    p { a href={(ctx.base) "/dead-letters"} { "Back to the dead letters" } }
                },
            ))
        }
        other => Err(Failure::bad_request(
            "invalid_step",
            format!("{other:?} is not a step (preview, confirm)"),
        )),
    }
}

pub async fn parked(State(console): State<Console>, ctx: Ctx) -> Result<Markup, Failure> {
    let client = console.browse.get().await?;
    let rows = crate::relay::parked::list_page(&**client, PAGE_ROWS).await?;
    let reveal = ctx.can_see_payloads();
    Ok(ctx.page(
        "Parked outbox rows",
        html! {
            p.hint { "Outbox rows the relay could not place (an unknown topic, a topic whose partitions do not match its count). Re-driving moves those whose topic now exists back into the outbox; the others stay." }
            @if rows.is_empty() { p { "None." } }
            @else {
                table #parked {
                    tr { th.num { "outbox id" } th { "topic" } th { "key" } th { "created" } th { "reason" } th { "payload" } @if ctx.can_write() { th { "" } } }
                    @for r in &rows {
                        tr {
                            td.num { (r.outbox_id) } td { (r.topic) } td { (ctx.shown(r.key.as_deref().unwrap_or("–"))) }
                            td { (page::time(&r.created_at)) } td { (ctx.shown(&r.reason)) }
                            td { pre { (page::json(&r.payload, reveal)) } }
                            @if ctx.can_write() { td {
                                form.inline method="post" action={(ctx.base) "/parked/redrive"} {
                                    (ctx.csrf()) input type="hidden" name="id" value=(r.outbox_id);
                                    input type="hidden" name="step" value="preview";
                                    button type="submit" { "Re-drive…" }
                                }
                            } }
                        }
                    }
                }
                @if ctx.can_write() {
                    form method="post" action={(ctx.base) "/parked/redrive"} {
                        (ctx.csrf()) input type="hidden" name="id" value="all";
                        input type="hidden" name="step" value="preview";
                        button.primary type="submit" { "Re-drive every parked row whose topic exists…" }
                    }
                }
            }
        },
    ))
}

/// `POST /parked/redrive`: `id` (an outbox id, or `all`); `step=preview`
/// counts what would move, `step=confirm` moves it.
pub async fn redrive_parked(
    State(console): State<Console>,
    ctx: Ctx,
    body: Bytes,
) -> Result<Markup, Failure> {
    let form = page::FormFields::parse(&body);
    let ids = form.all("id");
    let id = match ids.first().map(String::as_str) {
        Some("all") => None,
        Some(id) => Some(id.parse::<i64>().map_err(|_| {
            Failure::bad_request("invalid_selection", format!("{id:?} is not an outbox id"))
        })?),
        None => return Err(Failure::bad_request("empty_selection", "which parked row?")),
    };
    let mut client = console.pool.get().await?;
    let target = id.map_or("all".to_string(), |id| id.to_string());
    if form.get("step") != "confirm" {
        let (moving, staying) = crate::relay::parked::redrive_preview(&**client, id).await?;
        return Ok(ctx.page(
            "Re-drive parked rows: preview",
            html! {
                p #preview-count { strong { (moving) } " parked row(s) would move back into the outbox (each reaches the log once, with its original created_at); "
                    (staying) " would stay parked (their topic is still missing)." }
                @if moving > 0 {
                    form #confirm method="post" action={(ctx.base) "/parked/redrive"} {
                        (ctx.csrf())
                        input type="hidden" name="step" value="confirm";
                        input type="hidden" name="id" value=(target);
                        button.primary type="submit" { "Re-drive " (moving) }
                        " " a href={(ctx.base) "/parked"} { "Cancel" }
                    }
                }
            },
        ));
    }
    let done = crate::relay::parked::redrive(&mut client, id).await?;
    let detail =
        json!({ "redriven": done.redriven.len(), "still_parked": done.still_parked.len() });
    super::audit::record(&**client, &ctx, "redrive-parked", &target, detail, "done").await?;
    Ok(ctx.page(
        "Re-drive parked rows",
        html! {
            p.ok #done { "Moved " (done.redriven.len()) " rows back into the outbox." }
            @for (outbox_id, topic, reason) in &done.still_parked { p { "Still parked: " (outbox_id) " (" (topic) "): " (reason) } }
            p { a href={(ctx.base) "/parked"} { "Back to the parked rows" } }
        },
    ))
}
