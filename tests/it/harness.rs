//! Test harness: a private Postgres cluster per test run (fsync off), a
//! fresh migrated database per test, and helpers that poll with a deadline.
//!
//! Set `TEST_DATABASE_URL` (an admin URL, e.g. postgres://postgres@127.0.0.1/postgres)
//! to use an existing server instead of the private cluster.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use outbox_relay::embedded::{ClusterOptions, EmbeddedPostgres};
use outbox_relay::relay::{Relay, RelayConfig, StepOutcome};
use tokio_postgres::Client;

/// Admin URL of the server tests create their databases in.
///
/// Without `TEST_DATABASE_URL`, each test process starts a private cluster
/// of its own in `target/tmp/test-postgres-<pid>` (fsync off) and a detached
/// watcher stops it and deletes it when the process exits: a run leaves no
/// server running and nothing on disk. Clusters of runs that were killed
/// before their watcher ran are removed at the next start.
fn admin_url() -> &'static str {
    static ADMIN: OnceLock<String> = OnceLock::new();
    ADMIN.get_or_init(|| {
        if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
            return url;
        }
        let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        discard_stale_clusters(tmp);
        let options = ClusterOptions {
            data_dir: tmp.join(format!("test-postgres-{}", std::process::id())),
            durable: false,
            extra_settings: vec!["max_connections = 400".into()],
        };
        let cluster = EmbeddedPostgres::start(&options).expect("start the private test cluster");
        cluster
            .discard_after_exit_of(std::process::id())
            .expect("watch the test cluster");
        cluster.url("postgres")
    })
}

/// Removes test clusters whose process is gone (and the single shared
/// `test-postgres` of earlier versions of this harness).
fn discard_stale_clusters(tmp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let stale = match name.strip_prefix("test-postgres") {
            Some("") => true,
            Some(pid) => pid
                .strip_prefix('-')
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()),
            None => false,
        };
        if stale {
            let _ = EmbeddedPostgres::discard_stale(&entry.path());
        }
    }
}

/// A fresh database for one test.
pub struct TestDb {
    pub url: String,
}

impl TestDb {
    /// A new, empty database (not migrated).
    pub async fn empty() -> TestDb {
        let admin = admin_url().to_string();
        let name = format!("it_{:016x}", rand::random::<u64>());
        let client = outbox_relay::db::connect(&admin)
            .await
            .expect("connect admin");
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create test database");
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_string())
            .unwrap_or(admin.clone());
        TestDb {
            url: format!("{base}/{name}"),
        }
    }

    /// A new database with the schema applied.
    pub async fn migrated() -> TestDb {
        let db = TestDb::empty().await;
        outbox_relay::migrate::apply_all(&db.url)
            .await
            .expect("migrate");
        db
    }

    pub async fn client(&self) -> Client {
        outbox_relay::db::connect(&self.url)
            .await
            .expect("connect test db")
    }

    pub fn pool(&self, size: usize) -> deadpool_postgres::Pool {
        outbox_relay::db::pool(&self.url, size).expect("pool")
    }

    /// A relay with fast leases for tests.
    pub fn relay(&self) -> Relay {
        Relay::new(&self.url, fast_relay_config())
    }
}

pub fn fast_relay_config() -> RelayConfig {
    RelayConfig {
        lease_ttl: Duration::from_millis(1500),
        standby_poll: Duration::from_millis(50),
        min_batch: 64,
        max_batch: 4096,
        ..RelayConfig::default()
    }
}

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Steps `relay` until it reports idle (everything visible is moved).
pub async fn drain(relay: &mut Relay) {
    drain_as(relay, false).await
}

/// [`drain`] as a relay woken before every step (see `Relay::step_woken`).
pub async fn drain_woken(relay: &mut Relay) {
    drain_as(relay, true).await
}

async fn drain_as(relay: &mut Relay, woken: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let step = if woken {
            relay.step_woken().await
        } else {
            relay.step().await
        };
        match step.expect("relay step") {
            StepOutcome::Idle => return,
            StepOutcome::Standby => panic!("relay could not take the lease"),
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay did not drain within 60 s"
        );
    }
}

