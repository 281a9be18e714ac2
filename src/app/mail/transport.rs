//! Where mails go: `SMTP_URL` parsed ([`SmtpTarget`], never showing
//! credentials), and the transports: a pool of our own plain SMTP
//! connections ([`super::smtp`]), lettre's pooled TLS transport, or `.eml`
//! files.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::{AsyncSmtpTransportBuilder, PoolConfig};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::smtp::{Exchange, Limits, SmtpConnection};

/// Where mails go, at most `pool_size` exchanges at a time whatever the
/// route: a fast route (`.eml` files) is bounded like SMTP, so a backlog
/// never turns into thousands of writes (and threads) at once.
#[derive(Clone)]
pub struct MailTransport {
    route: Route,
    slots: Arc<tokio::sync::Semaphore>,
}

#[derive(Clone)]
enum Route {
    /// Plain SMTP through [`PlainSmtpPool`] (TCP_NODELAY set).
    Plain(Arc<PlainSmtpPool>),
    /// TLS (STARTTLS or implicit) through lettre's pooled transport.
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    /// `.eml` files in a directory: the embedded default.
    Files(PathBuf),
}

/// One of a transport's exchange slots, held: [`SendSlot::send`] starts
/// the exchange at once.
pub struct SendSlot<'a> {
    transport: &'a MailTransport,
    _slot: tokio::sync::SemaphorePermit<'a>,
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
    /// connections and wait for the server as `limits` say (see
    /// [`tls_timeout`] for the TLS transports).
    pub fn transport(&self, pool_size: u32, limits: Limits) -> anyhow::Result<MailTransport> {
        let pool = PoolConfig::new().max_size(pool_size.max(1));
        let timeout = Some(tls_timeout(limits));
        let route = match self {
            SmtpTarget::Plain { host, port } => Route::Plain(Arc::new(PlainSmtpPool {
                host: host.clone(),
                port: *port,
                limits,
                idle: Mutex::new(Vec::new()),
            })),
            SmtpTarget::StartTls {
                host,
                port,
                credentials,
            } => Route::Smtp(
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
            } => Route::Smtp(
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
                // Only the last directory: a mistyped path is refused, not
                // created from the root of the filesystem.
                if !dir.is_dir() {
                    std::fs::create_dir(dir)
                        .with_context(|| format!("creating mail directory {}", dir.display()))?;
                }
                Route::Files(dir.clone())
            }
        };
        Ok(MailTransport {
            route,
            slots: Arc::new(tokio::sync::Semaphore::new(pool_size.max(1) as usize)),
        })
    }
}

