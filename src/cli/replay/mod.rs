//! `replay`: mail a range of `order-created` again (or send it to a webhook
//! sink, `--sink`), under a run of its own (plan first, progress, Ctrl-C to
//! stop, `--resume` or the same command to go on); `replay list|describe`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde_json::json;

use super::output::{self, or_dash, Output, Table};
use super::parse::{self, PartitionOffsetsArg};
use crate::app::mail::MailSettings;
use crate::app::replay::{self, Finish, Progress};
use crate::log::ranges::PartitionRange;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ReplayCommand {
    #[command(subcommand)]
    pub list_or_describe: Option<RunsCommand>,
    #[command(flatten)]
    pub args: ReplayArgs,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Replay runs with their plan, progress and state.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// One run: per partition its range and cursor, its dead letters, the
    /// events in doubt.
    Describe {
        /// The run's id.
        run: i64,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("start").multiple(false).required(true)))]
pub struct ReplayArgs {
    /// The topic to replay.
    #[arg(long, default_value = crate::app::order::ORDER_CREATED_TOPIC)]
    pub topic: String,
    /// From the first record created at or after this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long, group = "start", value_parser = parse::time)]
    pub from: Option<DateTime<Utc>>,
    /// Up to (not including) the first record created at or after this time;
    /// default: the log end when the replay starts.
    #[arg(long, requires = "from", value_parser = parse::time)]
    pub to: Option<DateTime<Utc>>,
    /// From these offsets: P:O,P:O (those partitions) or one offset for all.
    #[arg(long, group = "start", value_parser = parse::partition_offsets)]
    pub from_offset: Option<PartitionOffsetsArg>,
    /// Up to (not including) these offsets: P:O,P:O or one for all; default:
    /// the log end when the replay starts.
    #[arg(long, requires = "from_offset", value_parser = parse::partition_offsets)]
    pub to_offset: Option<PartitionOffsetsArg>,
    /// Only these partitions (0,3,5).
    #[arg(long, value_parser = parse_partitions)]
    pub partitions: Option<Partitions>,
    /// At most this many mails per second (so a month of mail does not flood the SMTP server).
    #[arg(long, value_parser = parse_rate)]
    pub max_rate: Option<f64>,
    /// Print the plan and send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Resume this run (its own bounds; --from and the like are not needed).
    #[arg(long, group = "start")]
    pub resume: Option<i64>,
    /// Start a new run even if an unfinished run of the same command exists.
    #[arg(long, conflicts_with = "resume")]
    pub new: bool,
    /// Also send the events that were in flight when the run last stopped
    /// (they may have gone out already).
    #[arg(long)]
    pub resend_in_doubt: bool,
    /// Send the events to this webhook sink instead of mailing them: a
    /// name configured as for `serve --roles webhook` (WEBHOOK_<NAME>_URL,
    /// _SECRET, _TOPICS, _TIMEOUT_SECS); the sink must take the topic.
    /// Each replayed request has a webhook-id of its own and the run's id
    /// in outbox-relay-replay.
    #[arg(long, value_name = "NAME")]
    pub sink: Option<String>,
    /// Where mails go (as for serve); unset: .eml files in <data-dir>/mail.
    #[arg(long, env = "SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// Sender address of the mails.
    #[arg(long, env = "MAIL_FROM", default_value = "shop@example.com")]
    pub mail_from: String,
    /// Currency of the order amounts (ISO 4217; as for serve).
    #[arg(long, env = "MAIL_CURRENCY", default_value = crate::app::mail::Currency::DEFAULT,
          value_parser = crate::app::mail::Currency::parse)]
    pub mail_currency: crate::app::mail::Currency,
    /// SMTP connections kept open (1 to 1000).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub smtp_pool_size: u32,
    /// Seconds to wait at each SMTP step before the message (0.1 to 600).
    #[arg(long, default_value = "15", value_parser = parse::smtp_timeout)]
    pub smtp_timeout_secs: Duration,
    /// Seconds to wait for the final answer once the message was sent (RFC
    /// 5321: 10 minutes); past it the event's outcome is unknown, and the
    /// run does not send it again (0.1 to 3600).
    #[arg(long, default_value = "600", value_parser = parse::smtp_final_reply_timeout)]
    pub smtp_final_reply_timeout_secs: Duration,
    /// How long a mail that did not go out is retried: 90s, 15m, 1h.
    #[arg(long, default_value = "10m", value_parser = parse::retry_for)]
    pub retry_for: Duration,
    /// Output format of the plan and the summary.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `--partitions 0,3,5` (one value holding a list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions(pub Vec<i32>);

