//! A plain SMTP client connection of our own, for `smtp://` targets.
//!
//! lettre builds the message and the commands (`MAIL`, `RCPT`, `DATA` are
//! its types); this connection does the I/O so that:
//!
//! * each phase has its own time limit: the commands before the message
//!   `--smtp-timeout-secs` each, the final answer to the end of the message
//!   up to ten minutes (RFC 5321 §4.5.3.2.6), because a server may queue a
//!   mail and answer late;
//! * once the message has been sent, a missing answer is an *unknown*
//!   outcome (the mail may have been delivered), never a failure;
//! * `MAIL`, `RCPT` and `DATA` go out in one write when the server offers
//!   PIPELINING (RFC 2920): one round trip instead of three;
//! * TCP_NODELAY is set (lettre 0.11.23 writes the body and its final `.`
//!   separately with Nagle's algorithm on: a 40 ms delayed ACK per mail).

use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A server's reply: its code and text (all lines joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// A refusal's class: 5xx is permanent, anything else worth retrying.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// How one mail's exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exchange {
    /// The server took the mail (2xx to the end of the message).
    Accepted,
    /// The server refused it with a definite answer: nothing was delivered.
    Refused(Reply),
    /// It broke before the message was sent: nothing was delivered.
    Failed(String),
    /// The message was sent but no final answer came: it may have been
    /// delivered.
    Unknown(String),
}

/// Time limits of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connecting, the greeting, EHLO, each command before the message.
    pub command: Duration,
    /// The final answer after the end of the message.
    pub final_reply: Duration,
}

impl Limits {
    /// `command` for every step, and RFC 5321's ten minutes for the final
    /// answer.
    pub fn new(command: Duration) -> Limits {
        Limits {
            command,
            final_reply: FINAL_REPLY_TIMEOUT.max(command),
        }
    }
}

/// RFC 5321 §4.5.3.2.6: the client waits at least 10 minutes for the
/// answer to the end of the message.
pub const FINAL_REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest reply accepted (a server sending more is broken).
const MAX_REPLY_BYTES: usize = 64 * 1024;

pub struct SmtpConnection {
    stream: BufReader<TcpStream>,
    pipelining: bool,
    /// An exchange broke mid-way: the connection must not be reused.
    broken: bool,
}

