//! `groups list|describe`, shaped like `kafka-consumer-groups`.

use std::io::Write;

use clap::Subcommand;

use chrono::{DateTime, Utc};

use super::output::{self, or_dash, Output, Table};
use super::parse;
use crate::group::admin::{self, ResetTo};

#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// List consumer groups.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// State, members, and per partition: committed offset, log end offset, lag, owner.
    Describe {
        /// The consumer group (e.g. mail-service).
        group: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Move an inactive group's committed offsets (kafka-consumer-groups
    /// --reset-offsets). A dry run unless --execute. For mail-service the
    /// delivery ledger still keeps a rewound group from mailing an order
    /// twice: to send mails again, use `outbox-relay replay`.
    #[command(name = "reset-offsets")]
    ResetOffsets(ResetArgs),
    /// Remove an inactive group's offsets and memberships (its delivery
    /// ledger and dead letters stay).
    Delete {
        /// The consumer group.
        group: String,
    },
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
#[command(group(clap::ArgGroup::new("scope").required(true).multiple(false)))]
pub struct ResetArgs {
    /// The consumer group (inactive: no live members).
    pub group: String,
    /// The topic, or topic:partition,partition for some of its partitions.
    #[arg(long, group = "scope", value_parser = parse::topic_partitions)]
    pub topic: Option<(String, Option<Vec<i32>>)>,
    /// Every topic the group has offsets for.
    #[arg(long, group = "scope")]
    pub all_topics: bool,
    /// To the log start offset.
    #[arg(long, group = "target")]
    pub to_earliest: bool,
    /// To the log end offset.
    #[arg(long, group = "target")]
    pub to_latest: bool,
    /// To this offset (clamped into the retained log).
    #[arg(long, group = "target", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i64).range(0..))]
    pub to_offset: Option<i64>,
    /// To the first offset created at or after this time (YYYY-MM-DDTHH:mm:SS.sss,
    /// UTC without a zone; or RFC 3339); the log end when there is none.
    #[arg(long, group = "target", value_parser = parse::datetime)]
    pub to_datetime: Option<DateTime<Utc>>,
    /// To the first offset created at or after now minus this ISO 8601 duration (P30D, PT12H).
    #[arg(long, group = "target", value_parser = parse::iso_duration)]
    pub by_duration: Option<std::time::Duration>,
    /// Move the committed offset by this many (negative: back), clamped.
    #[arg(long, group = "target", allow_negative_numbers = true)]
    pub shift_by: Option<i64>,
    /// Only show what would change (the default).
    #[arg(long, conflicts_with = "execute")]
    pub dry_run: bool,
    /// Apply the change.
    #[arg(long)]
    pub execute: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(
    url: &str,
    cmd: &GroupsCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let mut client = crate::db::connect(url).await?;
    match cmd {
        GroupsCommand::ResetOffsets(args) => reset_offsets(&mut client, args, out).await,
        GroupsCommand::Delete { group } => {
            let partitions = admin::delete_group(&mut client, group).await?;
            writeln!(
                out,
                "deleted group {group} ({partitions} partition offsets)"
            )?;
            Ok(())
        }
        GroupsCommand::List { output } => {
            let groups = crate::group::admin::list_groups(&client).await?;
            if groups.is_empty() && *output == Output::Table {
                // On stderr: a script reading names gets none.
                super::tell(format_args!("no consumer groups"));
                return Ok(());
            }
            output::print(out, *output, &groups, |groups| {
                groups.iter().map(|g| format!("{g}\n")).collect()
            })
        }
        GroupsCommand::Describe { group, output } => {
            let described = crate::group::admin::describe(&client, group)
                .await?
                .ok_or_else(|| anyhow::anyhow!("consumer group {group:?} does not exist"))?;
            output::print(out, *output, &described, |d| {
                let mut text = String::new();
                if d.members.is_empty() {
                    text.push_str(&format!(
                        "Consumer group '{group}' has no active members.\n\n"
                    ));
                }
                let mut partitions = Table::new(&[
                    "GROUP",
                    "TOPIC",
                    ">PARTITION",
                    ">CURRENT-OFFSET",
                    ">LOG-END-OFFSET",
                    ">LAG",
                    "CONSUMER-ID",
                    "HOST",
                ]);
                for p in &d.partitions {
                    let host = p
                        .owner
                        .as_ref()
                        .and_then(|o| d.members.iter().find(|m| &m.member_id == o))
                        .map(|m| m.host.clone());
                    partitions.row(vec![
                        d.group.clone(),
                        p.topic.clone(),
                        p.partition.to_string(),
                        or_dash(p.committed_offset),
                        p.log_end_offset.to_string(),
                        or_dash(p.lag),
                        or_dash(p.owner.clone()),
                        or_dash(host),
                    ]);
                }
                text.push_str(&partitions.render());
                text.push_str(&format!(
                    "\nstate: {}, {} members\n",
                    d.state,
                    d.members.len()
                ));
                if !d.members.is_empty() {
                    let mut members = Table::new(&[
                        "CONSUMER-ID",
                        "HOST",
                        "CLIENT-ID",
                        "LAST-HEARTBEAT",
                        "PARTITIONS",
                    ]);
                    for m in &d.members {
                        members.row(vec![
                            m.member_id.clone(),
                            m.host.clone(),
                            m.client_id.clone(),
                            m.last_heartbeat
                                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                            m.partitions.join(","),
                        ]);
                    }
                    text.push('\n');
                    text.push_str(&members.render());
                }
                text
            })
        }
    }
}

async fn reset_offsets(
    client: &mut tokio_postgres::Client,
    args: &ResetArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let to = if args.to_earliest {
        ResetTo::Earliest
    } else if args.to_latest {
        ResetTo::Latest
    } else if let Some(offset) = args.to_offset {
        ResetTo::Offset(offset)
    } else if let Some(time) = args.to_datetime {
        ResetTo::Datetime(time)
    } else if let Some(back) = args.by_duration {
        ResetTo::Datetime(Utc::now() - chrono::Duration::from_std(back)?)
    } else if let Some(n) = args.shift_by {
        ResetTo::ShiftBy(n)
    } else {
        unreachable!("clap requires one target")
    };
    let scopes: Vec<(String, Option<Vec<i32>>)> = match &args.topic {
        Some(scope) => vec![scope.clone()],
        None => admin::group_topics(&*client, &args.group)
            .await?
            .into_iter()
            .map(|t| (t, None))
            .collect(),
    };
    if scopes.is_empty() {
        anyhow::bail!(
            "consumer group {:?} has no offsets on any topic",
            args.group
        );
    }
    let mut planned = Vec::new();
    for (topic, only) in &scopes {
        planned
            .extend(admin::plan_reset(&*client, &args.group, topic, only.as_deref(), &to).await?);
    }
    // Like Kafka's tool, a dry run still says when the group is active.
    let members = admin::has_live_members(&*client, &args.group).await?;
    if args.execute {
        admin::execute_reset(client, &args.group, &planned).await?;
    }
    output::print(out, args.output, &planned, |planned| {
        let mut table = Table::new(&[
            "GROUP",
            "TOPIC",
            ">PARTITION",
            ">CURRENT-OFFSET",
            ">NEW-OFFSET",
        ]);
        for p in planned {
            table.row(vec![
                args.group.clone(),
                p.topic.clone(),
                p.partition.to_string(),
                or_dash(p.current_offset),
                p.new_offset.to_string(),
            ]);
        }
        let mut text = table.render();
        if !args.execute {
            text.push_str("\n(dry run: nothing changed; add --execute to apply)\n");
            if members > 0 {
                text.push_str(&format!(
                    "note: the group has {members} live members; --execute would be refused until they stop\n"
                ));
            }
        }
        text
    })
}