/// The first column of every row of `sql`.
pub async fn column<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    client: &Client,
    sql: &str,
) -> Vec<T> {
    client
        .query(sql, &[])
        .await
        .expect(sql)
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Number of rows of a query returning one bigint.
pub async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Inserts one outbox row in its own committed transaction.
pub async fn insert_event(client: &Client, topic: &str, key: &str, payload: serde_json::Value) {
    client
        .execute(
            outbox_relay::outbox::INSERT_OUTBOX,
            &[&topic, &Some(key), &payload, &serde_json::json!({})],
        )
        .await
        .expect("insert outbox row");
}

/// Asserts every partition of `topic` holds offsets 0..log_end_offset with
/// no gap or duplicate, and each outbox row appears exactly once.
pub async fn assert_log_consistent(client: &Client, topic: &str) {
    let rows = client
        .query(
            "SELECT h.partition, h.log_end_offset,
                    (SELECT count(*) FROM event_log e WHERE e.topic = h.topic AND e.partition = h.partition),
                    (SELECT count(DISTINCT \"offset\") FROM event_log e WHERE e.topic = h.topic AND e.partition = h.partition),
                    (SELECT coalesce(max(\"offset\"), -1) FROM event_log e WHERE e.topic = h.topic AND e.partition = h.partition),
                    (SELECT coalesce(min(\"offset\"), 0) FROM event_log e WHERE e.topic = h.topic AND e.partition = h.partition)
               FROM partition_heads h WHERE h.topic = $1 ORDER BY h.partition",
            &[&topic],
        )
        .await
        .unwrap();
    for row in rows {
        let (partition, end, n, distinct, max, min): (i32, i64, i64, i64, i64, i64) = (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
        );
        assert_eq!(
            n, end,
            "partition {partition}: {n} records but log end offset {end}"
        );
        assert_eq!(distinct, n, "partition {partition}: duplicate offsets");
        assert_eq!(min, 0, "partition {partition}: does not start at 0");
        assert_eq!(max, end - 1, "partition {partition}: offsets have a gap");
    }
    let duplicated = count(
        client,
        "SELECT count(*) FROM (SELECT outbox_id FROM event_log GROUP BY outbox_id HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(
        duplicated, 0,
        "some outbox rows were appended more than once"
    );
}

/// A TCP port nothing listens on now (for a server a test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `group`'s committed offsets reach the log end of every
/// partition of `topic` (an empty partition needs no commit).
pub async fn wait_until_group_caught_up(db: &TestDb, group: &str, topic: &str) {
    let client = db.client().await;
    eventually(
        &format!("group {group} to commit up to the log end of {topic}"),
        Duration::from_secs(30),
        || async {
            let behind: i64 = client
                .query_one(
                    "SELECT count(*) FROM partition_heads h
                       LEFT JOIN group_partitions p
                         ON p.group_id = $1 AND p.topic = h.topic AND p.partition = h.partition
                      WHERE h.topic = $2 AND coalesce(p.committed_offset, h.log_start_offset) < h.log_end_offset",
                    &[&group, &topic],
                )
                .await
                .unwrap()
                .get(0);
            (behind == 0).then_some(())
        },
    )
    .await;
}

/// A pipeline started in this test's process by the application builder
/// (the one `serve` and `demo` use); its roles stop when it is dropped.
pub struct InProcess {
    /// The order API's address, with the api role.
    pub api: Option<std::net::SocketAddr>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl InProcess {
    pub async fn start(db: &TestDb, settings: outbox_relay::builder::Settings) -> InProcess {
        let application = outbox_relay::builder::Application::start(settings, &db.url)
            .await
            .expect("the pipeline starts");
        let api = application.api_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(application.run_until(async {
            let _ = stopped.await;
        }));
        InProcess { api, _stop: stop }
    }

    /// The order API (with `/metrics`) alone, on a free port.
    pub async fn api(db: &TestDb) -> InProcess {
        let listener = outbox_relay::builder::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let settings = outbox_relay::builder::Settings {
            api: Some(listener),
            ..Default::default()
        };
        InProcess::start(db, settings).await
    }

    /// `http://<the API's address>`.
    pub fn base(&self) -> String {
        format!("http://{}", self.api.expect("started with the api role"))
    }
}

/// The binary with `db` as its database, for a test that needs a process
/// of its own (a signal, kill -9, its output): `RUST_LOG=warn` unless the
/// test says otherwise, killed when dropped.
pub fn binary(db: &TestDb) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    command
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    command
}