impl SmtpConnection {
    /// Connects, reads the greeting and introduces itself (EHLO, else HELO).
    pub async fn connect(host: &str, port: u16, limits: Limits) -> Result<SmtpConnection, String> {
        let stream = tokio::time::timeout(limits.command, TcpStream::connect((host, port)))
            .await
            .map_err(|_| "connection timed out".to_string())?
            .map_err(|e| format!("connection failed: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut connection = SmtpConnection {
            stream: BufReader::new(stream),
            pipelining: false,
            broken: false,
        };
        let greeting = connection.reply(limits.command).await?;
        if greeting.code != 220 {
            return Err(format!("greeting: {greeting}"));
        }
        let name = hostname();
        connection
            .write(format!("EHLO {name}\r\n").as_bytes(), limits.command)
            .await?;
        let ehlo = connection.reply(limits.command).await?;
        if ehlo.is_positive() {
            connection.pipelining = ehlo
                .text
                .split('\n')
                .any(|line| line.trim().eq_ignore_ascii_case("PIPELINING"));
        } else {
            connection
                .write(format!("HELO {name}\r\n").as_bytes(), limits.command)
                .await?;
            let helo = connection.reply(limits.command).await?;
            if !helo.is_positive() {
                return Err(format!("HELO: {helo}"));
            }
        }
        Ok(connection)
    }

    /// Whether the server offered PIPELINING.
    pub fn pipelining(&self) -> bool {
        self.pipelining
    }

    /// False once an exchange broke mid-way.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// Sends one mail: `formatted` is the whole message (headers and body,
    /// CRLF line ends), as lettre formats it.
    pub async fn send(
        &mut self,
        envelope: &Envelope,
        formatted: &[u8],
        limits: Limits,
    ) -> Exchange {
        match self.envelope(envelope, limits).await {
            Ok(None) => {}
            Ok(Some(refusal)) => {
                // A definite refusal: reset so the connection can be reused.
                if !self.broken {
                    let reset = self.write(b"RSET\r\n", limits.command).await;
                    if reset.is_err() || self.reply(limits.command).await.is_err() {
                        self.broken = true;
                    }
                }
                return Exchange::Refused(refusal);
            }
            Err(e) => {
                self.broken = true;
                return Exchange::Failed(e);
            }
        }
        // From here on the server may have the message.
        let mut data = Vec::with_capacity(formatted.len() + 64);
        dot_stuff(formatted, &mut data);
        data.extend_from_slice(b".\r\n");
        if let Err(e) = self.write(&data, limits.command).await {
            self.broken = true;
            return Exchange::Unknown(format!("sending the message: {e}"));
        }
        match self.reply(limits.final_reply).await {
            Ok(reply) if reply.is_positive() => Exchange::Accepted,
            Ok(reply) => Exchange::Refused(reply),
            Err(e) => {
                self.broken = true;
                Exchange::Unknown(format!("no answer to the end of the message: {e}"))
            }
        }
    }

    /// MAIL, RCPT, DATA (pipelined when offered). `Ok(None)`: the server
    /// waits for the message; `Ok(Some(reply))`: it refused.
    async fn envelope(
        &mut self,
        envelope: &Envelope,
        limits: Limits,
    ) -> Result<Option<Reply>, String> {
        let mut commands = vec![Mail::new(envelope.from().cloned(), vec![]).to_string()];
        commands.extend(
            envelope
                .to()
                .iter()
                .map(|to| Rcpt::new(to.clone(), vec![]).to_string()),
        );
        commands.push(Data.to_string());
        if self.pipelining {
            self.write(commands.concat().as_bytes(), limits.command)
                .await?;
            let mut refusal = None;
            for i in 0..commands.len() {
                let reply = self.reply(limits.command).await?;
                let last = i + 1 == commands.len();
                let ok = if last {
                    reply.code == 354
                } else {
                    reply.is_positive()
                };
                if !ok && refusal.is_none() {
                    refusal = Some(reply);
                } else if last && ok && refusal.is_some() {
                    // It waits for a message we will not send: drop the connection.
                    self.broken = true;
                }
            }
            return Ok(refusal);
        }
        for (i, command) in commands.iter().enumerate() {
            self.write(command.as_bytes(), limits.command).await?;
            let reply = self.reply(limits.command).await?;
            let last = i + 1 == commands.len();
            let ok = if last {
                reply.code == 354
            } else {
                reply.is_positive()
            };
            if !ok {
                return Ok(Some(reply));
            }
        }
        Ok(None)
    }

    /// A cheap check that an idle connection still answers.
    pub async fn noop(&mut self, limit: Duration) -> bool {
        let answered = async {
            self.write(b"NOOP\r\n", limit).await?;
            self.reply(limit).await
        }
        .await;
        matches!(answered, Ok(reply) if reply.code == 250)
    }

    /// Says goodbye, without waiting long for a server that stopped answering.
    pub async fn quit(mut self) {
        let limit = Duration::from_secs(1);
        if self.write(b"QUIT\r\n", limit).await.is_ok() {
            let _ = self.reply(limit).await;
        }
    }

    async fn write(&mut self, bytes: &[u8], limit: Duration) -> Result<(), String> {
        let stream = self.stream.get_mut();
        tokio::time::timeout(limit, stream.write_all(bytes))
            .await
            .map_err(|_| "timed out writing to the server".to_string())?
            .map_err(|e| format!("writing to the server: {e}"))
    }

    /// Reads one reply (all its lines) within `limit`.
    async fn reply(&mut self, limit: Duration) -> Result<Reply, String> {
        tokio::time::timeout(limit, self.read_reply())
            .await
            .map_err(|_| format!("no answer within {} s", limit.as_secs_f64()))?
    }

    async fn read_reply(&mut self) -> Result<Reply, String> {
        let mut text = String::new();
        let mut total = 0;
        let mut line = Vec::new();
        loop {
            line.clear();
            // At most the rest of the allowance: a server that never ends a
            // line cannot make us buffer without bound.
            let allowance = (MAX_REPLY_BYTES - total) as u64 + 1;
            let n = (&mut self.stream)
                .take(allowance)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| format!("reading from the server: {e}"))?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            total += n;
            if total > MAX_REPLY_BYTES {
                return Err("the server's reply is too long".into());
            }
            // Reply text need not be UTF-8; only the code matters to us.
            let decoded = String::from_utf8_lossy(&line);
            let decoded = decoded.trim_end_matches(['\r', '\n']);
            let (code, rest) = parse_reply_line(decoded)?;
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(rest.get(1..).unwrap_or(""));
            // "250-…" continues, "250 …" (or "250") ends the reply.
            if !rest.starts_with('-') {
                return Ok(Reply { code, text });
            }
        }
    }
}

/// `"250-PIPELINING"` → (250, "-PIPELINING").
fn parse_reply_line(line: &str) -> Result<(u16, &str), String> {
    let code = line
        .get(..3)
        .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|c| (200..600).contains(c))
        .ok_or_else(|| {
            format!(
                "not an SMTP reply: {:?}",
                line.chars().take(80).collect::<String>()
            )
        })?;
    Ok((code, &line[3..]))
}

/// Copies `message` doubling a `.` at the start of any line (RFC 5321
/// §4.5.2) and making sure it ends with CRLF.
fn dot_stuff(message: &[u8], out: &mut Vec<u8>) {
    let mut line_start = true;
    for &byte in message {
        if line_start && byte == b'.' {
            out.push(b'.');
        }
        out.push(byte);
        line_start = byte == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
}

/// The name this client gives in EHLO.
fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        })
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_doubles_leading_dots_and_ends_with_crlf() {
        let mut out = Vec::new();
        dot_stuff(b".hidden\r\nline\r\n..two\r\nlast", &mut out);
        assert_eq!(out, b"..hidden\r\nline\r\n...two\r\nlast\r\n");
    }

    #[test]
    fn reply_lines_parse() {
        assert_eq!(
            parse_reply_line("250-PIPELINING").unwrap(),
            (250, "-PIPELINING")
        );
        assert_eq!(
            parse_reply_line("354 go ahead").unwrap(),
            (354, " go ahead")
        );
        assert_eq!(parse_reply_line("221").unwrap(), (221, ""));
        assert!(parse_reply_line("hello").is_err());
        assert!(parse_reply_line("999 x").is_err());
    }
}
