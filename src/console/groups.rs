//! Consumer groups: every kind (native members such as the mail worker and
//! webhook sinks, Kafka-protocol groups), including groups that never
//! committed; members, assignments, committed offsets and lag per
//! partition in records and seconds. And offset resets with Kafka's
//! options: a preview of current → new per partition, then an explicit
//! confirm that applies exactly the previewed offsets — the plan signed
//! when shown, and refused if the group committed since (checked under the
//! group's lock by `group::admin::execute_reset`, as for the CLI).

use std::collections::{BTreeMap, HashMap};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::Utc;
use maud::{html, Markup};
use serde_json::json;

use super::page::{self, Ctx, Failure};
use super::Console;
use crate::group::admin::{self, AdminError, PlannedReset, ResetTo};

const KAFKA_GROUPS: &str = "SELECT group_id FROM kafka_groups";

const KAFKA_INSTANCE_IDS: &str = "
    SELECT member_id, group_instance_id FROM kafka_group_members
     WHERE group_id = $1 AND group_instance_id IS NOT NULL";

/// What reads a group, in words.
fn kind(group: &str, kafka: bool) -> &'static str {
    if kafka {
        "Kafka clients"
    } else if group == crate::app::mail::MAIL_GROUP {
        "mail worker"
    } else if group.starts_with("webhook-") {
        "webhook sink"
    } else {
        "native"
    }
}

impl From<AdminError> for Failure {
    fn from(e: AdminError) -> Failure {
        match e {
            e @ AdminError::ActiveOnReset { .. } | e @ AdminError::ActiveOnDelete { .. } => {
                Failure::new(StatusCode::CONFLICT, "group_active", e.to_string())
            }
            e @ AdminError::NoCommitToShift { .. } => {
                Failure::bad_request("no_commit_to_shift", e.to_string())
            }
            e @ AdminError::UnknownGroup(_) => Failure::not_found("unknown_group", e.to_string()),
            e @ AdminError::ChangedSincePlan { .. } => {
                Failure::new(StatusCode::CONFLICT, "changed_since_preview", e.to_string())
            }
            AdminError::Log(e) => e.into(),
            AdminError::Db(e) => e.into(),
        }
    }
}

pub async fn list(State(console): State<Console>, ctx: Ctx) -> Result<Markup, Failure> {
    let client = console.browse.get().await?;
    let groups = admin::list_groups(&**client).await?;
    let lags = admin::partition_lags(&**client).await?;
    let members: HashMap<String, i64> = admin::live_member_counts(&**client)
        .await?
        .into_iter()
        .collect();
    let kafka: Vec<String> = client
        .query(KAFKA_GROUPS, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut totals: BTreeMap<&str, (i64, f64, usize, usize)> = BTreeMap::new();
    for l in &lags {
        let t = totals.entry(l.group.as_str()).or_default();
        t.0 += l.lag;
        t.1 = t.1.max(l.lag_seconds);
        t.2 += 1;
        t.3 += usize::from(l.committed_offset.is_none());
    }
    Ok(ctx.page(
        "Groups",
        html! {
            table #groups {
                tr { th { "group" } th { "kind" } th { "state" } th.num { "members" } th.num { "partitions" } th.num { "lag (records)" } th.num { "lag (s)" } }
                @for g in &groups {
                    @let (lag, seconds, partitions, uncommitted) = totals.get(g.as_str()).copied().unwrap_or_default();
                    @let live = members.get(g).copied().unwrap_or(0);
                    tr data-group=(g) {
                        td { a href={(ctx.base) "/groups/" (page::enc(g))} { (g) } }
                        td { (kind(g, kafka.contains(g))) }
                        td { (if live > 0 { "Stable" } else { "Empty" }) }
                        td.num { (live) }
                        td.num { (partitions) @if uncommitted > 0 { span.muted { " (" (uncommitted) " never committed)" } } }
                        td.num.lag { (page::count(lag)) }
                        td.num { (format!("{seconds:.1}")) }
                    }
                }
            }
            @if groups.is_empty() { p { "No consumer groups yet." } }
        },
    ))
}

