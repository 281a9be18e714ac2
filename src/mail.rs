//! The mail worker: consumes `order-created` as group `mail-service` and
//! sends each order's confirmation mail over SMTP (lettre, pooled).
//!
//! Delivery is at-least-once with one documented duplicate window
//! (invariant 8): a ledger row per (group, event) goes `pending` (written
//! once an attempt failed) → `sent` | `failed`, read before and written
//! after (never across) the SMTP exchange. An event
//! redelivered after a crash, rebalance or reset is not mailed again once
//! `sent`. A crash after the server accepted the mail and before the ledger
//! says `sent` sends it again on redelivery; its Message-ID is derived from
//! the event, so the duplicate is recognisable.
//!
//! Failures (invariant 9): transient ones (connection refused, timeouts,
//! 4xx) retry with exponential backoff and jitter, in the record's own
//! task, so other keys and partitions go on; permanent ones (5xx, a bad
//! address, an undecodable payload) or a spent retry budget park the event
//! as a dead letter and the partition moves on.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lettre::message::{header, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::{AsyncSmtpTransportBuilder, PoolConfig};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;

use crate::consumer::RecordHandler;
use crate::event_log::Record;
use crate::order::EmailAddress;

/// The consumer group the mail worker runs as.
pub const MAIL_GROUP: &str = "mail-service";

/// Where mails go.
#[derive(Clone)]
pub enum MailTransport {
    /// Plain SMTP through [`PlainSmtpPool`] (TCP_NODELAY set).
    Plain(Arc<PlainSmtpPool>),
    /// TLS (STARTTLS or implicit) through lettre's pooled transport.
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    /// `.eml` files in a directory: the embedded default.
    Files(PathBuf),
}

/// An `SMTP_URL`, parsed; `Display` never shows credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmtpTarget {
    Plain {
        host: String,
        port: u16,
    },
    StartTls {
        host: String,
        port: u16,
        credentials: Option<(String, String)>,
    },
    ImplicitTls {
        host: String,
        port: u16,
        credentials: Option<(String, String)>,
    },
    Files {
        dir: PathBuf,
    },
}

impl std::fmt::Display for SmtpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SmtpTarget::Plain { host, port } => write!(f, "smtp://{host}:{port}"),
            SmtpTarget::StartTls { host, port, .. } => write!(f, "smtp+starttls://{host}:{port}"),
            SmtpTarget::ImplicitTls { host, port, .. } => write!(f, "smtps://{host}:{port}"),
            SmtpTarget::Files { dir } => write!(f, "file://{}", dir.display()),
        }
    }
}

impl SmtpTarget {
    /// `smtp://host:port`, `smtp+starttls://user:pass@host:587`,
    /// `smtps://user:pass@host:465` or `file:///dir`.
    pub fn parse(input: &str) -> anyhow::Result<SmtpTarget> {
        // Never echo the input: it may hold a password.
        let url = url::Url::parse(input)
            .map_err(|e| anyhow::anyhow!("SMTP_URL is not a valid URL ({e})"))?;
        let host = || -> anyhow::Result<String> {
            url.host_str()
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .context("SMTP_URL has no host")
        };
        let credentials = || -> anyhow::Result<Option<(String, String)>> {
            if url.username().is_empty() {
                return Ok(None);
            }
            let decode = |s: &str| {
                percent_decode(s)
                    .context("SMTP_URL credentials are not valid percent-encoded UTF-8")
            };
            Ok(Some((
                decode(url.username())?,
                decode(url.password().unwrap_or(""))?,
            )))
        };
        Ok(match url.scheme() {
            "smtp" => SmtpTarget::Plain {
                host: host()?,
                port: url.port().unwrap_or(25),
            },
            "smtp+starttls" => SmtpTarget::StartTls {
                host: host()?,
                port: url.port().unwrap_or(587),
                credentials: credentials()?,
            },
            "smtps" => SmtpTarget::ImplicitTls {
                host: host()?,
                port: url.port().unwrap_or(465),
                credentials: credentials()?,
            },
            "file" => SmtpTarget::Files {
                dir: url
                    .to_file_path()
                    .map_err(|_| anyhow::anyhow!("SMTP_URL file:// needs an absolute path"))?,
            },
            other => {
                bail!("SMTP_URL scheme {other:?} is not one of smtp, smtp+starttls, smtps, file")
            }
        })
    }