/// lettre's TLS transports (`smtp+starttls`, `smtps`) have one limit for
/// every read and write, the final answer to the message included. A
/// final answer later than the limit makes the outcome unknown, and an
/// unknown outcome is sent again: so the one limit is the final answer's
/// (RFC 5321 §4.5.3.2, 10 minutes by default), never the shorter one for
/// the steps before it. A server that hangs before the message is then
/// noticed only after that limit; plain `smtp://` has both limits.
fn tls_timeout(limits: Limits) -> Duration {
    limits.final_reply.max(limits.command)
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

/// A pool of plain SMTP connections ([`SmtpConnection`]: per-phase time
/// limits, PIPELINING, TCP_NODELAY).
pub struct PlainSmtpPool {
    host: String,
    port: u16,
    limits: Limits,
    /// At most the transport's slots (one connection per exchange).
    idle: Mutex<Vec<(SmtpConnection, Instant)>>,
}

/// Idle connections older than this are closed rather than reused.
const MAX_IDLE: Duration = Duration::from_secs(30);
/// Idle connections older than this are probed (NOOP) before reuse.
const PROBE_AFTER_IDLE: Duration = Duration::from_secs(1);

impl PlainSmtpPool {
    async fn send(&self, message: &Message) -> SendOutcome {
        let mut connection = match self.checkout().await {
            Ok(connection) => connection,
            Err(e) => return SendOutcome::Transient(e),
        };
        // Never retried here: once the message may have reached the server,
        // only the ledger decides whether to send again (after a backoff).
        let outcome = match connection
            .send(message.envelope(), &message.formatted(), self.limits)
            .await
        {
            Exchange::Accepted => SendOutcome::Sent,
            Exchange::Refused(reply) if reply.is_permanent() => {
                SendOutcome::Permanent(reply.to_string())
            }
            Exchange::Refused(reply) => SendOutcome::Transient(reply.to_string()),
            Exchange::Failed(e) => {
                // A network error: the server may have restarted; its other
                // idle connections are as dead as this one.
                self.idle.lock().expect("pool lock").clear();
                SendOutcome::Transient(e)
            }
            Exchange::Unknown(e) => SendOutcome::Unknown(e),
        };
        if connection.is_usable() {
            self.idle
                .lock()
                .expect("pool lock")
                .push((connection, Instant::now()));
        }
        outcome
    }

    /// An idle connection that still answers, or a new one. One idle for
    /// more than a second is probed with NOOP first (the server may have
    /// closed it); one used a moment ago is taken as it is, which keeps the
    /// probe's round trip off the busy path.
    async fn checkout(&self) -> Result<SmtpConnection, String> {
        loop {
            let idle = self.idle.lock().expect("pool lock").pop();
            let Some((mut connection, since)) = idle else {
                break;
            };
            if since.elapsed() < PROBE_AFTER_IDLE
                || (since.elapsed() < MAX_IDLE && connection.noop(self.limits.command).await)
            {
                return Ok(connection);
            }
            tokio::spawn(connection.quit());
        }
        SmtpConnection::connect(&self.host, self.port, self.limits).await
    }
}

/// How a send attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    Sent,
    /// Not delivered, worth retrying: connection refused, a timeout before
    /// the message was sent, a 4xx answer.
    Transient(String),
    /// Not delivered, not worth retrying: 5xx, a refused recipient.
    Permanent(String),
    /// The message was sent but no final answer came: it may have been
    /// delivered. Not a failure (docs/invariants.md, 8).
    Unknown(String),
}

impl MailTransport {
    /// Waits for one of the transport's exchange slots (back-pressure: a
    /// caller that has one starts its exchange at once).
    pub async fn slot(&self) -> SendSlot<'_> {
        SendSlot {
            transport: self,
            _slot: self
                .slots
                .acquire()
                .await
                .expect("the slots are never closed"),
        }
    }

    /// Sends `message` when a slot is free. `name` names the mail for
    /// people (the file transport's file is `<name>.eml`); SMTP ignores it.
    pub async fn send(&self, message: Message, name: &str) -> SendOutcome {
        self.slot().await.send(message, name).await
    }
}

impl SendSlot<'_> {
    /// Sends `message` in this slot.
    pub async fn send(self, message: Message, name: &str) -> SendOutcome {
        match &self.transport.route {
            Route::Plain(pool) => pool.send(&message).await,
            Route::Smtp(smtp) => match smtp.send(message).await {
                Ok(_) => SendOutcome::Sent,
                // A definite answer from the server.
                Err(e) if e.is_permanent() || e.is_client() => {
                    SendOutcome::Permanent(e.to_string())
                }
                Err(e) if e.is_transient() || e.is_tls() => SendOutcome::Transient(e.to_string()),
                // A network error or a timeout: lettre does not say whether
                // it came before or after the message was sent, so it is
                // not a failure (it may have been delivered).
                Err(e) => SendOutcome::Unknown(e.to_string()),
            },
            Route::Files(dir) => match write_eml(dir, name, &message).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_transports_wait_for_the_final_answer_as_long_as_plain_smtp_does() {
        let limits = Limits {
            command: Duration::from_secs(15),
            final_reply: Duration::from_secs(600),
        };
        assert_eq!(tls_timeout(limits), Duration::from_secs(600));
    }

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
}
