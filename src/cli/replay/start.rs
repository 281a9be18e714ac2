//! A replay's plan and its start, shared by `replay` and the console:
//! where it sends (mail or a webhook sink), the bounds as ranges, the run
//! created (or found again) and started on a task of its own.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use serde_json::json;

use super::parse::PartitionOffsetsArg;
use super::ReplayArgs;
use crate::app::mail::{Limits, MailReplay, MailSettings, RetryPolicy};
use crate::app::replay::{self, Finish, Progress, ReplaySettings};
use crate::app::webhook::{SinkSettings, WebhookSink};
use crate::log::ranges::{Bound, Bounds, PartitionRange};

/// The webhook sink `name`, from its WEBHOOK_<NAME>_… variables.
pub(super) fn sink_settings(name: &str) -> anyhow::Result<SinkSettings> {
    let mut sinks = SinkSettings::from_env(name, |var| std::env::var(var).ok())?;
    anyhow::ensure!(sinks.len() == 1, "--sink takes one sink name");
    Ok(sinks.remove(0))
}

/// Where a run sends its events.
enum Target {
    Mail(MailReplay),
    Webhook(WebhookSink),
}

impl Target {
    fn new(
        args: &ReplayArgs,
        sink: Option<&str>,
        topic: &str,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Target> {
        if let Some(name) = sink {
            let settings = sink_settings(name)?;
            anyhow::ensure!(
                settings.topics.iter().any(|t| t == topic),
                "webhook sink {name} does not take topic {topic:?} (its topics: {})",
                settings.topics.join(",")
            );
            return Ok(Target::Webhook(WebhookSink::new(&settings)?));
        }
        let mut mail = MailSettings::new(args.smtp_url.as_deref(), &args.mail_from, data_dir)?;
        mail.letterhead.currency = args.mail_currency.clone();
        Ok(Target::Mail(MailReplay {
            transport: mail.target.transport(
                args.smtp_pool_size,
                Limits {
                    command: args.smtp_timeout_secs,
                    final_reply: args.smtp_final_reply_timeout_secs,
                },
            )?,
            letterhead: mail.letterhead.clone(),
        }))
    }
}

/// A replay about to run: its run (an unfinished one of the same command,
/// or the one resumed; None: a new one), its ranges, where it sends.
pub struct Plan {
    pub run_id: Option<i64>,
    pub topic: String,
    pub sink: Option<String>,
    pub ranges: Vec<PartitionRange>,
    pub total: i64,
}

/// Plans `args`: a resumed run's own ranges, or the bounds' ranges read
/// from the partition heads now (what `--dry-run` prints; the console's
/// preview).
pub async fn plan(client: &tokio_postgres::Client, args: &ReplayArgs) -> anyhow::Result<Plan> {
    let mut topic = args.topic.clone();
    let mut sink = args.sink.clone();
    let (run_id, ranges) = match args.resume {
        Some(id) => {
            let described = replay::describe_run(client, id).await?;
            // A run goes on where it went, and with its topic.
            let run_sink = described.run.request["sink"].as_str().map(str::to_string);
            if args.sink.is_some() && args.sink != run_sink {
                bail!(
                    "replay run {id} sends to {}, not to --sink {}",
                    run_sink.map_or("mail".to_string(), |s| format!("webhook sink {s}")),
                    args.sink.as_deref().unwrap_or_default()
                );
            }
            sink = run_sink;
            topic = described.run.topic.clone();
            if described.run.state == "done" && !args.resend_in_doubt {
                bail!(
                    "replay run {id} is done: nothing to resume (--resend-in-doubt sends its {} events in doubt)",
                    described.run.in_doubt
                );
            }
            let ranges = described
                .partitions
                .iter()
                .map(|p| PartitionRange {
                    partition: p.partition,
                    from: p.from_offset,
                    to: p.to_offset,
                    log_start_offset: p.from_offset,
                    log_end_offset: p.to_offset,
                })
                .collect();
            (Some(id), ranges)
        }
        None => {
            let (from, to) = bounds(args)?;
            let started = Instant::now();
            let ranges = crate::log::ranges::plan(
                client,
                &args.topic,
                args.partitions.as_ref().map(|p| p.0.as_slice()),
                &from,
                &to,
            )
            .await?;
            tracing::debug!(elapsed = ?started.elapsed(), "replay planned");
            let request = request(args);
            let unfinished = if args.new || args.dry_run {
                None
            } else {
                replay::find_unfinished(client, &args.topic, &request).await?
            };
            (unfinished, ranges)
        }
    };
    let total = ranges.iter().map(PartitionRange::count).sum();
    Ok(Plan {
        run_id,
        topic,
        sink,
        ranges,
        total,
    })
}

/// A replay running on a task of its own.
pub struct Running {
    pub run_id: i64,
    pub progress: Arc<Progress>,
    /// Stops it (the mails in flight finish; resume later).
    pub trigger: crate::shutdown::ShutdownTrigger,
    pub finish: tokio::task::JoinHandle<anyhow::Result<Finish>>,
}

/// Creates the plan's run (unless it has one) and starts it on a task:
/// `replay`'s way, and the console's.
pub async fn start(
    client: &mut tokio_postgres::Client,
    url: &str,
    args: &ReplayArgs,
    plan: Plan,
    data_dir: &std::path::Path,
) -> anyhow::Result<Running> {
    // Where it sends, checked before a run is created.
    let target = Target::new(args, plan.sink.as_deref(), &plan.topic, data_dir)?;
    let run_id = match plan.run_id {
        Some(id) => id,
        None => replay::create_run(client, &args.topic, &request(args), &plan.ranges).await?,
    };
    let settings = ReplaySettings {
        retry: RetryPolicy {
            max_attempts: None,
            retry_for: args.retry_for,
            ..RetryPolicy::default()
        },
        max_rate: args.max_rate,
        resend_in_doubt: args.resend_in_doubt,
        window: 128,
    };
    let progress = Arc::new(Progress::default());
    let (trigger, shutdown) = crate::shutdown::channel();
    let url = url.to_string();
    let counters = progress.clone();
    let finish = tokio::spawn(async move {
        match target {
            Target::Mail(mail) => {
                replay::run(&url, run_id, Arc::new(mail), settings, counters, shutdown).await
            }
            Target::Webhook(sink) => {
                replay::run(&url, run_id, Arc::new(sink), settings, counters, shutdown).await
            }
        }
    });
    Ok(Running {
        run_id,
        progress,
        trigger,
        finish,
    })
}

/// The bounds of a new run.
fn bounds(args: &ReplayArgs) -> anyhow::Result<(Bounds, Bounds)> {
    if let (Some(from), Some(to)) = (args.from, args.to) {
        anyhow::ensure!(
            to > from,
            "--to {} is not after --from {}: the time range is empty",
            to.to_rfc3339(),
            from.to_rfc3339()
        );
    }
    let offsets = |arg: &PartitionOffsetsArg| match arg {
        PartitionOffsetsArg::All(o) => Bounds::All(Bound::Offset(*o)),
        PartitionOffsetsArg::PerPartition(listed) => Bounds::PerPartition(
            listed
                .iter()
                .map(|(p, o)| (*p, Bound::Offset(*o)))
                .collect(),
        ),
    };
    Ok(match (&args.from, &args.from_offset) {
        // A time range reads to the log end and skips what was created
        // outside it (CreateTime need not grow with the offset).
        (Some(from), None) => (Bounds::All(Bound::Time(*from)), Bounds::All(Bound::Latest)),
        (None, Some(from)) => (
            offsets(from),
            args.to_offset
                .as_ref()
                .map_or(Bounds::All(Bound::Latest), offsets),
        ),
        _ => bail!("give --from <time>, --from-offset <offsets> or --resume <run>"),
    })
}

/// The command's bounds, as a run records them (and finds its unfinished run by).
fn request(args: &ReplayArgs) -> serde_json::Value {
    let offsets = |arg: &Option<PartitionOffsetsArg>| match arg {
        None => serde_json::Value::Null,
        Some(PartitionOffsetsArg::All(o)) => json!(o),
        Some(PartitionOffsetsArg::PerPartition(listed)) => json!(listed),
    };
    json!({
        "from": args.from.map(|t| t.to_rfc3339()),
        "to": args.to.map(|t| t.to_rfc3339()),
        "from_offset": offsets(&args.from_offset),
        "to_offset": offsets(&args.to_offset),
        "partitions": args.partitions.as_ref().map(|p| &p.0),
        "sink": args.sink,
    })
}