    /// Builds the transport; SMTP transports keep a pool of `pool_size`
    /// connections and give up on an exchange after `timeout`.
    pub fn transport(&self, pool_size: u32, timeout: Duration) -> anyhow::Result<MailTransport> {
        let pool = PoolConfig::new().max_size(pool_size.max(1));
        let plain_timeout = timeout;
        let timeout = Some(timeout);
        Ok(match self {
            SmtpTarget::Plain { host, port } => MailTransport::Plain(Arc::new(PlainSmtpPool {
                host: host.clone(),
                port: *port,
                timeout: plain_timeout,
                idle: Mutex::new(Vec::new()),
                permits: tokio::sync::Semaphore::new(pool_size.max(1) as usize),
            })),
            SmtpTarget::StartTls {
                host,
                port,
                credentials,
            } => MailTransport::Smtp(
                with_credentials(
                    AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)?,
                    credentials,
                )
                .port(*port)
                .timeout(timeout)
                .pool_config(pool)
                .build(),
            ),
            SmtpTarget::ImplicitTls {
                host,
                port,
                credentials,
            } => MailTransport::Smtp(
                with_credentials(
                    AsyncSmtpTransport::<Tokio1Executor>::relay(host)?,
                    credentials,
                )
                .port(*port)
                .timeout(timeout)
                .pool_config(pool)
                .build(),
            ),
            SmtpTarget::Files { dir } => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating mail directory {}", dir.display()))?;
                MailTransport::Files(dir.clone())
            }
        })
    }
}

fn with_credentials(
    builder: AsyncSmtpTransportBuilder,
    credentials: &Option<(String, String)>,
) -> AsyncSmtpTransportBuilder {
    match credentials {
        Some((user, pass)) => builder.credentials(Credentials::new(user.clone(), pass.clone())),
        None => builder,
    }
}

fn percent_decode(s: &str) -> anyhow::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])?;
            out.push(u8::from_str_radix(hex, 16)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8(out)?)
}

/// A pool of plain SMTP connections opened with TCP_NODELAY.
///
/// lettre 0.11.23 leaves Nagle's algorithm on: it writes a message body and
/// its terminating `.` in two writes, and the second waits for the server's
/// delayed ACK, 40 ms on Linux, for every mail (fixed upstream in lettre PR
/// 1159, not yet released). This pool opens the TCP connections itself,
/// sets TCP_NODELAY, and hands them to lettre's SMTP client; the protocol is
/// still all lettre's.
pub struct PlainSmtpPool {
    host: String,
    port: u16,
    timeout: Duration,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    permits: tokio::sync::Semaphore,
}

/// Idle connections older than this are closed rather than reused.
const MAX_IDLE: Duration = Duration::from_secs(30);
/// Idle connections older than this are probed (NOOP) before reuse.
const PROBE_AFTER_IDLE: Duration = Duration::from_secs(1);

impl PlainSmtpPool {
    async fn connect(&self) -> Result<AsyncSmtpConnection, String> {
        let stream = tokio::time::timeout(
            self.timeout,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| format!("connection failed: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let hello = ClientId::default();
        tokio::time::timeout(
            self.timeout,
            AsyncSmtpConnection::connect_with_transport(Box::new(stream), &hello),
        )
        .await
        .map_err(|_| "greeting timed out".to_string())?
        .map_err(|e| e.to_string())
    }

    async fn send(&self, message: &Message) -> SendOutcome {
        let Ok(_permit) = self.permits.acquire().await else {
            return SendOutcome::Transient("SMTP pool closed".into());
        };
        let mut connection = match self.checkout().await {
            Ok(connection) => connection,
            Err(e) => return SendOutcome::Transient(e),
        };
        let body = message.formatted();
        // Never retried here: once the body may have reached the server, only
        // the ledger decides whether to send again (after a backoff).
        let outcome =
            match tokio::time::timeout(self.timeout, connection.send(message.envelope(), &body))
                .await
            {
                Ok(Ok(_)) => {
                    self.idle
                        .lock()
                        .expect("pool lock")
                        .push((connection, Instant::now()));
                    return SendOutcome::Sent;
                }
                Ok(Err(e)) if e.is_permanent() => SendOutcome::Permanent(e.to_string()),
                Ok(Err(e)) => {
                    if !e.is_transient() {
                        // A network error: the server may have restarted; its
                        // other idle connections are as dead as this one.
                        self.idle.lock().expect("pool lock").clear();
                    }
                    SendOutcome::Transient(e.to_string())
                }
                // The server may or may not have accepted it: an unknown outcome,
                // retried like a transient failure (the documented duplicate window).
                Err(_) => SendOutcome::Transient("SMTP exchange timed out".into()),
            };
        // Closing politely must not hang on a server that stopped answering.
        let _ = tokio::time::timeout(Duration::from_secs(1), connection.abort()).await;
        outcome
    }

    /// An idle connection that still answers, or a new one. One idle for
    /// more than a second is probed with NOOP first (the server may have
    /// closed it); one used a moment ago is taken as it is, which keeps the
    /// probe's round trip off the busy path.
    async fn checkout(&self) -> Result<AsyncSmtpConnection, String> {
        loop {
            let idle = self.idle.lock().expect("pool lock").pop();
            let Some((mut connection, since)) = idle else {
                break;
            };
            let fresh = since.elapsed() < PROBE_AFTER_IDLE;
            if since.elapsed() < MAX_IDLE
                && !connection.has_broken()
                && (fresh
                    || tokio::time::timeout(self.timeout, connection.test_connected()).await
                        == Ok(true))
            {
                return Ok(connection);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), connection.abort()).await;
        }
        self.connect().await
    }
}

/// How a send attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    Sent,
    /// Worth retrying: connection refused, timeout, 4xx.
    Transient(String),
    /// Not worth retrying: 5xx, a refused recipient.
    Permanent(String),
}

