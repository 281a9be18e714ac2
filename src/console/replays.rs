//! Replays: start one (a time or offset range) after the plan's preview
//! (`replay --dry-run`'s table) with a rate limit, watch it live (done of
//! total, rate, ETA), stop it, resume an interrupted run; each run's dead
//! letters and events in doubt.
//!
//! The form becomes `replay`'s own arguments, parsed by the CLI's parser,
//! planned and started by the CLI's functions (`cli::replay::plan`,
//! `start`); the run goes on in this process, on a task of its own.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use clap::Parser;
use maud::{html, Markup};
use serde_json::json;

use super::page::{self, Ctx, Failure};
use super::Console;
use crate::app::replay::{self, RunDescription};
use crate::cli::replay::{ReplayArgs, ReplayArgsOnly};

/// Runs listed at most (the newest).
const RUNS_LISTED: i64 = 20;

/// Runs started by this process's console.
pub struct Runner {
    database_url: String,
    data_dir: PathBuf,
    /// Where replayed mail goes: the process's own mail settings, as
    /// `replay` arguments.
    mail_args: Vec<String>,
    running: Arc<Mutex<HashMap<i64, RunningHere>>>,
    /// One launch at a time: a second confirm of the same replay then
    /// finds the first one's run (and refuses), instead of making another
    /// run that would mail every event again.
    launching: tokio::sync::Mutex<()>,
    /// Each run's description, read at most once a second whoever watches.
    described: Mutex<HashMap<i64, (Instant, Arc<RunDescription>)>>,
    /// The previews already confirmed (their nonces) and the runs they
    /// started: a second submit of one preview starts nothing.
    confirmed: Mutex<HashMap<String, i64>>,
}

struct RunningHere {
    trigger: crate::shutdown::ShutdownTrigger,
    /// Ends when the run's task has ended and left the registry.
    ended: tokio::task::JoinHandle<()>,
}

impl Runner {
    /// `mail_args`: the process's mail settings as `replay` arguments
    /// (`--smtp-url`, `--mail-from`, `--mail-currency`).
    pub fn new(database_url: &str, mail_args: Vec<String>, data_dir: PathBuf) -> Runner {
        Runner {
            database_url: database_url.to_string(),
            data_dir,
            mail_args,
            running: Arc::default(),
            launching: tokio::sync::Mutex::new(()),
            described: Mutex::default(),
            confirmed: Mutex::default(),
        }
    }

    /// Stops the runs started here when the process stops (their events in
    /// flight finish; each can be resumed).
    pub fn stopper(console: &Console) -> ReplayStopper {
        ReplayStopper(console.clone())
    }

    fn is_running_here(&self, run: i64) -> bool {
        self.running
            .lock()
            .expect("not poisoned")
            .contains_key(&run)
    }
}

/// The service that, at shutdown, ends the console's live streams and
/// interrupts its replays.
pub struct ReplayStopper(Console);

impl crate::service::Service for ReplayStopper {
    fn name(&self) -> &'static str {
        "console-replays"
    }

    async fn run(self, mut shutdown: crate::shutdown::Shutdown) -> anyhow::Result<()> {
        shutdown.recv().await;
        // The live streams end, so the server's shutdown need not wait on them.
        self.0.closing.send_replace(true);
        let running: Vec<(i64, RunningHere)> = self
            .0
            .replays
            .running
            .lock()
            .expect("not poisoned")
            .drain()
            .collect();
        for (_, here) in &running {
            here.trigger.trigger();
        }
        for (run, here) in running {
            if tokio::time::timeout(Duration::from_secs(15), here.ended)
                .await
                .is_err()
            {
                tracing::warn!(run, "a console replay did not stop within 15 s");
            }
        }
        Ok(())
    }
}

