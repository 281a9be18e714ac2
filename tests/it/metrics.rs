//! `/metrics` scraped by a real Prometheus server (Debian package
//! `prometheus`, installed by .ci/run).

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

/// A Prometheus server scraping `target` every 200 ms.
pub struct Prometheus {
    child: tokio::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    pub async fn start(target: &str) -> Prometheus {
        Prometheus::start_with_rules(target, None).await
    }

    /// Also evaluating the alerting rules in `rules` every second.
    pub async fn start_with_rules(target: &str, rules: Option<&std::path::Path>) -> Prometheus {
        let port = free_port();
        let dir =
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("prometheus-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 200ms\n  evaluation_interval: 1s\n{}\
                 scrape_configs:\n  - job_name: outbox-relay\n    static_configs:\n      - targets: ['{target}']\n",
                rules.map_or(String::new(), |r| format!("rule_files:\n  - {}\n", r.display()))
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus (apt-get install prometheus)");
        Prometheus { child, port, dir }
    }

    /// Polls `query` until it has a value, failing the test after `secs`.
    pub async fn value_within(&self, query: &str, secs: u64) -> f64 {
        eventually(
            &format!("Prometheus to answer {query}"),
            Duration::from_secs(secs),
            || self.value(query),
        )
        .await
    }

    /// The whole answer to an instant query (None while Prometheus is not up).
    pub async fn query(&self, query: &str) -> Option<Value> {
        self.api("query", &[("query", query)]).await
    }

    /// `GET /api/v1/{path}`.
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}/api/v1/{path}", self.port);
        reqwest::Client::new()
            .get(url)
            .query(params)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// The value of an instant query's first series, once there is one.
    pub async fn value(&self, query: &str) -> Option<f64> {
        let answer = self.query(query).await?;
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_relay_api_and_lag_metrics() {
    let db = TestDb::migrated().await;
    // Counters are per process and the tests share one: this test's own
    // topic and group make its series its own.
    let topic = format!("metrics-{:x}", rand::random::<u32>());
    let group = format!("lagging-{topic}");
    let mut client = db.client().await;
    outbox_relay::log::create_topic(&mut client, &topic, 1, Duration::from_secs(86_400))
        .await
        .unwrap();
    let pipeline = InProcess::api(&db).await;
    let api = pipeline.api.unwrap();
    let answer = reqwest::Client::new()
        .post(format!("http://{api}/orders"))
        .header("content-type", "application/json")
        .body(json!({"user_id": 1, "email": "m@example.com", "amount": 5}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::CREATED);
    for key in ["a", "b"] {
        insert_event(&client, &topic, key, json!({})).await;
    }
    let mut relay = db.relay();
    drain(&mut relay).await;
    // A group that never committed lags by everything retained.
    client
        .execute(
            "INSERT INTO group_partitions (group_id, topic, partition) VALUES ($1, $2, 0)",
            &[&group, &topic],
        )
        .await
        .unwrap();

    // Parallel scrapes each see every database series.
    let scrapes = futures_util::future::join_all((0..16).map(|_| async {
        reqwest::get(format!("http://{api}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }))
    .await;
    for body in &scrapes {
        let series = format!("outbox_relay_log_end_offset{{partition=\"0\",topic=\"{topic}\"}} 2");
        assert!(body.contains(&series), "a scrape lacks {series}");
        assert!(body.contains("outbox_relay_database_up 1"));
    }

    let mut prometheus = Prometheus::start(&api.to_string()).await;
    let appended = prometheus
        .value_within(
            &format!("sum(outbox_relay_appended_total{{topic=\"{topic}\"}})"),
            60,
        )
        .await;
    assert_eq!(appended, 2.0, "two records appended to this topic");
    let lag = prometheus
        .value_within(
            &format!("sum(outbox_relay_consumer_group_lag{{group=\"{group}\"}})"),
            30,
        )
        .await;
    assert_eq!(lag, 2.0, "nothing committed: the lag is the whole log");
    // Shared with the other tests in this process: at least this test's order.
    let created = prometheus
        .value_within(
            "sum(outbox_relay_http_requests_total{route=\"/orders\",status=\"201\"})",
            30,
        )
        .await;
    assert!(created >= 1.0);
    let _ = prometheus.child.kill().await;
}
