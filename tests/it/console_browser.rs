//! What the console's tests drive: the binary serving the pipeline with
//! the console (a real Postgres, a real SMTP server), and a real Chromium
//! (Debian's `chromium` and `chromium-driver`, installed by tests/run)
//! over WebDriver through fantoccini. Screenshots of the pages go to
//! `<target tmp>/console-screenshots/`.

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use tokio::process::{Child, Command};

use crate::harness::*;
use crate::smtp::SmtpServer;

/// The binary serving api, relay, mail and console on free ports.
pub struct Service {
    pub base: String,
    pub addr: std::net::SocketAddr,
    child: Child,
}

impl Service {
    /// `serve --roles api,relay,mail,console` with `more` arguments.
    pub async fn start(db: &TestDb, smtp: &SmtpServer, more: &[&str]) -> Service {
        Service::start_roles(db, Some(smtp), "api,relay,mail,console", more).await
    }

    pub async fn start_roles(
        db: &TestDb,
        smtp: Option<&SmtpServer>,
        roles: &str,
        more: &[&str],
    ) -> Service {
        let port = free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut command = binary(db);
        command
            .args(["serve", "--roles", roles, "--http-addr", &addr.to_string()])
            .args(["--session-timeout-secs", "2", "--mail-retry-for", "10m"])
            .args(more)
            .stdout(Stdio::null());
        if let Some(smtp) = smtp {
            command.args(["--smtp-url", &smtp.url()]);
        }
        let child = command.spawn().expect("start outbox-relay serve");
        let service = Service {
            base: format!("http://{addr}/console"),
            addr,
            child,
        };
        let http = reqwest::Client::new();
        eventually(
            "the service to answer /healthz",
            Duration::from_secs(60),
            || {
                let http = http.clone();
                async move {
                    http.get(format!("http://{addr}/healthz"))
                        .send()
                        .await
                        .ok()
                        .filter(|r| r.status().is_success())
                        .map(|_| ())
                }
            },
        )
        .await;
        service
    }

    /// Places an order through the API; its id.
    pub async fn place_order(&self, email: &str) -> i64 {
        let response: serde_json::Value = reqwest::Client::new()
            .post(format!("http://{}/orders", self.addr))
            .json(&serde_json::json!({"user_id": 7, "email": email, "amount": 4200}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        response["order_id"].as_i64().expect("an order id")
    }

    /// Places an order and waits until its mail is at `smtp` and the mail
    /// group has committed past it; its id.
    pub async fn place_mailed_order(&self, db: &TestDb, smtp: &SmtpServer, email: &str) -> i64 {
        let mails = smtp.messages().len() + 1;
        let order = self.place_order(email).await;
        crate::mail::wait_for_mails(smtp, mails, Duration::from_secs(30)).await;
        wait_until_group_caught_up(db, "mail-service", "order-created").await;
        order
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A headless Chromium driven over WebDriver, with its chromedriver.
pub struct Browser {
    pub client: Client,
    driver: Child,
    test: String,
}

impl Browser {
    /// Starts chromedriver on a free port and a browser session; `test`
    /// names the screenshots.
    pub async fn start(test: &str) -> Browser {
        let driver_bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start {driver_bin} (Debian: apt-get install chromium chromium-driver; tests/run installs them): {e}")
            });
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        eventually("chromedriver to answer", Duration::from_secs(30), || {
            let http = http.clone();
            let url = url.clone();
            async move {
                http.get(format!("{url}/status"))
                    .send()
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1300,1000", "--no-first-run"],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&url)
            .await
            .expect("a Chromium session through chromedriver");
        Browser {
            client,
            driver,
            test: test.to_string(),
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// The text of the first element `css` finds.
    pub async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
            .text()
            .await
            .unwrap()
    }

    /// Waits (polling the page as it is, no reload) until `css`'s text
    /// satisfies `check`.
    pub async fn wait_text(&self, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        eventually(what, Duration::from_secs(45), || async {
            let element = self.client.find(Locator::Css(css)).await.ok()?;
            let text = element.text().await.ok()?;
            check(&text).then_some(text)
        })
        .await
    }

    pub async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
            .click()
            .await
            .unwrap();
    }

    pub async fn fill(&self, css: &str, text: &str) {
        let field = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no field {css}: {e}"));
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// How many elements `css` finds.
    pub async fn count(&self, css: &str) -> usize {
        self.client.find_all(Locator::Css(css)).await.unwrap().len()
    }

    /// Saves a screenshot of the page as `<test>-<name>.png`.
    pub async fn screenshot(&self, name: &str) {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{}-{name}.png", self.test)), png).unwrap();
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
    }
}