/// The form of a new replay, as `replay` arguments.
fn arguments(fields: &HashMap<String, String>, mail: &[String]) -> Result<ReplayArgs, Failure> {
    let field = |k: &str| {
        fields
            .get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let mut argv: Vec<String> = Vec::new();
    let mut add = |flag: &str, value: Option<String>| {
        if let Some(v) = value {
            argv.push(format!("--{flag}"));
            argv.push(v);
        }
    };
    add("topic", field("topic"));
    if let Some(run) = field("resume") {
        add("resume", Some(run));
    } else {
        match field("by").as_deref() {
            Some("offset") => {
                add(
                    "from-offset",
                    Some(field("from_offset").unwrap_or_default()),
                );
                add("to-offset", field("to_offset"));
            }
            _ => {
                add("from", Some(field("from").unwrap_or_default()));
                add("to", field("to"));
            }
        }
    }
    add("partitions", field("partitions"));
    add("max-rate", field("max_rate"));
    argv.extend(mail.iter().cloned());
    ReplayArgsOnly::try_parse_from(&argv)
        .map(|parsed| parsed.args)
        .map_err(|e| {
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid replay")
                .trim_start_matches("error: ");
            Failure::bad_request("invalid_replay", first.to_string())
        })
}

pub async fn list(State(console): State<Console>, ctx: Ctx) -> Result<Markup, Failure> {
    let client = console.pool.get().await?;
    let runs = replay::newest_runs(&client, RUNS_LISTED).await?;
    Ok(ctx.page(
        "Replays",
        html! {
            p.hint { "A replay mails a range of order-created again under a run of its own (it never touches the live group, and mails each event at most once per run)." }
            (start_form(&ctx, &HashMap::new()))
            h2 { "Runs" } p.hint { "The newest " (RUNS_LISTED) "; outbox-relay replay list shows them all." }
            @if runs.is_empty() { p { "None yet." } }
            @else {
                table #runs {
                    tr { th.num { "run" } th { "topic" } th { "state" } th.num { "total" } th.num { "sent" } th.num { "failed" } th.num { "unknown" } th.num { "in doubt" } th { "created" } th { "bounds" } }
                    @for r in &runs {
                        tr data-run=(r.id) {
                            td.num { a href={(ctx.base) "/replays/" (r.id)} { (r.id) } }
                            td { (r.topic) } td.state { (r.state) }
                            td.num { (r.total) } td.num { (r.sent) } td.num { (r.failed) } td.num { (r.unknown) } td.num { (r.in_doubt) }
                            td { (page::time(&r.created_at)) }
                            td { code { (r.request) } }
                        }
                    }
                }
            }
        },
    ))
}

fn start_form(ctx: &Ctx, given: &HashMap<String, String>) -> Markup {
    if !ctx.can_write() {
        return html! {};
    }
    let v = |k: &str| given.get(k).cloned().unwrap_or_default();
    let by_offset = v("by") == "offset";
    html! {
        h2 { "Start a replay" }
        form #replay method="post" action={(ctx.base) "/replays/start"} {
            (ctx.csrf())
            input type="hidden" name="step" value="preview";
            p {
                label { "Topic " input name="topic" value=(given.get("topic").cloned().unwrap_or_else(|| crate::app::order::ORDER_CREATED_TOPIC.into())) size="16" maxlength="249"; }
            }
            p {
                label { input type="radio" name="by" value="time" checked[!by_offset]; " by time: from " }
                input name="from" value=(v("from")) size="24" maxlength="64" placeholder="2026-11-01 or RFC 3339";
                " to " input name="to" value=(v("to")) size="24" maxlength="64" placeholder="(the log end)";
            }
            p {
                label { input type="radio" name="by" value="offset" checked[by_offset]; " by offset: from " }
                input name="from_offset" value=(v("from_offset")) size="14" maxlength="200" placeholder="0 or 0:10,1:20";
                " to " input name="to_offset" value=(v("to_offset")) size="14" maxlength="200" placeholder="(the log end)";
            }
            p {
                label { "Partitions " input name="partitions" value=(v("partitions")) size="10" maxlength="200" placeholder="(all)"; } " "
                label { "At most " input name="max_rate" value=(v("max_rate")) size="6" maxlength="12" placeholder="(no limit)"; " mails/s" }
            }
            button.primary type="submit" { "Preview the plan" }
        }
    }
}

