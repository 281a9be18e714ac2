//! Issue "observability": the metrics an operator needs, one trace from an
//! order to its mail, and the shipped alert rules and dashboard evaluated
//! by a real Prometheus scraping a running `outbox-relay serve`; the
//! shipped Prometheus and compose files checked by their own tools.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::*;
use crate::metrics::Prometheus;
use crate::smtp::SmtpServer;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (tests/run installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

/// The Prometheus configuration and rules pass `promtool`; the compose
/// file passes `docker-compose config`; every file it mounts exists and
/// parses (YAML, JSON; Prometheus' files by promtool above).
#[test]
fn shipped_prometheus_and_compose_files_are_valid() {
    let config = run("promtool", &["check", "config", "grafana/prometheus.yml"]);
    assert!(config.contains("1 rule files found"), "{config}");
    let rules = run("promtool", &["check", "rules", "grafana/alerts.yml"]);
    assert!(rules.contains("SUCCESS"), "{rules}");
    run(
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "--quiet"],
    );
    // docker-compose is Python and brings PyYAML: list the bind mounts of
    // the normalised file and parse each mounted file with its parser.
    let mounts = run(
        "python3",
        &[
            "-c",
            r#"
import json, os, subprocess, sys, yaml
config = yaml.safe_load(subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config"],
                                       check=True, capture_output=True, text=True).stdout)
checked = []
for name, service in config["services"].items():
    for volume in service.get("volumes", []):
        source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
        if not source.startswith(("/", ".")):
            continue  # a named volume
        assert os.path.exists(source), f"{name} mounts {source}, which does not exist"
        files = [source] if os.path.isfile(source) else [
            os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs]
        for path in files:
            with open(path) as f:
                (json.load if path.endswith(".json") else yaml.safe_load)(f)
            checked.append(os.path.relpath(path))
print("\n".join(sorted(checked)))
"#,
        ],
    );
    for file in [
        "grafana/prometheus.yml",
        "grafana/alerts.yml",
        "grafana/dashboards/outbox-relay.json",
        "grafana/provisioning/datasources/prometheus.yml",
    ] {
        assert!(mounts.contains(file), "{file} not mounted:\n{mounts}");
    }
}

/// Every query of the shipped dashboard, with Grafana's `$__rate_interval`
/// as one minute.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("grafana/dashboards/outbox-relay.json")).unwrap(),
    )
    .unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push((
                panel["title"].as_str().unwrap().to_string(),
                target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m"),
            ));
        }
    }
    queries
}

/// Every query of the dashboard's panels that `panels` picks answers, with
/// data unless the query contains `may_be_empty` (a series that exists only
/// once something failed).
pub(crate) async fn dashboard_panels_answer(
    prometheus: &Prometheus,
    panels: impl Fn(&str) -> bool,
    may_be_empty: &str,
) {
    for (panel, query) in dashboard_queries().into_iter().filter(|(p, _)| panels(p)) {
        eventually(
            &format!("panel {panel:?}: {query}"),
            Duration::from_secs(30),
            || async {
                let answer = prometheus.query(&query).await?;
                let has_data = answer["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty());
                (answer["status"] == "success" && (has_data || query.contains(may_be_empty)))
                    .then_some(())
            },
        )
        .await;
    }
}

/// `outbox-relay serve` as deployed, with JSON logs kept for the test.
struct Serve {
    child: tokio::process::Child,
    port: u16,
    log_lines: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    async fn start(db: &TestDb, smtp: &SmtpServer) -> Serve {
        let port = free_port();
        let mut child = binary(db)
            .args(["serve", "--http-addr", &format!("127.0.0.1:{port}")])
            .args(["--mail-max-attempts", "1"])
            .env("SMTP_URL", smtp.url())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "outbox_relay=debug")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log_lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = log_lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let serve = Serve {
            child,
            port,
            log_lines,
        };
        let ready = format!("{}/readyz", serve.url());
        eventually("serve to be ready", Duration::from_secs(30), || async {
            let answer = reqwest::get(&ready).await.ok()?;
            answer.status().is_success().then_some(())
        })
        .await;
        serve
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn place_order(&self, email: &str, traceparent: Option<&str>) -> reqwest::Response {
        let mut request = reqwest::Client::new()
            .post(format!("{}/orders", self.url()))
            .header("content-type", "application/json")
            .body(json!({"user_id": 7, "email": email, "amount": 1200}).to_string());
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), reqwest::StatusCode::CREATED);
        answer
    }

    /// Log lines (JSON objects) that mention `needle`.
    fn lines_with(&self, needle: &str) -> Vec<Value> {
        self.log_lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .map(|l| serde_json::from_str(l).expect("LOG_FORMAT=json writes JSON lines"))
            .collect()
    }
}