impl MailTransport {
    /// Sends `message`. `name` names the mail for people (the file
    /// transport's file is `<name>.eml`); SMTP ignores it.
    pub async fn send(&self, message: Message, name: &str) -> SendOutcome {
        match self {
            MailTransport::Plain(pool) => pool.send(&message).await,
            MailTransport::Smtp(smtp) => match smtp.send(message).await {
                Ok(_) => SendOutcome::Sent,
                Err(e) if e.is_permanent() => SendOutcome::Permanent(e.to_string()),
                Err(e) => SendOutcome::Transient(e.to_string()),
            },
            MailTransport::Files(dir) => match write_eml(dir, name, &message).await {
                Ok(()) => SendOutcome::Sent,
                Err(e) => SendOutcome::Transient(format!("writing the .eml file: {e}")),
            },
        }
    }
}

/// Writes `<dir>/<name>.eml` whole or not at all (a temporary file renamed
/// into place), so a reader never sees half a mail.
async fn write_eml(dir: &std::path::Path, name: &str, message: &Message) -> std::io::Result<()> {
    let path = dir.join(format!("{name}.eml"));
    let partial = dir.join(format!(".{name}.eml.partial"));
    tokio::fs::write(&partial, message.formatted()).await?;
    tokio::fs::rename(&partial, &path).await
}

/// Every setting of the mail worker role, checked before anything starts.
#[derive(Debug, Clone)]
pub struct MailSettings {
    pub target: SmtpTarget,
    pub from: Mailbox,
    /// SMTP connections kept open.
    pub pool_size: u32,
    /// Longest SMTP exchange.
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Group session timeout (the heartbeat is a fifth of it, at most 1 s).
    pub session_timeout: Duration,
    pub offset_reset: crate::group::OffsetReset,
}

impl MailSettings {
    /// Checks `SMTP_URL` (unset: `.eml` files in `<data_dir>/mail`) and
    /// `MAIL_FROM`; the rest takes its defaults.
    pub fn new(
        smtp_url: Option<&str>,
        mail_from: &str,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<MailSettings> {
        let target = match smtp_url {
            Some(url) => SmtpTarget::parse(url)?,
            None => SmtpTarget::Files {
                dir: std::path::absolute(data_dir.join("mail"))?,
            },
        };
        let from: Mailbox = EmailAddress::parse(mail_from)
            .map_err(|e| anyhow::anyhow!("MAIL_FROM {mail_from:?} is not usable: {e}"))?
            .as_str()
            .parse()
            .with_context(|| format!("MAIL_FROM {mail_from:?}"))?;
        Ok(MailSettings {
            target,
            from,
            pool_size: 16,
            timeout: Duration::from_secs(15),
            retry: RetryPolicy::default(),
            session_timeout: Duration::from_secs(10),
            offset_reset: crate::group::OffsetReset::Earliest,
        })
    }

    /// The mail group's consumer settings.
    pub fn consumer_config(&self) -> crate::consumer::ConsumerConfig {
        let mut group =
            crate::group::GroupConfig::new(MAIL_GROUP, &[crate::order::ORDER_CREATED_TOPIC]);
        group.session_timeout = self.session_timeout;
        group.offset_reset = self.offset_reset;
        group.heartbeat_interval = (self.session_timeout / 5).min(Duration::from_secs(1));
        crate::consumer::ConsumerConfig::new(group)
    }
}

/// Retry schedule for transient failures.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts before the event is parked as a dead letter.
    pub max_attempts: i32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff before attempt `attempt + 1`, jittered to
    /// between half and all of the delay.
    pub fn backoff(&self, attempt: i32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.clamp(0, 20) as u32))
            .min(self.max_backoff);
        exp.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }
}