fn parse_partitions(s: &str) -> Result<Partitions, String> {
    parse::partition_list(s).map(Partitions)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r > 0.0 && *r <= 1_000_000.0)
        .ok_or_else(|| format!("{s:?} is not a rate in mails per second (more than 0)"))
}

/// `replay`'s arguments on their own (the console parses its form into them).
#[derive(Debug, clap::Parser)]
#[command(name = "replay", no_binary_name = true)]
pub struct ReplayArgsOnly {
    #[command(flatten)]
    pub args: ReplayArgs,
}

/// Checked before anything starts (the database included).
pub fn check(cmd: &ReplayCommand, data_dir: &std::path::Path) -> anyhow::Result<()> {
    if cmd.list_or_describe.is_none() && !cmd.args.dry_run {
        match &cmd.args.sink {
            Some(name) => {
                sink_settings(name)?;
            }
            None => {
                MailSettings::new(cmd.args.smtp_url.as_deref(), &cmd.args.mail_from, data_dir)?;
            }
        }
    }
    Ok(())
}

mod start;
use start::sink_settings;
pub use start::{plan, start, Plan, Running};

pub async fn run(
    url: &str,
    cmd: &ReplayCommand,
    data_dir: &std::path::Path,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let mut client = crate::db::connect(url).await?;
    match &cmd.list_or_describe {
        Some(RunsCommand::List { output }) => {
            let runs = replay::list_runs(&client).await?;
            return output::print(out, *output, &runs, |runs| {
                let mut table = Table::new(&[
                    ">RUN",
                    "TOPIC",
                    "STATE",
                    ">TOTAL",
                    ">SENT",
                    ">FAILED",
                    ">UNKNOWN",
                    ">IN-DOUBT",
                    "CREATED",
                    "BOUNDS",
                ]);
                for r in runs {
                    table.row(vec![
                        r.id.to_string(),
                        r.topic.clone(),
                        r.state.clone(),
                        r.total.to_string(),
                        r.sent.to_string(),
                        r.failed.to_string(),
                        r.unknown.to_string(),
                        r.in_doubt.to_string(),
                        r.created_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        r.request.to_string(),
                    ]);
                }
                table.render()
            });
        }
        Some(RunsCommand::Describe { run, output }) => {
            let described = replay::describe_run(&client, *run).await?;
            return output::print(out, *output, &described, |d| {
                let r = &d.run;
                let mut text = format!(
                    "Run: {}\tTopic: {}\tState: {}\tBounds: {}\n\
                     Total: {}\tSent: {}\tFailed: {}\tUnknown: {}\tInDoubt: {}\n\n",
                    r.id,
                    r.topic,
                    r.state,
                    r.request,
                    r.total,
                    r.sent,
                    r.failed,
                    r.unknown,
                    r.in_doubt
                );
                let mut table = Table::new(&[">PARTITION", ">FROM", ">TO", ">NEXT", ">LEFT"]);
                for p in &d.partitions {
                    table.row(vec![
                        p.partition.to_string(),
                        p.from_offset.to_string(),
                        p.to_offset.to_string(),
                        p.next_offset.to_string(),
                        (p.to_offset - p.next_offset).max(0).to_string(),
                    ]);
                }
                text.push_str(&table.render());
                if !d.dead_letters.is_empty() {
                    let mut letters =
                        Table::new(&[">PARTITION", ">OFFSET", ">ATTEMPTS", "REASON", "LAST-ERROR"]);
                    for l in &d.dead_letters {
                        letters.row(vec![
                            l.partition.to_string(),
                            l.offset.to_string(),
                            l.attempts.to_string(),
                            or_dash(l.reason.clone()),
                            or_dash(
                                l.last_error
                                    .as_deref()
                                    .map(|e| e.split_whitespace().collect::<Vec<_>>().join(" ")),
                            ),
                        ]);
                    }
                    text.push_str("\ndead letters of this run:\n");
                    text.push_str(&letters.render());
                }
                if !d.in_doubt_events.is_empty() {
                    text.push_str(&format!(
                        "\nin doubt (in flight when the run stopped; not sent again unless --resend-in-doubt): {:?}\n",
                        d.in_doubt_events
                    ));
                }
                text
            });
        }
        None => {}
    }

    let args = &cmd.args;
    let plan = plan(&client, args).await?;
    print_plan(out, args.output, plan.run_id, &plan.ranges, plan.total)?;
    if args.dry_run {
        if args.output == Output::Table {
            writeln!(out, "(dry run: nothing sent)")?;
        }
        return Ok(());
    }
    if let (Some(id), None) = (plan.run_id, args.resume) {
        super::tell(format_args!(
            "resuming unfinished run {id} of the same command (--new starts another)"
        ));
    }
    let total = plan.total;
    let started = Instant::now();
    let run = start(&mut client, url, args, plan, data_dir).await?;
    drop(client);
    let (run_id, progress, trigger) = (run.run_id, run.progress.clone(), run.trigger);
    let display = spawn_progress(run_id, total.max(0) as u64, progress.clone());
    let replaying = run.finish;
    tokio::pin!(replaying);
    let finish = tokio::select! {
        finish = &mut replaying => finish,
        _ = crate::shutdown::signal() => {
            super::tell(format_args!(
                "\nstopping: letting the mails in flight finish…"
            ));
            trigger.trigger();
            replaying.await
        }
    };
    display.abort();
    let finish = finish??;
    let elapsed = started.elapsed();
    let sent = progress.sent.load(Ordering::Relaxed);
    let summary = json!({
        "run_id": run_id,
        "state": if finish == Finish::Done { "done" } else { "interrupted" },
        "total": total,
        "sent": sent,
        "failed": progress.failed.load(Ordering::Relaxed),
        "unknown": progress.unknown.load(Ordering::Relaxed),
        "in_doubt": progress.in_doubt.load(Ordering::Relaxed),
        "already_done": progress.already.load(Ordering::Relaxed),
        "reread_on_resume": progress.reread.load(Ordering::Relaxed),
        "outside_time_range": progress.outside.load(Ordering::Relaxed),
        "elapsed_seconds": elapsed.as_secs_f64(),
        "mails_per_second": sent as f64 / elapsed.as_secs_f64().max(0.001),
    });
    output::print(out, args.output, &summary, |s| {
        let mut text = format!(
            "\nrun {run_id} {}: sent {}, failed {}, unknown {}, in doubt {}, done before {}, created outside the time range {}; {:.1} s, {:.0} mails/s\n",
            s["state"].as_str().unwrap_or_default(),
            s["sent"],
            s["failed"],
            s["unknown"],
            s["in_doubt"],
            s["already_done"],
            s["outside_time_range"],
            elapsed.as_secs_f64(),
            s["mails_per_second"].as_f64().unwrap_or_default()
        );
        if finish == Finish::Interrupted {
            text.push_str(&format!(
                "resume with: outbox-relay replay --resume {run_id}\n"
            ));
        }
        if s["failed"].as_u64().unwrap_or(0) + s["unknown"].as_u64().unwrap_or(0) > 0 {
            text.push_str(&format!(
                "its dead letters: outbox-relay replay describe {run_id}\n"
            ));
        }
        text
    })
}