/// `POST /replays/start`: `step=preview` shows the plan; `step=confirm`
/// starts it and goes to its page.
pub async fn start(
    State(console): State<Console>,
    ctx: Ctx,
    body: Bytes,
) -> Result<Response, Failure> {
    let fields = page::FormFields::parse(&body).into_map();
    let args = arguments(&fields, &console.replays.mail_args)?;
    let mut client = console.pool.get().await?;
    // Planned and launched under the lock: a second confirm finds the run.
    let _launching = console.replays.launching.lock().await;
    let plan = crate::cli::replay::plan(&client, &args)
        .await
        .map_err(|e| Failure::bad_request("invalid_replay", format!("{e:#}")))?;
    match fields.get("step").map(String::as_str) {
        Some("preview") => Ok(ctx
            .page(
                "Replay: the plan",
                html! {
                    @if let Some(run) = plan.run_id { p.notice { "An unfinished run of the same replay exists: starting resumes run " (run) "." } }
                    p.hint { "Offsets [from, to); with a time range, records created outside it are skipped." }
                    table #plan {
                        tr { th.num { "partition" } th.num { "from" } th.num { "to" } th.num { "records" } }
                        @for r in &plan.ranges { tr { td.num { (r.partition) } td.num { (r.from) } td.num { (r.to) } td.num { (r.count()) } } }
                        tr { th { "total" } td {} td {} th.num #plan-total { (plan.total) } }
                    }
                    form #confirm method="post" action={(ctx.base) "/replays/start"} {
                        (ctx.csrf())
                        input type="hidden" name="step" value="confirm";
                        input type="hidden" name="nonce" value=(hex_nonce());
                        @for (k, v) in &fields { @if k != "step" && k != "csrf" && k != "nonce" { input type="hidden" name=(k) value=(v); } }
                        button.danger type="submit" { "Start: mail these events again" }
                        " " a href={(ctx.base) "/replays"} { "Cancel" }
                    }
                    (start_form(&ctx, &fields))
                },
            )
            .into_response()),
        Some("confirm") => {
            // One run per preview, however often its form is submitted.
            let nonce = fields.get("nonce").cloned().unwrap_or_default();
            if nonce.len() != 32 {
                return Err(Failure::bad_request("invalid_replay", "confirm a preview of the replay"));
            }
            let started = console.replays.confirmed.lock().expect("not poisoned").get(&nonce).copied();
            let run = match started {
                Some(run) => run,
                None => {
                    let run = launch(&console, &ctx, &mut client, &args, plan).await?;
                    let mut confirmed = console.replays.confirmed.lock().expect("not poisoned");
                    if confirmed.len() >= 10_000 {
                        confirmed.clear();
                    }
                    confirmed.insert(nonce, run);
                    run
                }
            };
            Ok(Redirect::to(&format!("{}/replays/{run}", ctx.base)).into_response())
        }
        _ => Err(Failure::bad_request("invalid_step", "a replay's step is preview or confirm")),
    }
}

/// A preview's one-time name (128 random bits, hex).
fn hex_nonce() -> String {
    rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Starts the plan in this process and writes it to the audit trail.
async fn launch(
    console: &Console,
    ctx: &Ctx,
    client: &mut tokio_postgres::Client,
    args: &ReplayArgs,
    plan: crate::cli::replay::Plan,
) -> Result<i64, Failure> {
    let runner = &console.replays;
    if plan.run_id.is_some_and(|run| runner.is_running_here(run)) {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "replay_running",
            "that run is running already",
        ));
    }
    let total = plan.total;
    let running =
        crate::cli::replay::start(client, &runner.database_url, args, plan, &runner.data_dir)
            .await
            .map_err(|e| Failure::bad_request("invalid_replay", format!("{e:#}")))?;
    let run = running.run_id;
    let registry = runner.running.clone();
    let finish = running.finish;
    {
        let mut registered = runner.running.lock().expect("not poisoned");
        if *console.closing.borrow() {
            // The process is stopping: this run stops with it at once.
            running.trigger.trigger();
        }
        let ended = tokio::spawn(async move {
            match finish.await {
                Ok(Ok(finish)) => tracing::info!(run, ?finish, "console replay ended"),
                Ok(Err(e)) => {
                    tracing::warn!(run, error = %format!("{e:#}"), "console replay failed")
                }
                Err(e) => tracing::warn!(run, error = %e, "console replay task failed"),
            }
            registry.lock().expect("not poisoned").remove(&run);
        });
        registered.insert(
            run,
            RunningHere {
                trigger: running.trigger,
                ended,
            },
        );
    }
    let detail = json!({ "request": args_summary(args), "planned": total });
    super::audit::record(
        client,
        ctx,
        "replay",
        &format!("run {run}"),
        detail,
        "started",
    )
    .await?;
    Ok(run)
}