/// The `OrderCreated` event as the mail worker reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct OrderCreated {
    pub order_id: i64,
    pub user_id: i64,
    pub amount: i64,
    pub email: String,
}

/// The Message-ID of the confirmation for an event: derived from the event,
/// so a duplicate sent in the crash window carries the same one. A retried
/// dead letter keeps the Message-ID of the event it retries (`retry-of`).
pub fn message_id(record: &Record) -> String {
    let origin = record
        .headers
        .get("retry-of")
        .and_then(|v| v.as_str())
        .and_then(|o| {
            let mut parts = o.rsplitn(3, '/');
            let (offset, partition, topic) = (parts.next()?, parts.next()?, parts.next()?);
            let topic_ok = !topic.is_empty()
                && topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            let valid =
                topic_ok && offset.parse::<i64>().is_ok() && partition.parse::<i32>().is_ok();
            valid.then(|| format!("{topic}.{partition}.{offset}"))
        });
    let id = origin
        .unwrap_or_else(|| format!("{}.{}.{}", record.topic, record.partition, record.offset));
    format!("<{id}@outbox-relay>")
}

/// Renders the confirmation mail (plain text with an HTML alternative).
pub fn render(
    record: &Record,
    order: &OrderCreated,
    to: &EmailAddress,
    from: &Mailbox,
) -> anyhow::Result<Message> {
    let to: Mailbox = to.as_str().parse().context("recipient address")?;
    let subject = format!("Your order #{} is confirmed", order.order_id);
    let text = format!(
        "Hello,\n\nthank you for your order #{id}.\nOrder total: {amount}\n\n\
         We will let you know when it ships.\n",
        id = order.order_id,
        amount = order.amount
    );
    let html = format!(
        "<!doctype html><html><body><p>Hello,</p>\
         <p>thank you for your order <strong>#{id}</strong>.</p>\
         <p>Order total: <strong>{amount}</strong></p>\
         <p>We will let you know when it ships.</p></body></html>",
        id = order.order_id,
        amount = order.amount
    );
    Message::builder()
        .message_id(Some(message_id(record)))
        .from(from.clone())
        .to(to)
        .subject(subject)
        .multipart(
            MultiPart::alternative()
                .singlepart(
                    SinglePart::builder()
                        .header(header::ContentType::TEXT_PLAIN)
                        .body(text),
                )
                .singlepart(
                    SinglePart::builder()
                        .header(header::ContentType::TEXT_HTML)
                        .body(html),
                ),
        )
        .context("building the message")
}

/// What the worker did with one record (returned by [`MailWorker::process`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Sent {
        attempts: i32,
    },
    /// The ledger says it was sent already: not mailed again.
    AlreadySent,
    /// The ledger says it failed and was parked already.
    AlreadyParked,
    Parked {
        reason: String,
    },
}

/// The mail worker: a [`RecordHandler`] for `order-created`.
pub struct MailWorker {
    pool: deadpool_postgres::Pool,
    ledger: tokio::sync::mpsc::Sender<SentMark>,
    transport: MailTransport,
    from: Mailbox,
    group: String,
    retry: RetryPolicy,
}

/// The ledger's word on an event (no row: never attempted).
const LEDGER_STATUS: &str = "
    SELECT status, attempts FROM mail_deliveries
     WHERE group_id = $1 AND topic = $2 AND partition = $3 AND \"offset\" = $4";