pub async fn group(
    State(console): State<Console>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> Result<Markup, Failure> {
    let client = console.browse.get().await?;
    let body = described(&client, &ctx, &name).await?;
    let topics = crate::log::topics::list_topics(&**client).await?;
    let form = reset_form(&ctx, &name, &topics, &ResetRequest::default());
    Ok(ctx.page(&format!("Group {name}"), html! { (body) (form) }))
}

/// The group's members and partitions.
async fn described(
    client: &tokio_postgres::Client,
    ctx: &Ctx,
    name: &str,
) -> Result<Markup, Failure> {
    let Some(d) = admin::describe(client, name).await? else {
        return Err(Failure::not_found(
            "unknown_group",
            format!("consumer group {name:?} does not exist"),
        ));
    };
    let seconds: HashMap<(String, i32), f64> = admin::partition_lags_of(client, Some(name))
        .await?
        .into_iter()
        .map(|l| ((l.topic, l.partition), l.lag_seconds))
        .collect();
    let instance_ids: HashMap<String, String> = client
        .query(KAFKA_INSTANCE_IDS, &[&name])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let base = &ctx.base;
    Ok(html! {
        p #state { "State " strong { (d.state) } ", " (d.members.len()) " live members." }
        h2 { "Members" }
        @if d.members.is_empty() { p.muted { "No live member." } }
        @else {
            table #members {
                tr { th { "member" } th { "instance id" } th { "host" } th { "client" } th { "last heartbeat" } th { "partitions" } }
                @for m in &d.members {
                    tr {
                        td { code { (m.member_id) } }
                        td { (instance_ids.get(&m.member_id).map_or("–", String::as_str)) }
                        td { (m.host) }
                        td { (m.client_id) }
                        td { (page::time(&m.last_heartbeat)) }
                        td { (m.partitions.join(", ")) }
                    }
                }
            }
        }
        h2 { "Partitions" }
        table #partitions {
            tr { th { "topic" } th.num { "partition" } th.num { "committed" } th.num { "log end" } th.num { "lag" } th.num { "lag (s)" } th { "owner" } }
            @for p in &d.partitions {
                tr data-partition=(format!("{}:{}", p.topic, p.partition)) {
                    td { a href={(base) "/topics/" (page::enc(&p.topic))} { (p.topic) } }
                    td.num { (p.partition) }
                    td.num.committed { (p.committed_offset.map_or("never".to_string(), |c| c.to_string())) }
                    td.num { (p.log_end_offset) }
                    td.num { (p.lag.map_or("–".to_string(), page::count)) }
                    td.num { (format!("{:.1}", seconds.get(&(p.topic.clone(), p.partition)).copied().unwrap_or(0.0))) }
                    td { (p.owner.as_deref().unwrap_or("–")) }
                }
            }
        }
    })
}

/// A reset as the form gives it.
#[derive(Debug, Default, Clone)]
struct ResetRequest {
    /// A topic, or empty for every topic the group has offsets for.
    topic: String,
    /// earliest, latest, offset, datetime, duration, shift.
    to: String,
    value: String,
}

impl ResetRequest {
    fn target(&self) -> Result<ResetTo, Failure> {
        let value = self.value.trim();
        let bad =
            |what: &str| Failure::bad_request("invalid_reset", format!("{value:?} is not {what}"));
        Ok(match self.to.as_str() {
            "earliest" => ResetTo::Earliest,
            "latest" => ResetTo::Latest,
            "offset" => ResetTo::Offset(
                value
                    .parse::<i64>()
                    .ok()
                    .filter(|o| *o >= 0)
                    .ok_or_else(|| bad("an offset (a whole number, 0 or more)"))?,
            ),
            "datetime" => ResetTo::Datetime(
                crate::cli::parse::datetime(value)
                    .map_err(|e| Failure::bad_request("invalid_reset", e))?,
            ),
            "duration" => {
                let back = crate::cli::parse::iso_duration(value)
                    .map_err(|e| Failure::bad_request("invalid_reset", e))?;
                ResetTo::Datetime(
                    Utc::now()
                        - chrono::Duration::from_std(back)
                            .map_err(|_| bad("a duration within range"))?,
                )
            }
            "shift" => ResetTo::ShiftBy(
                value
                    .parse::<i64>()
                    .map_err(|_| bad("a number of offsets to shift by"))?,
            ),
            other => {
                return Err(Failure::bad_request(
                    "invalid_reset",
                    format!("{other:?} is not a reset option (earliest, latest, offset, datetime, duration, shift)"),
                ))
            }
        })
    }