fn print_plan(
    out: &mut (dyn Write + Send),
    output: Output,
    run_id: Option<i64>,
    ranges: &[PartitionRange],
    total: i64,
) -> anyhow::Result<()> {
    let plan = json!({ "run_id": run_id, "partitions": ranges, "total": total });
    output::print(out, output, &plan, |_| {
        let mut table = Table::new(&[">PARTITION", ">FROM", ">TO", ">COUNT"]);
        for r in ranges {
            table.row(vec![
                r.partition.to_string(),
                r.from.to_string(),
                r.to.to_string(),
                r.count().to_string(),
            ]);
        }
        table.row(vec![
            "total".into(),
            String::new(),
            String::new(),
            total.to_string(),
        ]);
        format!(
            "replay plan{} (offsets [from, to); with a time range, records created outside it are skipped):\n{}",
            run_id.map(|id| format!(" (run {id})")).unwrap_or_default(),
            table.render()
        )
    })?;
    out.flush()?;
    Ok(())
}

/// A progress bar on a terminal; a plain line every 5 s otherwise.
fn spawn_progress(run_id: i64, total: u64, progress: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "replay {msg} [{bar:40}] {pos}/{len} {per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(format!("run {run_id}"));
            loop {
                bar.set_position(progress.done().min(total));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let done = progress.done();
            let rate =
                progress.sent.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
            let eta = if rate > 0.0 {
                format!("{:.0} s", total.saturating_sub(done) as f64 / rate)
            } else {
                "-".into()
            };
            super::tell(format_args!(
                "replay run {run_id}: {done}/{total} ({:.0}%), {rate:.0} mails/s, ETA {eta}",
                100.0 * done as f64 / total.max(1) as f64
            ));
        }
    })
}