/// Records `sent` for a batch of events in one statement (one commit).
const MARK_SENT: &str = "
    INSERT INTO mail_deliveries (group_id, topic, partition, \"offset\", key, message_id, recipient, status, attempts, sent_at)
    SELECT $1, v.topic, v.partition, v.log_offset, v.key, v.message_id, v.recipient, 'sent', 1, now()
      FROM unnest($2::text[], $3::int4[], $4::int8[], $5::text[], $6::text[], $7::text[])
           AS v(topic, partition, log_offset, message_id, recipient, key)
    ON CONFLICT (group_id, topic, partition, \"offset\") DO UPDATE
       SET status = 'sent', attempts = mail_deliveries.attempts + 1, sent_at = now(),
           last_error = NULL, updated_at = now()";

/// Records a failed attempt; the event stays `pending`.
const MARK_ATTEMPT_FAILED: &str = "
    INSERT INTO mail_deliveries (group_id, topic, partition, \"offset\", message_id, recipient, status, attempts, last_error, key)
    VALUES ($1, $2, $3, $4, $5, $6, 'pending', 1, $7, $8)
    ON CONFLICT (group_id, topic, partition, \"offset\") DO UPDATE
       SET attempts = mail_deliveries.attempts + 1, last_error = $7, updated_at = now()
    RETURNING attempts";

/// One `sent` to record, and who waits for it.
struct SentMark {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<String>,
    message_id: String,
    recipient: String,
    recorded: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Writes `sent` marks in batches: whatever arrived while the previous
/// batch was being written goes in the next statement, so many mails share
/// one commit (and one fsync).
fn spawn_ledger_writer(
    pool: deadpool_postgres::Pool,
    group: String,
) -> tokio::sync::mpsc::Sender<SentMark> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<SentMark>(4096);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < 1000 {
                match rx.try_recv() {
                    Ok(mark) => batch.push(mark),
                    Err(_) => break,
                }
            }
            let result = async {
                let client = pool.get().await?;
                let topics: Vec<&str> = batch.iter().map(|m| m.topic.as_str()).collect();
                let partitions: Vec<i32> = batch.iter().map(|m| m.partition).collect();
                let offsets: Vec<i64> = batch.iter().map(|m| m.offset).collect();
                let ids: Vec<&str> = batch.iter().map(|m| m.message_id.as_str()).collect();
                let recipients: Vec<&str> = batch.iter().map(|m| m.recipient.as_str()).collect();
                let keys: Vec<Option<&str>> = batch.iter().map(|m| m.key.as_deref()).collect();
                client
                    .execute(
                        MARK_SENT,
                        &[
                            &group,
                            &topics,
                            &partitions,
                            &offsets,
                            &ids,
                            &recipients,
                            &keys,
                        ],
                    )
                    .await?;
                anyhow::Ok(())
            }
            .await
            .map_err(|e| format!("{e:#}"));
            for mark in batch {
                let _ = mark.recorded.send(result.clone());
            }
        }
    });
    tx
}

impl MailWorker {
    /// The worker for `settings` (builds its SMTP transport).
    pub fn from_settings(
        pool: deadpool_postgres::Pool,
        settings: &MailSettings,
    ) -> anyhow::Result<MailWorker> {
        let transport = settings
            .target
            .transport(settings.pool_size, settings.timeout)?;
        Ok(MailWorker::new(
            pool,
            transport,
            settings.from.clone(),
            settings.retry.clone(),
        ))
    }

    pub fn new(
        pool: deadpool_postgres::Pool,
        transport: MailTransport,
        from: Mailbox,
        retry: RetryPolicy,
    ) -> MailWorker {
        MailWorker {
            ledger: spawn_ledger_writer(pool.clone(), MAIL_GROUP.to_string()),
            pool,
            transport,
            from,
            group: MAIL_GROUP.to_string(),
            retry,
        }
    }

    /// Handles one record to its end. Database errors are retried here
    /// too: giving up would commit past a record whose mail never went out.
    pub async fn process(&self, record: &Record) -> Delivery {
        let mut db_backoff = 0;
        loop {
            match self.try_process(record).await {
                Ok(delivery) => {
                    let metrics = crate::metrics::metrics();
                    match &delivery {
                        Delivery::Sent { .. } => metrics.mail_sent.inc(),
                        Delivery::Parked { .. } => {
                            metrics.mail_failed.with_label_values(&["parked"]).inc()
                        }
                        Delivery::AlreadySent | Delivery::AlreadyParked => {}
                    }
                    return delivery;
                }
                Err(e) => {
                    tracing::warn!(
                        offset = record.offset,
                        partition = record.partition,
                        error = format!("{e:#}"),
                        "mail delivery bookkeeping failed; retrying"
                    );
                    tokio::time::sleep(self.retry.backoff(db_backoff)).await;
                    db_backoff += 1;
                }
            }
        }
    }

    async fn try_process(&self, record: &Record) -> anyhow::Result<Delivery> {
        let decoded = serde_json::from_value::<OrderCreated>(record.payload.clone())
            .map_err(|e| format!("undecodable payload: {e}"))
            .and_then(|order| {
                let to = EmailAddress::parse(&order.email)
                    .map_err(|e| format!("invalid recipient: {e}"))?;
                Ok((order, to))
            });
        let (order, to) = match decoded {
            Ok(decoded) => decoded,
            Err(reason) => return self.park(record, &reason, 0, None).await,
        };
        let message_id = message_id(record);
        let key = (
            &self.group,
            &record.topic,
            &record.partition,
            &record.offset,
        );
        let client = self.pool.get().await?;
        let ledger = client
            .query_opt(LEDGER_STATUS, &[key.0, key.1, key.2, key.3])
            .await?;
        drop(client);
        let mut attempts: i32 = ledger.as_ref().map_or(0, |row| row.get(1));
        match ledger.as_ref().map(|row| row.get::<_, &str>(0)) {
            Some("sent") => return Ok(Delivery::AlreadySent),
            Some("failed") => return Ok(Delivery::AlreadyParked),
            _ => {}
        }
        let message = match render(record, &order, &to, &self.from) {
            Ok(m) => m,
            Err(e) => {
                return self
                    .park(record, &format!("cannot render: {e:#}"), attempts, None)
                    .await
            }
        };
        loop {
            // No transaction is open here: the SMTP exchange runs on its own.
            let name = format!(
                "order-{}.{}.{}.{}",
                order.order_id, record.topic, record.partition, record.offset
            );
            match self.transport.send(message.clone(), &name).await {
                SendOutcome::Sent => {
                    self.record_sent(record, &message_id, to.as_str()).await;
                    return Ok(Delivery::Sent {
                        attempts: attempts + 1,
                    });
                }
                SendOutcome::Permanent(error) => {
                    return self
                        .park(record, "permanent SMTP failure", attempts + 1, Some(&error))
                        .await;
                }
                SendOutcome::Transient(error) => {
                    crate::metrics::metrics()
                        .mail_failed
                        .with_label_values(&["transient"])
                        .inc();
                    attempts = self
                        .pool
                        .get()
                        .await?
                        .query_one(
                            MARK_ATTEMPT_FAILED,
                            &[
                                key.0,
                                key.1,
                                key.2,
                                key.3,
                                &message_id,
                                &to.as_str(),
                                &error,
                                &record.key,
                            ],
                        )
                        .await?
                        .get(0);
                    if attempts >= self.retry.max_attempts {
                        return self
                            .park(record, "retry budget spent", attempts, Some(&error))
                            .await;
                    }
                    tracing::info!(offset = record.offset, partition = record.partition, attempts, error = %error,
                        "transient SMTP failure; will retry");
                    tokio::time::sleep(self.retry.backoff(attempts - 1)).await;
                }
            }
        }
    }

    /// Records `sent`, retrying until the ledger has it: the mail is out,
    /// so sending it again is never the answer to a database error.
    async fn record_sent(&self, record: &Record, message_id: &str, recipient: &str) {
        let mut attempt = 0;
        loop {
            let (recorded, outcome) = tokio::sync::oneshot::channel();
            let mark = SentMark {
                topic: record.topic.clone(),
                partition: record.partition,
                offset: record.offset,
                key: record.key.clone(),
                message_id: message_id.to_string(),
                recipient: recipient.to_string(),
                recorded,
            };
            let error = match self.ledger.send(mark).await {
                Ok(()) => match outcome.await {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e,
                    Err(_) => "ledger writer stopped".to_string(),
                },
                Err(_) => "ledger writer stopped".to_string(),
            };
            tracing::warn!(offset = record.offset, error = %error, "could not record a sent mail; retrying");
            tokio::time::sleep(self.retry.backoff(attempt)).await;
            attempt += 1;
        }
    }

    /// Parks the record as a dead letter and marks the ledger `failed`,
    /// in one transaction.
    async fn park(
        &self,
        record: &Record,
        reason: &str,
        attempts: i32,
        last_error: Option<&str>,
    ) -> anyhow::Result<Delivery> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        park_dead_letter(&*tx, &self.group, record, reason, attempts, last_error).await?;
        tx.execute(
            "INSERT INTO mail_deliveries (group_id, topic, partition, \"offset\", message_id, status, attempts, last_error, key)
             VALUES ($1, $2, $3, $4, $5, 'failed', $6, $7, $8)
             ON CONFLICT (group_id, topic, partition, \"offset\")
             DO UPDATE SET status = 'failed', attempts = $6, last_error = $7, updated_at = now()",
            &[&self.group, &record.topic, &record.partition, &record.offset, &message_id(record), &attempts, &last_error, &record.key],
        )
        .await?;
        tx.commit().await?;
        tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset, reason,
            "parked as a dead letter");
        Ok(Delivery::Parked {
            reason: reason.to_string(),
        })
    }
}