    fn detail(&self) -> serde_json::Value {
        json!({ "topic": self.topic, "to": self.to, "value": self.value })
    }
}

fn reset_form(
    ctx: &Ctx,
    group: &str,
    topics: &[crate::log::Topic],
    given: &ResetRequest,
) -> Markup {
    if !ctx.can_write() {
        return html! {};
    }
    let options = [
        ("earliest", "to the earliest retained offset"),
        ("latest", "to the log end"),
        ("offset", "to offset …"),
        ("datetime", "to the time … (2026-12-01T00:00:00.000)"),
        ("duration", "back by a duration … (P30D, PT12H)"),
        ("shift", "shift by … (negative: back)"),
    ];
    html! {
        h2 { "Reset offsets" }
        p.hint { "Only while the group has no live member. You see the change per partition before anything happens. The mail worker's ledger still keeps a rewound group from mailing an order twice: to send mails again, start a replay." }
        form #reset method="post" action={(ctx.base) "/groups/" (page::enc(group)) "/reset"} {
            (ctx.csrf())
            input type="hidden" name="step" value="preview";
            label { "Topic " select name="topic" {
                option value="" selected[given.topic.is_empty()] { "every topic of the group" }
                @for t in topics { option value=(t.name) selected[given.topic == t.name] { (t.name) } }
            } } " "
            label { "Move " select name="to" {
                @for (value, label) in options { option value=(value) selected[given.to == value] { (label) } }
            } } " "
            input name="value" value=(given.value) size="26" maxlength="64" placeholder="offset, time, duration or shift";
            " " button.primary type="submit" { "Preview" }
        }
    }
}

/// Planned partitions as the confirm form carries them: `topic partition current new`.
fn plan_field(p: &PlannedReset) -> String {
    format!(
        "{} {} {} {}",
        p.topic,
        p.partition,
        p.current_offset.map_or("-".to_string(), |c| c.to_string()),
        p.new_offset
    )
}

fn parse_plan(entries: &[String]) -> Result<Vec<PlannedReset>, Failure> {
    let bad = || {
        Failure::bad_request(
            "invalid_plan",
            "the confirmed plan is not one this console made",
        )
    };
    entries
        .iter()
        .map(|e| {
            let f: Vec<&str> = e.split(' ').collect();
            let [topic, partition, current, new] = f[..] else {
                return Err(bad());
            };
            Ok(PlannedReset {
                topic: topic.to_string(),
                partition: partition.parse().map_err(|_| bad())?,
                current_offset: match current {
                    "-" => None,
                    c => Some(c.parse().map_err(|_| bad())?),
                },
                new_offset: new.parse().map_err(|_| bad())?,
            })
        })
        .collect()
}

fn plan_parts<'a>(group: &'a str, plan: &'a [String]) -> Vec<&'a [u8]> {
    std::iter::once(group.as_bytes())
        .chain(plan.iter().map(|p| p.as_bytes()))
        .collect()
}

/// The previewed plan's signature, checked at the confirm.
fn plan_mac(console: &Console, group: &str, plan: &[String]) -> String {
    console.auth.sign(&plan_parts(group, plan))
}