fn args_summary(args: &ReplayArgs) -> serde_json::Value {
    json!({
        "topic": args.topic, "from": args.from.map(|t| t.to_rfc3339()), "to": args.to.map(|t| t.to_rfc3339()),
        "from_offset": args.from_offset.as_ref().map(|o| format!("{o:?}")),
        "resume": args.resume, "max_rate": args.max_rate,
    })
}

fn run_id(text: &str) -> Result<i64, Failure> {
    text.parse()
        .map_err(|_| Failure::bad_request("invalid_run", format!("{text:?} is not a run id")))
}

/// A run's description, read again only when the last read is a second
/// old: watchers of one run share it.
async fn described(console: &Console, run: i64) -> Result<Arc<RunDescription>, Failure> {
    let cached = console
        .replays
        .described
        .lock()
        .expect("not poisoned")
        .get(&run)
        .filter(|(at, _)| at.elapsed() < Duration::from_millis(900))
        .map(|(_, d)| d.clone());
    if let Some(d) = cached {
        return Ok(d);
    }
    let client = console.pool.get().await?;
    let d = Arc::new(
        replay::describe_run(&client, run)
            .await
            .map_err(|e| Failure::not_found("unknown_run", format!("{e:#}")))?,
    );
    let mut cache = console.replays.described.lock().expect("not poisoned");
    // Runs watched long ago are forgotten.
    cache.retain(|_, (at, _)| at.elapsed() < Duration::from_secs(60));
    cache.insert(run, (Instant::now(), d.clone()));
    Ok(d)
}

pub async fn run(
    State(console): State<Console>,
    ctx: Ctx,
    Path(run): Path<String>,
) -> Result<Markup, Failure> {
    let run = run_id(&run)?;
    let d = described(&console, run).await?;
    let here = console.replays.is_running_here(run);
    Ok(ctx.page(
        &format!("Replay run {run}"),
        html! {
            div #live hx-ext="sse" sse-connect={(ctx.base) "/replays/" (run) "/events"} sse-swap="progress" {
                (figures(&d, None))
            }
            @if ctx.can_write() {
                @if here {
                    form method="post" action={(ctx.base) "/replays/" (run) "/resume"} {
                        (ctx.csrf()) input type="hidden" name="stop" value="1";
                        button.danger type="submit" { "Stop (resume later)" }
                    }
                } @else if d.run.state != "done" {
                    form #resume method="post" action={(ctx.base) "/replays/" (run) "/resume"} {
                        (ctx.csrf())
                        button.primary type="submit" { "Resume run " (run) }
                    }
                }
            }
            h2 { "Dead letters of this run" }
            @if d.dead_letters.is_empty() { p.muted { "None." } }
            @else {
                table {
                    tr { th.num { "partition" } th.num { "offset" } th.num { "attempts" } th { "reason" } th { "last error" } }
                    @for l in &d.dead_letters { tr { td.num { (l.partition) } td.num { (l.offset) } td.num { (l.attempts) } td { (ctx.shown(l.reason.as_deref().unwrap_or("–"))) } td { code { (ctx.shown(l.last_error.as_deref().unwrap_or("–"))) } } } }
                }
            }
            h2 { "In doubt" }
            @if d.in_doubt_events.is_empty() { p.muted { "None." } }
            @else { p { "In flight when the run stopped (may have gone out; not sent again unless asked with replay --resume " (run) " --resend-in-doubt): " (format!("{:?}", d.in_doubt_events)) } }
        },
    ))
}