impl RecordHandler for MailWorker {
    async fn handle(&self, record: Record) {
        self.process(&record).await;
    }
}

// ─── An order's confirmation mail, as the ledger tells it ──────────────────

/// Where an order's confirmation mail stands (`GET /orders/{id}`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ConfirmationMail {
    /// Not sent yet: not in the log yet, waiting for its turn, or between
    /// retries (`attempts` failed so far, the last with `last_error`).
    Pending {
        attempts: i32,
        last_error: Option<String>,
    },
    /// Accepted by the SMTP server.
    Sent {
        sent_at: Option<chrono::DateTime<chrono::Utc>>,
        message_id: String,
    },
    /// Parked as a dead letter (see `outbox-relay dead-letters list`).
    DeadLetter {
        dead_letter_id: Option<i64>,
        reason: Option<String>,
        last_error: Option<String>,
    },
}

/// The ledger's best word on the mail of events with `key`: `sent` if any
/// was, else the latest attempt. A dead letter that was retried is pending
/// again (its retry is a new event).
const MAIL_FOR_KEY: &str = "
    SELECT d.status, d.attempts, d.last_error, d.sent_at, d.message_id, l.id, l.reason, l.status
      FROM mail_deliveries d
      LEFT JOIN dead_letters l ON l.group_id = d.group_id AND l.topic = d.topic
                              AND l.partition = d.partition AND l.\"offset\" = d.\"offset\"
     WHERE d.group_id = $1 AND d.topic = $2 AND d.key = $3
     ORDER BY d.status = 'sent' DESC, d.updated_at DESC
     LIMIT 1";