/// `POST /groups/{group}/reset`: `step=preview` plans and shows the change;
/// `step=confirm` applies the previewed plan.
pub async fn reset(
    State(console): State<Console>,
    ctx: Ctx,
    Path(group): Path<String>,
    body: Bytes,
) -> Result<Markup, Failure> {
    let form = page::FormFields::parse(&body);
    let plan = form.all("plan");
    let field = |k: &str| form.get(k);
    let request = ResetRequest {
        topic: field("topic"),
        to: field("to"),
        value: field("value"),
    };
    let mut client = console.pool.get().await?;
    if admin::describe(&**client, &group).await?.is_none() {
        return Err(Failure::not_found(
            "unknown_group",
            format!("consumer group {group:?} does not exist"),
        ));
    }
    match field("step").as_str() {
        "preview" => {
            let to = request.target()?;
            let topics = match request.topic.as_str() {
                "" => admin::group_topics(&**client, &group).await?,
                t => vec![t.to_string()],
            };
            let mut planned = Vec::new();
            for topic in &topics {
                planned.extend(admin::plan_reset(&**client, &group, topic, None, &to).await?);
            }
            let members = admin::has_live_members(&**client, &group).await?;
            let refusal = (members > 0).then(|| {
                AdminError::ActiveOnReset {
                    group: group.clone(),
                    members,
                }
                .to_string()
            });
            let all_topics = crate::log::topics::list_topics(&**client).await?;
            Ok(ctx.page(
                &format!("Reset {group}: preview"),
                html! {
                    @if let Some(refusal) = &refusal { p.error data-code="group_active" { (refusal) } }
                    @if planned.is_empty() { p { "The group has no offsets to move on that topic." } }
                    @else {
                        table #preview {
                            tr { th { "topic" } th.num { "partition" } th.num { "current" } th.num { "new" } th.num { "change" } }
                            @for p in &planned {
                                tr {
                                    td { (p.topic) } td.num { (p.partition) }
                                    td.num.current { (p.current_offset.map_or("never".into(), |c| c.to_string())) }
                                    td.num.new { (p.new_offset) }
                                    td.num { (p.current_offset.map_or("–".into(), |c| format!("{:+}", p.new_offset - c))) }
                                }
                            }
                        }
                        @if refusal.is_none() {
                            form #confirm method="post" action={(ctx.base) "/groups/" (page::enc(&group)) "/reset"} {
                                (ctx.csrf())
                                input type="hidden" name="step" value="confirm";
                                input type="hidden" name="topic" value=(request.topic);
                                input type="hidden" name="to" value=(request.to);
                                input type="hidden" name="value" value=(request.value);
                                @for p in &planned { input type="hidden" name="plan" value=(plan_field(p)); }
                                input type="hidden" name="plan_mac" value=(plan_mac(&console, &group, &planned.iter().map(plan_field).collect::<Vec<_>>()));
                                button.danger type="submit" { "Move " (planned.len()) " partition offsets" }
                                " " a href={(ctx.base) "/groups/" (page::enc(&group))} { "Cancel" }
                            }
                        }
                    }
                    (reset_form(&ctx, &group, &all_topics, &request))
                },
            ))
        }
        "confirm" => {
            // Exactly the plan this console showed: signed when previewed.
            if !console
                .auth
                .verify(&plan_parts(&group, &plan), &field("plan_mac"))
            {
                return Err(Failure::bad_request(
                    "invalid_plan",
                    "the confirmed plan is not one this console made: preview again",
                ));
            }
            let planned = parse_plan(&plan)?;
            if planned.is_empty() {
                return Err(Failure::bad_request("invalid_plan", "nothing to confirm"));
            }
            let detail = json!({ "request": request.detail(), "partitions": planned.len() });
            match admin::execute_reset(&mut client, &group, &planned).await {
                Ok(()) => {
                    super::audit::record(&**client, &ctx, "reset-offsets", &group, detail, "done")
                        .await?;
                }
                Err(e) => {
                    let failure = Failure::from(e);
                    super::audit::record(
                        &**client,
                        &ctx,
                        "reset-offsets",
                        &group,
                        detail,
                        failure.code,
                    )
                    .await?;
                    return Err(failure);
                }
            }
            let body = described(&client, &ctx, &group).await?;
            Ok(ctx.page(
                &format!("Group {group}"),
                html! {
                    p.ok #done { "Moved " (planned.len()) " partition offsets. The group reads from them next." }
                    (body)
                },
            ))
        }
        other => Err(Failure::bad_request(
            "invalid_step",
            format!("{other:?} is not a step of a reset (preview, confirm)"),
        )),
    }
}

pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("console::groups::KAFKA_GROUPS", KAFKA_GROUPS.to_string()),
        (
            "console::groups::KAFKA_INSTANCE_IDS",
            KAFKA_INSTANCE_IDS.to_string(),
        ),
    ]
}