/// Polls `query` until `accept` holds for its first value.
async fn value_until(prometheus: &Prometheus, query: &str, accept: impl Fn(f64) -> bool) -> f64 {
    eventually(
        &format!("Prometheus: {query}"),
        Duration::from_secs(30),
        || async {
            let value = prometheus.value(query).await?;
            accept(value).then_some(value)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_links_an_order_to_its_mail_and_the_metrics_alerts_and_dashboard_hold() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&["--reject", "bounce@example.com"]).await;
    let mut serve = Serve::start(&db, &smtp).await;
    let prometheus = Prometheus::start_with_rules(
        &format!("127.0.0.1:{}", serve.port),
        Some(&repo().join("grafana/alerts.yml")),
    )
    .await;

    // A caller's trace, continued by the order and its mail.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let answer = serve
        .place_order("traced@example.com", Some(&incoming))
        .await;
    let answered = answer.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        answered.starts_with(&format!("00-{trace_id}-")),
        "{answered}"
    );
    assert_ne!(answered, incoming, "the order is a span of its own");
    let traced_order: i64 = answer.json::<Value>().await.unwrap()["order_id"]
        .as_i64()
        .unwrap();
    // Without a caller's trace, an order starts one.
    let untraced = serve.place_order("buyer0@example.com", None).await;
    let started = untraced.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let untraced_order: i64 = untraced.json::<Value>().await.unwrap()["order_id"]
        .as_i64()
        .unwrap();
    assert!(
        outbox_relay::trace_context::TraceParent::parse(&started).is_some(),
        "{started}"
    );
    for i in 1..4 {
        serve
            .place_order(&format!("buyer{i}@example.com"), None)
            .await;
    }
    // Refused with 550: parked as a dead letter.
    serve.place_order("bounce@example.com", None).await;
    // A writer in another language: plain SQL, its trace in the headers.
    let sql_trace_id = "0af7651916cd43dd8448eb211c80319c";
    db.client()
        .await
        .execute(
            "INSERT INTO outbox (topic, key, payload, headers) VALUES ('order-created', '900001',
               '{\"order_id\": 900001, \"user_id\": 7, \"amount\": 1500, \"email\": \"sql-writer@example.com\"}',
               jsonb_build_object('traceparent', '00-' || $1 || '-b7ad6b7169203331-01'))",
            &[&sql_trace_id],
        )
        .await
        .unwrap();
    eventually("six mails", Duration::from_secs(30), || async {
        (smtp.messages().len() >= 6).then_some(())
    })
    .await;

    // The trace: outbox row → log record → mail → log lines.
    let client = db.client().await;
    let headers: Value = client
        .query_one(
            "SELECT headers FROM event_log WHERE key = $1",
            &[&traced_order.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(headers["traceparent"], json!(answered));
    let untraced_headers: Value = client
        .query_one(
            "SELECT headers FROM event_log WHERE key = $1",
            &[&untraced_order.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(untraced_headers["traceparent"], json!(started));
    let sql_mail = smtp
        .messages()
        .into_iter()
        .find(|m| m.to.contains("sql-writer@example.com"))
        .unwrap();
    assert!(
        sql_mail
            .raw
            .contains(&format!("Traceparent: 00-{sql_trace_id}-")),
        "{}",
        sql_mail.raw
    );
    let mail = smtp
        .messages()
        .into_iter()
        .find(|m| m.to.contains("traced@example.com"))
        .unwrap();
    assert!(
        mail.raw.contains(&format!("Traceparent: 00-{trace_id}-")),
        "{}",
        mail.raw
    );
    let lines = eventually(
        "log lines of the order and of its mail",
        Duration::from_secs(10),
        || async {
            let lines = serve.lines_with(trace_id);
            let about = |message: &str| {
                lines
                    .iter()
                    .any(|l| l["fields"]["message"].as_str() == Some(message))
            };
            (about("order placed") && about("confirmation mail accepted")).then_some(lines)
        },
    )
    .await;
    let mail_line = lines
        .iter()
        .find(|l| l["fields"]["message"] == "confirmation mail accepted")
        .unwrap();
    assert_eq!(mail_line["span"]["name"], "mail.send", "{mail_line}");
    assert_eq!(mail_line["span"]["trace_id"], trace_id, "{mail_line}");
    assert_eq!(mail_line["span"]["group"], "mail-service", "{mail_line}");
    // The send is a child of the order's span, and the mail names the send.
    use outbox_relay::trace_context::TraceParent;
    let mail_traceparent = mail
        .raw
        .lines()
        .find_map(|l| l.strip_prefix("Traceparent: "))
        .unwrap()
        .trim();
    assert_eq!(
        mail_line["span"]["span_id"],
        TraceParent::parse(mail_traceparent).unwrap().span_id(),
        "{mail_line}"
    );
    assert_eq!(
        mail_line["span"]["parent_span_id"],
        TraceParent::parse(&answered).unwrap().span_id(),
        "{mail_line}"
    );

    // A group that committed nothing but offset 0 lags by time.
    client
        .execute(
            "INSERT INTO group_partitions (group_id, topic, partition, committed_offset)
             SELECT 'audit', topic, partition, 0 FROM partition_heads WHERE topic = 'order-created'",
            &[],
        )
        .await
        .unwrap();

    // Counters and histograms of the work done.
    value_until(&prometheus, "sum(outbox_relay_mail_sent_total)", |v| {
        v == 6.0
    })
    .await;
    value_until(
        &prometheus,
        "sum(outbox_relay_order_to_mail_seconds_count)",
        |v| v == 6.0,
    )
    .await;
    value_until(
        &prometheus,
        "sum(outbox_relay_mail_send_duration_seconds_count)",
        |v| v == 7.0,
    )
    .await;
    value_until(
        &prometheus,
        r#"sum(outbox_relay_http_request_duration_seconds_count{route="/orders",method="POST"})"#,
        |v| v == 6.0,
    )
    .await;
    value_until(
        &prometheus,
        r#"sum(outbox_relay_mail_failed_total{kind="transient"})"#,
        |v| v == 0.0,
    )
    .await;
    // Database-derived gauges.
    value_until(
        &prometheus,
        r#"max(outbox_relay_consumer_group_lag_seconds{group="mail-service"})"#,
        |v| v == 0.0,
    )
    .await;
    value_until(
        &prometheus,
        r#"max(outbox_relay_consumer_group_lag_seconds{group="audit"})"#,
        |v| v > 0.0,
    )
    .await;
    value_until(
        &prometheus,
        r#"sum(outbox_relay_consumer_committed_offset{group="mail-service"})
           - sum(outbox_relay_log_end_offset{topic="order-created"})"#,
        |v| v == 0.0,
    )
    .await;
    value_until(
        &prometheus,
        r#"count(outbox_relay_log_start_offset{topic="order-created"} == 0)"#,
        |v| v == 8.0,
    )
    .await;
    value_until(
        &prometheus,
        r#"max(outbox_relay_consumer_group_members{group="mail-service"})"#,
        |v| v == 1.0,
    )
    .await;
    value_until(
        &prometheus,
        r#"sum(outbox_relay_consumer_group_rebalances_total{group="mail-service"})"#,
        |v| v >= 1.0,
    )
    .await;
    value_until(&prometheus, "max(outbox_relay_relay_leader_alive)", |v| {
        v == 1.0
    })
    .await;
    value_until(
        &prometheus,
        "max(outbox_relay_outbox_oldest_age_seconds)",
        |v| v == 0.0,
    )
    .await;
    value_until(&prometheus, "max(outbox_relay_dead_letters)", |v| v == 1.0).await;

    // The shipped alert on dead letters fires; the others stay quiet.
    let firing = eventually(
        "OutboxRelayDeadLetters to fire",
        Duration::from_secs(30),
        || async {
            let alerts = prometheus.api("alerts", &[]).await?;
            let firing: Vec<String> = alerts["data"]["alerts"]
                .as_array()?
                .iter()
                .filter(|a| a["state"] == "firing")
                .map(|a| a["labels"]["alertname"].as_str().unwrap().to_string())
                .collect();
            firing
                .contains(&"OutboxRelayDeadLetters".to_string())
                .then_some(firing)
        },
    )
    .await;
    assert_eq!(firing, ["OutboxRelayDeadLetters"]);
    // Every rule evaluated without error.
    let rules = prometheus.api("rules", &[]).await.unwrap();
    let rules: Vec<&Value> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(rules.len(), 9);
    for rule in rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }

    // Every dashboard query answers, with data (a ratio of 5xx has none
    // while no request failed). The Kafka and webhook rows need their
    // roles: their tests check them.
    dashboard_panels_answer(
        &prometheus,
        |panel| !panel.starts_with("Kafka") && !panel.starts_with("Webhooks"),
        "5..",
    )
    .await;
    serve.child.kill().await.unwrap();
}

/// A process without the api role is scraped on `--metrics-addr`, which
/// serves the operational endpoints and not the order API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_process_serves_metrics_on_its_metrics_address() {
    let db = TestDb::migrated().await;
    let port = free_port();
    let _relay = binary(&db)
        .args(["serve", "--roles", "relay"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let metrics = eventually(
        "the relay to lead and say so on /metrics",
        Duration::from_secs(30),
        || async {
            let body = reqwest::get(format!("{base}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            body.lines()
                .any(|l| l == "outbox_relay_is_leader 1")
                .then_some(body)
        },
    )
    .await;
    assert!(
        metrics.contains("outbox_relay_relay_leader_alive 1"),
        "{metrics}"
    );
    let orders = reqwest::Client::new()
        .post(format!("{base}/orders"))
        .header("content-type", "application/json")
        .body(json!({"user_id": 1, "email": "a@example.com", "amount": 1}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(orders.status(), reqwest::StatusCode::NOT_FOUND);
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
}
