//! `demo`: the whole pipeline in one process; places sample orders through
//! the API, shows them in the log and waits for their mails.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use super::serve::MailArgs;
use super::{Cli, Database};
use crate::app::order::ORDER_CREATED_TOPIC;
use crate::builder::{bind, Application, Settings};
use crate::log;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Address of the HTTP API.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Number of sample orders to place (1 to 1000).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub orders: u32,
    /// Exit after showing the sample orders instead of serving until Ctrl-C.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub mail: MailArgs,
    #[command(flatten)]
    pub console: super::serve::ConsoleArgs,
}

/// Records listed one per line; the rest are summarised per partition.
const RECORDS_SHOWN: usize = 10;

/// Every role, checked and bound, before anything starts.
pub fn settings(args: &DemoArgs, data_dir: &Path) -> anyhow::Result<Settings> {
    Ok(Settings {
        mail: Some(args.mail.settings(data_dir)?),
        api: Some(bind(args.http_addr)?),
        relay: Some((Duration::from_secs(3), crate::relay::DEFAULT_GATHER)),
        console: Some(args.console.settings(&args.mail, data_dir)?),
        ..Settings::default()
    })
}

pub async fn run(
    db: &Database,
    args: &DemoArgs,
    settings: Settings,
    cli: &Cli,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let url = db.url.as_str();
    let addr = settings.api_addr().context("the demo has no API")?;
    let mail_target = settings
        .mail
        .as_ref()
        .map(|m| m.target.to_string())
        .unwrap_or_default();
    let application = Application::start(settings, url).await?;
    let placed = place_sample_orders(addr, args.orders).await?;
    writeln!(
        out,
        "placed {} sample orders (order ids {}–{})",
        placed.len(),
        placed.first().copied().unwrap_or_default(),
        placed.last().copied().unwrap_or_default()
    )?;

    // Wait (with a deadline) until the relay moved them into the log.
    let client = crate::db::connect(url).await?;
    let ids: Vec<String> = placed.iter().map(|id| id.to_string()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let records = loop {
        let mut records = log::read::records_with_keys(&client, ORDER_CREATED_TOPIC, &ids).await?;
        if records.len() == ids.len() {
            records.sort_by_key(|r| r.key.as_deref().and_then(|k| k.parse::<i64>().ok()));
            break records;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the relay did not move the sample orders into the log within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    writeln!(out, "\nin the event log (topic {ORDER_CREATED_TOPIC}):")?;
    let mut per_partition: BTreeMap<i32, usize> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        *per_partition.entry(r.partition).or_default() += 1;
        if i < RECORDS_SHOWN {
            writeln!(
                out,
                "  partition {} offset {} key {}  {}",
                r.partition,
                r.offset,
                r.key.as_deref().unwrap_or("-"),
                r.payload
            )?;
        }
    }
    if records.len() > RECORDS_SHOWN {
        let spread: Vec<String> = per_partition
            .iter()
            .map(|(p, n)| format!("{p}: {n}"))
            .collect();
        writeln!(
            out,
            "  … {} more; records per partition: {}",
            records.len() - RECORDS_SHOWN,
            spread.join(", ")
        )?;
    }

    // And until the mail worker delivered their confirmations.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let sent = crate::app::mail::sent_count_for_keys(&client, &ids).await?;
        if sent == ids.len() as i64 {
            writeln!(out, "\n{sent} confirmation mails sent to {mail_target}")?;
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the mail worker sent {sent} of the {} sample confirmations within 60 s",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let command = command_prefix(cli, db);
    // With --no-wait the API is gone when this is read: only what works
    // without it (the commands start the database they need).
    if args.no_wait {
        writeln!(out, "\nwhere to look:")?;
    } else {
        writeln!(out, "\nwhere to look (while the demo runs):")?;
        writeln!(
            out,
            "  curl -s -X POST http://{addr}/orders -H 'content-type: application/json' \\"
        )?;
        writeln!(
            out,
            "       -d '{{\"user_id\": 1, \"email\": \"ada@example.com\", \"amount\": 4200}}'"
        )?;
        writeln!(
            out,
            "  curl -s http://{addr}/orders/{}        # the order and its mail's state",
            placed[0]
        )?;
    }
    writeln!(out, "  {command} topics describe order-created")?;
    writeln!(out, "  {command} tail order-created --last 3")?;
    writeln!(out, "  {command} groups describe mail-service")?;
    writeln!(out, "  {command} relay status")?;
    if db.is_embedded() && args.mail.smtp_url.is_none() {
        let dir = std::path::absolute(cli.data_dir().join("mail"))?;
        writeln!(
            out,
            "  ls {}/order-{}.*.eml      # an order's mail, by order id",
            dir.display(),
            placed[0]
        )?;
    }
    if args.no_wait {
        return application.stop().await;
    }
    let console = match args.console.console_addr {
        Some(console) => format!("http://{console}/console/"),
        None => format!("http://{addr}/console/"),
    };
    writeln!(
        out,
        "\nthe console: {console}  (did order {}'s mail go out? type its id there)",
        placed[0]
    )?;
    writeln!(out, "serving on http://{addr}; Ctrl-C to stop")?;
    out.flush()?;
    application.run_until_signal().await
}

/// How to run this binary again from this directory: `outbox-relay` when
/// that is this binary on PATH, else its full path (after `cargo run` it is
/// not on PATH); plus the flags that pick the same database.
fn command_prefix(cli: &Cli, db: &Database) -> String {
    let exe = std::env::current_exe().ok();
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let candidate = dir.join("outbox-relay");
            candidate.is_file()
                && candidate.canonicalize().ok() == exe.as_ref().and_then(|e| e.canonicalize().ok())
        })
    });
    let mut command = match (&exe, on_path) {
        (Some(exe), false) => exe.display().to_string(),
        _ => "outbox-relay".to_string(),
    };
    if db.is_embedded() {
        if let Some(dir) = &cli.data_dir {
            let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
            command.push_str(&format!(" --data-dir {}", dir.display()));
        }
    } else if std::env::var_os("DATABASE_URL").is_none() {
        command.push_str(" --database-url '…'");
    }
    command
}

/// Places sample orders through the API itself, as a client would; shows
/// progress on a terminal.
async fn place_sample_orders(addr: SocketAddr, count: u32) -> anyhow::Result<Vec<i64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let progress = std::io::stderr().is_terminal() && count > 20;
    let mut ids = Vec::new();
    for i in 1..=count {
        let body = serde_json::json!({
            "user_id": i,
            "email": format!("customer{i}@example.com"),
            "amount": 1000 * i as i64 + 99,
        })
        .to_string();
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "POST /orders HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let json_body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(json_body)
            .with_context(|| format!("unexpected API answer: {response}"))?;
        let id = value["order_id"]
            .as_i64()
            .with_context(|| format!("unexpected API answer: {response}"))?;
        ids.push(id);
        if progress && (i % 50 == 0 || i == count) {
            let end = if i == count { "\n" } else { "" };
            let _ = write!(
                std::io::stderr(),
                "\rplacing sample orders: {i}/{count}{end}"
            );
        }
    }
    Ok(ids)
}
