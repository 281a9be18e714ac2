//! A real SMTP server for the tests: aiosmtpd (PyPI), run as a subprocess
//! by tests/support/smtp_server.py, storing what it accepts in a Maildir.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::free_port;

pub struct SmtpServer {
    pub port: u16,
    pub maildir: PathBuf,
    options: Vec<String>,
    child: Option<Child>,
    /// While stopped, a bound but not listening socket keeps the port ours
    /// (connections are refused) so a parallel test cannot take it.
    reserved: Option<tokio::net::TcpSocket>,
}

/// A message as the server stored it.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    pub message_id: String,
    pub to: String,
    pub subject: String,
    pub raw: String,
}

impl SmtpServer {
    /// Starts a server on a free port with `options` (see smtp_server.py).
    pub async fn start(options: &[&str]) -> SmtpServer {
        let port = free_port();
        let maildir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("maildir-{port}-{:x}", rand::random::<u32>()));
        let mut server = SmtpServer {
            port,
            maildir,
            options: options.iter().map(|o| o.to_string()).collect(),
            child: None,
            reserved: None,
        };
        server.restart().await;
        server
    }

    /// (Re)starts the server on the same port and Maildir.
    pub async fn restart(&mut self) {
        self.reserved = None;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/smtp_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args([
                "--port",
                &self.port.to_string(),
                "--maildir",
                &self.maildir.to_string_lossy(),
            ])
            .args(&self.options)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start python3 tests/support/smtp_server.py (pip install aiosmtpd)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("SMTP server did not start within 20 s")
            .unwrap();
        assert!(
            ready.is_some_and(|l| l.starts_with("READY")),
            "SMTP server failed to start (is aiosmtpd installed?)"
        );
        self.child = Some(child);
    }

    /// Restarts the server answering as `options` say from now on.
    pub async fn restart_with(&mut self, options: &[&str]) {
        self.stop().await;
        self.options = options.iter().map(|o| o.to_string()).collect();
        self.restart().await;
    }

    /// Stops the server (connections are refused until it restarts).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        for _ in 0..100 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            if socket.bind(address).is_ok() {
                self.reserved = Some(socket);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "could not hold port {} while the SMTP server is down",
            self.port
        );
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message accepted so far.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        let mut mails = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(self.maildir.join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                let raw = std::fs::read_to_string(entry.path()).unwrap_or_default();
                mails.push(ReceivedMail {
                    message_id: header(&raw, "Message-ID"),
                    to: header(&raw, "To"),
                    subject: header(&raw, "Subject"),
                    raw,
                });
            }
        }
        mails
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        // The child is killed on drop; what it stored goes with it.
        let _ = std::fs::remove_dir_all(&self.maildir);
    }
}

fn header(raw: &str, name: &str) -> String {
    let prefix = format!("{}:", name.to_ascii_lowercase());
    raw.lines()
        .take_while(|l| !l.is_empty())
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .map(|l| l[prefix.len()..].trim().to_string())
        .unwrap_or_default()
}