/// The confirmation mail of order `order_id`.
pub async fn confirmation_mail(
    client: &impl tokio_postgres::GenericClient,
    order_id: i64,
) -> Result<ConfirmationMail, tokio_postgres::Error> {
    let row = client
        .query_opt(
            MAIL_FOR_KEY,
            &[
                &MAIL_GROUP,
                &crate::order::ORDER_CREATED_TOPIC,
                &order_id.to_string(),
            ],
        )
        .await?;
    let Some(row) = row else {
        return Ok(ConfirmationMail::Pending {
            attempts: 0,
            last_error: None,
        });
    };
    let status: &str = row.get(0);
    let dead_letter_status: Option<&str> = row.get(7);
    Ok(match status {
        "sent" => ConfirmationMail::Sent {
            sent_at: row.get(3),
            message_id: row.get(4),
        },
        "failed" if dead_letter_status != Some("retried") => ConfirmationMail::DeadLetter {
            dead_letter_id: row.get(5),
            reason: row.get(6),
            last_error: row.get(2),
        },
        _ => ConfirmationMail::Pending {
            attempts: row.get(1),
            last_error: row.get(2),
        },
    })
}

/// How many of `keys` have a `sent` confirmation (the demo waits on it).
pub async fn sent_count_for_keys(
    client: &impl tokio_postgres::GenericClient,
    keys: &[String],
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT count(DISTINCT key) FROM mail_deliveries
              WHERE group_id = $1 AND topic = $2 AND status = 'sent' AND key = ANY($3)",
            &[&MAIL_GROUP, &crate::order::ORDER_CREATED_TOPIC, &keys],
        )
        .await?
        .get(0))
}

// ─── Dead letters (any consumer group) ──────────────────────────────────────

/// Parks a record for `group` (idempotent per event).
pub async fn park_dead_letter(
    client: &impl tokio_postgres::GenericClient,
    group: &str,
    record: &Record,
    reason: &str,
    attempts: i32,
    last_error: Option<&str>,
) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO dead_letters (group_id, topic, partition, \"offset\", key, headers, payload, reason, attempts, last_error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (group_id, topic, partition, \"offset\") DO NOTHING",
            &[
                &group,
                &record.topic,
                &record.partition,
                &record.offset,
                &record.key,
                &record.headers,
                &record.payload,
                &reason,
                &attempts,
                &last_error,
            ],
        )
        .await?;
    Ok(())
}

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterStatus {
    /// Waiting for an operator.
    Parked,
    /// Published again through the outbox.
    Retried,
    /// Given up on by an operator.
    Discarded,
}

impl DeadLetterStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStatus::Parked => "parked",
            DeadLetterStatus::Retried => "retried",
            DeadLetterStatus::Discarded => "discarded",
        }
    }

    fn from_db(text: &str) -> DeadLetterStatus {
        match text {
            "retried" => DeadLetterStatus::Retried,
            "discarded" => DeadLetterStatus::Discarded,
            _ => DeadLetterStatus::Parked,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub status: DeadLetterStatus,
    pub reason: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub parked_at: chrono::DateTime<chrono::Utc>,
    pub resolved_at: Option<chrono::DateTime<chrono::Utc>>,
    pub payload: serde_json::Value,
}

/// Dead letters, optionally of one group and in one status, oldest first.
pub async fn list_dead_letters(
    client: &impl tokio_postgres::GenericClient,
    group: Option<&str>,
    status: Option<DeadLetterStatus>,
) -> anyhow::Result<Vec<DeadLetter>> {
    let status = status.map(DeadLetterStatus::as_str);
    let rows = client
        .query(
            "SELECT id, group_id, topic, partition, \"offset\", key, status, reason, attempts,
                    last_error, parked_at, resolved_at, payload
               FROM dead_letters
              WHERE ($1::text IS NULL OR group_id = $1) AND ($2::text IS NULL OR status = $2)
              ORDER BY id",
            &[&group, &status],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DeadLetter {
            id: r.get(0),
            group: r.get(1),
            topic: r.get(2),
            partition: r.get(3),
            offset: r.get(4),
            key: r.get(5),
            status: DeadLetterStatus::from_db(r.get(6)),
            reason: r.get(7),
            attempts: r.get(8),
            last_error: r.get(9),
            parked_at: r.get(10),
            resolved_at: r.get(11),
            payload: r.get(12),
        })
        .collect())
}