/// A run's progress: done of total, rate and ETA (the part the stream replaces).
fn figures(d: &RunDescription, rate: Option<f64>) -> Markup {
    let total: i64 = d
        .partitions
        .iter()
        .map(|p| p.to_offset - p.from_offset)
        .sum();
    let done: i64 = d
        .partitions
        .iter()
        .map(|p| (p.next_offset.min(p.to_offset) - p.from_offset).max(0))
        .sum();
    let r = &d.run;
    html! {
        dl #progress {
            dt { "state" } dd.state data-state=(r.state) { (r.state) }
            dt { "done" } dd #done { (page::count(done)) " of " (page::count(total)) " (" (format!("{:.0}", 100.0 * done as f64 / total.max(1) as f64)) "%)" }
            dt { "rate" } dd { (rate.map_or("–".into(), |r| format!("{r:.1} events/s"))) }
            dt { "ETA" } dd { (match rate { Some(rate) if rate > 0.0 && done < total => format!("{:.0} s", (total - done) as f64 / rate), _ => "–".into() }) }
            dt { "sent" } dd #sent { (r.sent) }
            dt { "failed / unknown" } dd { (r.failed) " / " (r.unknown) }
            dt { "in doubt" } dd { (r.in_doubt) }
            dt { "bounds" } dd { code { (r.request) } }
        }
        h2 { "Partitions" }
        table {
            tr { th.num { "partition" } th.num { "from" } th.num { "to" } th.num { "next" } th.num { "left" } }
            @for p in &d.partitions { tr { td.num { (p.partition) } td.num { (p.from_offset) } td.num { (p.to_offset) } td.num { (p.next_offset) } td.num { ((p.to_offset - p.next_offset).max(0)) } } }
        }
    }
}

/// The run's progress every second until it is done.
pub async fn events(
    State(console): State<Console>,
    Path(run): Path<String>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>, Failure> {
    let run = run_id(&run)?;
    described(&console, run).await?;
    let closed = console.closed();
    let stream = futures_util::stream::unfold(
        (console, None::<(Instant, i64)>, false),
        move |(console, previous, finished)| async move {
            if finished {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Ok(d) = described(&console, run).await else {
                // A failed read is skipped: the page keeps its figures.
                let comment = Event::default().comment("the run could not be read");
                return Some((Ok(comment), (console, previous, false)));
            };
            let done: i64 = d
                .partitions
                .iter()
                .map(|p| (p.next_offset.min(p.to_offset) - p.from_offset).max(0))
                .sum();
            let now = Instant::now();
            let rate = previous.map(|(then, before)| {
                (done - before).max(0) as f64 / now.duration_since(then).as_secs_f64().max(0.001)
            });
            let html = figures(&d, rate).into_string();
            let finished = d.run.state == "done";
            Some((
                Ok(Event::default().event("progress").data(html)),
                (console, Some((now, done)), finished),
            ))
        },
    );
    // Once done, the stream stays open and quiet: a closed one would be
    // reopened by the browser, again and again.
    let stream = futures_util::StreamExt::chain(stream, futures_util::stream::pending());
    let stream = futures_util::StreamExt::take_until(stream, closed);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// `POST /replays/{run}/resume`: resumes an interrupted run in this
/// process, or (`stop=1`) stops one running here.
pub async fn resume(
    State(console): State<Console>,
    ctx: Ctx,
    Path(run): Path<String>,
    body: Bytes,
) -> Result<Response, Failure> {
    let run = run_id(&run)?;
    let fields = page::FormFields::parse(&body).into_map();
    let mut client = console.pool.get().await?;
    if fields.get("stop").is_some_and(|v| v == "1") {
        let stopped = match console
            .replays
            .running
            .lock()
            .expect("not poisoned")
            .get(&run)
        {
            Some(here) => {
                here.trigger.trigger();
                true
            }
            None => false,
        };
        if !stopped {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "replay_not_running",
                format!("run {run} is not running in this process"),
            ));
        }
        super::audit::record(
            &**client,
            &ctx,
            "replay-stop",
            &format!("run {run}"),
            json!({}),
            "stopping",
        )
        .await?;
        return Ok(Redirect::to(&format!("{}/replays/{run}", ctx.base)).into_response());
    }
    let mut resume = HashMap::new();
    resume.insert("resume".to_string(), run.to_string());
    let args = arguments(&resume, &console.replays.mail_args)?;
    let _launching = console.replays.launching.lock().await;
    let plan = crate::cli::replay::plan(&client, &args)
        .await
        .map_err(|e| Failure::new(StatusCode::CONFLICT, "cannot_resume", format!("{e:#}")))?;
    launch(&console, &ctx, &mut client, &args, plan).await?;
    Ok(Redirect::to(&format!("{}/replays/{run}", ctx.base)).into_response())
}