/// Retries dead letters (one by id, or all parked ones when `id` is None)
/// by publishing each record again through the outbox, with a `retry-of`
/// header; the consumer then handles it as a new event. Returns how many.
pub async fn retry_dead_letters(
    client: &mut tokio_postgres::Client,
    id: Option<i64>,
) -> anyhow::Result<u64> {
    let tx = client.transaction().await?;
    let retried = tx
        .execute(
            "WITH retried AS (
                 UPDATE dead_letters SET status = 'retried', resolved_at = now()
                  WHERE status = 'parked' AND ($1::int8 IS NULL OR id = $1)
                 RETURNING topic, partition, \"offset\", key, headers, payload)
             INSERT INTO outbox (topic, key, payload, headers)
             SELECT topic, key, payload,
                    headers || jsonb_build_object('retry-of', topic || '/' || partition || '/' || \"offset\")
               FROM retried",
            &[&id],
        )
        .await?;
    tx.commit().await?;
    Ok(retried)
}

/// Discards one parked dead letter. Returns false if there is none with that id.
pub async fn discard_dead_letter(
    client: &impl tokio_postgres::GenericClient,
    id: i64,
) -> anyhow::Result<bool> {
    let n = client
        .execute(
            "UPDATE dead_letters SET status = 'discarded', resolved_at = now() WHERE id = $1 AND status = 'parked'",
            &[&id],
        )
        .await?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smtp_urls_without_leaking_credentials() {
        assert_eq!(
            SmtpTarget::parse("smtp://mailhog:1025").unwrap(),
            SmtpTarget::Plain {
                host: "mailhog".into(),
                port: 1025
            }
        );
        let tls = SmtpTarget::parse("smtp+starttls://user:p%40ss@mail.example.com:587").unwrap();
        assert_eq!(
            tls,
            SmtpTarget::StartTls {
                host: "mail.example.com".into(),
                port: 587,
                credentials: Some(("user".into(), "p@ss".into()))
            }
        );
        assert_eq!(tls.to_string(), "smtp+starttls://mail.example.com:587");
        assert!(matches!(
            SmtpTarget::parse("smtps://u:p@h").unwrap(),
            SmtpTarget::ImplicitTls { port: 465, .. }
        ));
        assert_eq!(
            SmtpTarget::parse("file:///tmp/mail").unwrap(),
            SmtpTarget::Files {
                dir: "/tmp/mail".into()
            }
        );
        let err = SmtpTarget::parse("http://user:secret@host")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(SmtpTarget::parse("not a url secret")
            .unwrap_err()
            .to_string()
            .contains("not a valid URL"));
    }

    #[test]
    fn message_ids_come_from_the_event_or_the_event_it_retries() {
        let mut record = Record {
            topic: "order-created".into(),
            partition: 3,
            offset: 42,
            key: None,
            created_at: chrono::Utc::now(),
            appended_at: chrono::Utc::now(),
            headers: serde_json::json!({}),
            payload: serde_json::json!({}),
        };
        assert_eq!(message_id(&record), "<order-created.3.42@outbox-relay>");
        record.headers = serde_json::json!({"retry-of": "order-created/1/7"});
        assert_eq!(message_id(&record), "<order-created.1.7@outbox-relay>");
        record.headers = serde_json::json!({"retry-of": "x>\r\nBcc: a@b.c/1/7"});
        assert_eq!(
            message_id(&record),
            "<order-created.3.42@outbox-relay>",
            "a forged header is ignored"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert!(policy.backoff(0) <= Duration::from_millis(100));
        assert!(policy.backoff(0) >= Duration::from_millis(50));
        assert!(policy.backoff(3) >= Duration::from_millis(400));
        assert!(policy.backoff(30) <= Duration::from_secs(1));
    }
}
