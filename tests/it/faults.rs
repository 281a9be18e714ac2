//! The fault-injection suite: the real binary as separate processes (order
//! API, two relays, two mail members) against a private Postgres cluster of
//! its own (durable commits) and a real SMTP server, under a steady order
//! load through `POST /orders`, with one fault per scenario. An independent
//! checker then reads the database and the SMTP server's mailbox:
//!
//! * every order answered `201` is in the log exactly once, and every order
//!   in the database is (nothing lost, nothing made up);
//! * offsets are gapless in every partition, and events of one key are in
//!   the order they were written (a second writer, plain SQL, writes
//!   numbered events over a few keys);
//! * every order got its mail; a second mail for an order is allowed only
//!   where the scenario killed or froze a mail member (the documented
//!   window), and then carries the same Message-ID;
//! * the pipeline catches up (group lag 0, every mail out) within a bound
//!   after the fault ends, and no process died that the scenario did not
//!   kill.
//!
//! The scenarios run one after another (some restart Postgres) in one test.
//! `FAULT_SOAK=1` runs each scenario five times as long; `FAULT_ONLY=text`
//! only the scenarios whose name contains it; `FAULT_REPORT=path` writes the
//! results as a Markdown table (docs/faults.md is made so).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_relay::embedded::{ClusterOptions, EmbeddedPostgres, ShutdownMode};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::harness::{eventually, free_port};
use crate::smtp::SmtpServer;

/// Orders per second of the steady load.
const ORDERS_PER_SECOND: u64 = 120;
/// Relay lease of the relay processes (a frozen leader is replaced after it).
const LEASE_SECS: &str = "1";
/// Group session timeout of the mail members.
const SESSION_SECS: &str = "3";
/// After the fault ends: at most this long until everything is delivered.
const RECOVERY_BOUND: Duration = Duration::from_secs(90);

/// One process of the binary.
struct Role {
    name: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
}

impl Role {
    async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running")
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    async fn kill9(&mut self) {
        self.signal("KILL");
        let _ = self.child.take().unwrap().wait().await;
    }

    /// Exited on its own (it was not killed by the scenario)?
    fn died(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited with {status}; its log: {}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )),
            _ => None,
        }
    }
}

/// The scenario's world: a database in the fault cluster, the processes,
/// the SMTP server.
struct World {
    cluster: Arc<EmbeddedPostgres>,
    url: String,
    api: Role,
    relays: Vec<Role>,
    mails: Vec<Role>,
    smtp: SmtpServer,
    http: String,
}

impl World {
    async fn new(cluster: Arc<EmbeddedPostgres>, smtp_options: &[&str]) -> World {
        let name = format!("faults_{:08x}", rand::random::<u32>());
        let admin = outbox_relay::db::connect(&cluster.url("postgres"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = cluster.url(&name);
        outbox_relay::migrate::apply_all(&url).await.unwrap();
        let client = outbox_relay::db::connect(&url).await.unwrap();
        outbox_relay::log::create_topic(
            &mut { client },
            "sequence-check",
            4,
            Duration::from_secs(86_400),
        )
        .await
        .unwrap();
        let smtp = SmtpServer::start(smtp_options).await;
        let port = free_port();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let env = vec![
            ("DATABASE_URL".to_string(), url.clone()),
            ("SMTP_URL".to_string(), smtp.url()),
        ];
        let role = |name: &'static str, args: &[&str]| Role {
            name,
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.clone(),
            child: None,
            log: dir.join(format!("{name}.log")),
        };
        let mail_args = |id: &'static str| {
            let mut args = vec![
                "serve",
                "--roles",
                "mail",
                "--no-migrate",
                "--session-timeout-secs",
                SESSION_SECS,
                "--smtp-timeout-secs",
                "2",
                "--smtp-final-reply-timeout-secs",
                "10",
                "--mail-retry-for",
                "10m",
            ];
            args.extend(["--group-instance-id", id]);
            args
        };
        let mut world = World {
            api: role(
                "api",
                &[
                    "serve",
                    "--roles",
                    "api",
                    "--no-migrate",
                    "--http-addr",
                    &format!("127.0.0.1:{port}"),
                ],
            ),
            relays: vec![
                role(
                    "relay-1",
                    &[
                        "serve",
                        "--roles",
                        "relay",
                        "--no-migrate",
                        "--relay-lease-secs",
                        LEASE_SECS,
                    ],
                ),
                role(
                    "relay-2",
                    &[
                        "serve",
                        "--roles",
                        "relay",
                        "--no-migrate",
                        "--relay-lease-secs",
                        LEASE_SECS,
                    ],
                ),
            ],
            mails: vec![
                role("mail-1", &mail_args("mail-1")),
                role("mail-2", &mail_args("mail-2")),
            ],
            http: format!("http://127.0.0.1:{port}"),
            cluster,
            url,
            smtp,
        };
        world.api.start().await;
        for role in world.relays.iter_mut().chain(world.mails.iter_mut()) {
            role.start().await;
        }
        let http = reqwest::Client::new();
        let ready = format!("{}/readyz", world.http);
        eventually("the API to be ready", Duration::from_secs(30), || async {
            http.get(&ready)
                .send()
                .await
                .ok()?
                .status()
                .is_success()
                .then_some(())
        })
        .await;
        world
    }

    async fn client(&self) -> Client {
        outbox_relay::db::connect(&self.url).await.unwrap()
    }

    /// The relay process holding the lease.
    async fn relay_leader(&self) -> usize {
        let client = self.client().await;
        eventually("a relay leader", Duration::from_secs(30), || async {
            let holder: Option<String> = client
                .query_one(
                    "SELECT holder FROM relay_state WHERE lease_expires_at > now()",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            let pid: u32 = holder?.rsplit('-').nth(1)?.parse().ok()?;
            self.relays
                .iter()
                .position(|r| r.child.as_ref().and_then(|c| c.id()) == Some(pid))
        })
        .await
    }

    /// Sum of every partition's log end offset of `order-created`.
    async fn log_end(client: &Client) -> Option<i64> {
        client
            .query_one(
                "SELECT coalesce(sum(log_end_offset), 0)::int8 FROM partition_heads WHERE topic = 'order-created'",
                &[],
            )
            .await
            .ok()
            .map(|r| r.get(0))
    }
}

/// What the load saw.
#[derive(Default)]
struct Placed {
    /// Order ids answered 201.
    created: Vec<i64>,
    /// Requests with no answer, or a 500 (the order may or may not exist).
    unanswered: u64,
    /// The `user_id`s of requests refused with a 4xx or a 503: nothing may
    /// have been written for them.
    refused: Vec<i64>,
    /// `sequence-check` events whose commit returned (key, seq).
    sequenced: Vec<(String, i64)>,
    /// How long the load ran.
    held: Duration,
}

/// How one order request ended.
enum Answer {
    Created(i64),
    /// Refused before anything was written (4xx, or 503: no connection).
    Refused(i64),
    Unanswered,
}

/// Places orders at a steady rate, and numbered events over 8 keys through
/// plain SQL, until `stop` fires.
fn start_load(
    world: &World,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Placed> {
    let base = world.http.clone();
    let url = world.url.clone();
    tokio::spawn(async move {
        let sequenced = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let (sequenced, mut stop) = (sequenced.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seq = 0i64;
                let mut client: Option<Client> = None;
                while !*stop.borrow() {
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        client = outbox_relay::db::connect(&url).await.ok();
                    }
                    if let Some(c) = &client {
                        let key = format!("k{}", seq % 8);
                        let wrote = c
                            .execute(
                                "INSERT INTO outbox (topic, key, payload)
                                 VALUES ('sequence-check', $1, jsonb_build_object('seq', $2::int8))",
                                &[&key, &seq],
                            )
                            .await;
                        if wrote.is_ok() {
                            sequenced.lock().unwrap().push((key, seq));
                        }
                        seq += 1;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = stop.changed() => {}
                    }
                }
            })
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut placed = Placed::default();
        let tally = |answer: Answer, placed: &mut Placed| match answer {
            Answer::Created(id) => placed.created.push(id),
            Answer::Refused(user_id) => placed.refused.push(user_id),
            Answer::Unanswered => placed.unanswered += 1,
        };
        let started = Instant::now();
        let mut interval =
            tokio::time::interval(Duration::from_micros(1_000_000 / ORDERS_PER_SECOND));
        let mut requests = tokio::task::JoinSet::new();
        let mut n = 0u64;
        while !*stop.borrow() {
            interval.tick().await;
            n += 1;
            let (http, base) = (http.clone(), base.clone());
            requests.spawn(async move {
                let body = serde_json::json!({
                    "user_id": n, "email": format!("buyer{n}@example.com"), "amount": 100 + n
                });
                let answer = http
                    .post(format!("{base}/orders"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status() == reqwest::StatusCode::CREATED => {
                        match r
                            .json::<serde_json::Value>()
                            .await
                            .ok()
                            .and_then(|v| v["order_id"].as_i64())
                        {
                            Some(id) => Answer::Created(id),
                            None => Answer::Unanswered,
                        }
                    }
                    Ok(r)
                        if r.status().is_client_error()
                            || r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE =>
                    {
                        Answer::Refused(n as i64)
                    }
                    Ok(_) | Err(_) => Answer::Unanswered,
                }
            });
            while let Some(done) = requests.try_join_next() {
                tally(done.unwrap_or(Answer::Unanswered), &mut placed);
            }
        }
        placed.held = started.elapsed();
        while let Some(done) = requests.join_next().await {
            tally(done.unwrap_or(Answer::Unanswered), &mut placed);
        }
        let _ = writer.await;
        placed.sequenced = std::mem::take(&mut *sequenced.lock().unwrap());
        placed
    })
}

/// The faults, one per scenario.
#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    KillRelayLeader,
    FreezeRelayLeader,
    KillMailMember,
    FreezeMailMember,
    RestartPostgres(ShutdownMode),
    PostgresOutage,
    SmtpDown,
    SmtpTempfail,
    SmtpSlowAnswer,
    WriterHeldOpen,
    GarbageAndFuzz,
    OddRows,
    KillApi,
    FreezeApi,
    SmtpHangs,
    ConnectionExhaustion,
    Burst,
}

struct Scenario {
    name: &'static str,
    fault: Fault,
    /// What may explain a second mail for an order, if anything.
    duplicates_explained_by: Option<&'static str>,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "steady load, no fault",
        fault: Fault::None,
        duplicates_explained_by: None,
    },
    Scenario {
        name: "kill -9 the relay leader",
        fault: Fault::KillRelayLeader,
        duplicates_explained_by: None,
    },
    Scenario {
        name: "SIGSTOP the relay leader mid-batch for 6 s",
        fault: Fault::FreezeRelayLeader,
        duplicates_explained_by: None,
    },
    Scenario {
        name: "kill -9 a mail member, restart it (same instance id)",
        fault: Fault::KillMailMember,
        duplicates_explained_by: Some(
            "member killed between the SMTP server's 250 and the ledger write",
        ),
    },
    Scenario {
        name: "SIGSTOP a mail member past its session (6 s)",
        fault: Fault::FreezeMailMember,
        duplicates_explained_by: Some("member frozen with mails in flight, treated as crashed"),
    },
    Scenario {
        name: "Postgres restarted (immediate)",
        fault: Fault::RestartPostgres(ShutdownMode::Immediate),
        duplicates_explained_by: None,
    },
    Scenario {
        name: "Postgres restarted (fast)",
        fault: Fault::RestartPostgres(ShutdownMode::Fast),
        duplicates_explained_by: None,
    },
    Scenario {
        name: "Postgres down for 8 s",
        fault: Fault::PostgresOutage,
        duplicates_explained_by: None,
    },
    Scenario {
        name: "SMTP server down for 5 s",
        fault: Fault::SmtpDown,
        duplicates_explained_by: Some(
            "SMTP server killed after taking a message, before its answer (unknown outcome)",
        ),
    },
    Scenario {
        name: "SMTP answers 451 for 5 s",
        fault: Fault::SmtpTempfail,
        duplicates_explained_by: Some(
            "SMTP server killed after taking a message, before its answer (unknown outcome)",
        ),
    },
    Scenario {
        name: "SMTP answers 3 s late (command limit 2 s)",
        fault: Fault::SmtpSlowAnswer,
        duplicates_explained_by: Some(
            "SMTP server killed after taking a message, before its answer (unknown outcome)",
        ),
    },
    Scenario {
        name: "a writer holds its transaction open 10 s",
        fault: Fault::WriterHeldOpen,
        duplicates_explained_by: None,
    },
    Scenario {
        name: "garbage outbox rows and HTTP fuzz",
        fault: Fault::GarbageAndFuzz,
        duplicates_explained_by: None,
    },
    Scenario {
        name: "odd rows: the issue's 6,400-byte key, keys and payloads at the limits",
        fault: Fault::OddRows,
        duplicates_explained_by: None,
    },
    Scenario {
        name: "kill -9 the API, restart it",
        fault: Fault::KillApi,
        duplicates_explained_by: None,
    },
    Scenario {
        name: "SIGSTOP the API for 5 s",
        fault: Fault::FreezeApi,
        duplicates_explained_by: None,
    },
    Scenario {
        name: "SMTP server takes messages and never answers, 6 s",
        fault: Fault::SmtpHangs,
        duplicates_explained_by: Some(
            "SMTP server killed after taking a message, before its answer (unknown outcome)",
        ),
    },
    Scenario {
        name: "Postgres connections exhausted for 5 s",
        fault: Fault::ConnectionExhaustion,
        duplicates_explained_by: None,
    },
    Scenario {
        name: "2,000 concurrent POST /orders",
        fault: Fault::Burst,
        duplicates_explained_by: None,
    },
];

/// What the fault left to check and report.
#[derive(Default)]
struct FaultNotes {
    /// The longest the log end stood still while the load ran.
    longest_stall: Option<Duration>,
    /// Processes the scenario killed (restarted since).
    killed: Vec<&'static str>,
    /// Garbage rows written (parked as dead letters, or in outbox_parked).
    garbage_records: i64,
    garbage_unknown_topic: i64,
    /// Events for orders outside `orders` written as odd outbox rows: each
    /// must be mailed exactly once.
    odd_orders: Vec<i64>,
    /// Orders the fault placed itself (a burst): answered 201, and the
    /// `user_id`s of those refused.
    created: Vec<i64>,
    refused: Vec<i64>,
    /// How long the database was away (stopped until it accepted again).
    database_away: Option<Duration>,
    notes: Vec<String>,
}

/// Samples the log end every 50 ms for `span`; returns the longest time it
/// did not grow.
async fn longest_stall(client: &Client, span: Duration) -> Duration {
    let end = Instant::now() + span;
    let mut last = World::log_end(client).await.unwrap_or(0);
    let mut since = Instant::now();
    let mut longest = Duration::ZERO;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(now) = World::log_end(client).await {
            if now > last {
                last = now;
                since = Instant::now();
            }
        }
        longest = longest.max(since.elapsed());
    }
    longest
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn inject(fault: Fault, world: &mut World, scale: u32) -> FaultNotes {
    let mut notes = FaultNotes::default();
    let observer = world.client().await;
    match fault {
        Fault::None => {}
        Fault::KillRelayLeader => {
            let leader = world.relay_leader().await;
            world.relays[leader].kill9().await;
            notes.killed.push(world.relays[leader].name);
            notes.longest_stall = Some(longest_stall(&observer, Duration::from_secs(4)).await);
            world.relays[leader].start().await;
        }
        Fault::FreezeRelayLeader => {
            // Catch the leader inside a batch transaction, then freeze it:
            // on the connection the lease records, or on the second one
            // (a drain's batch written ahead holds the lease row's lock
            // there), found as the relay's takeover finds it.
            let frozen = eventually(
                "the relay leader frozen inside a transaction",
                Duration::from_secs(30),
                || async {
                    let leader = world.relay_leader().await;
                    world.relays[leader].signal("STOP");
                    let in_transaction: bool = observer
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM relay_state r JOIN pg_stat_activity a
                                               ON a.pid = r.holder_pid
                                               OR a.pid IN (SELECT l.pid FROM pg_locks l
                                                             WHERE l.locktype = 'transactionid'
                                                               AND l.transactionid = r.xmax AND l.granted)
                                             WHERE a.xact_start IS NOT NULL)",
                            &[],
                        )
                        .await
                        .ok()?
                        .get(0);
                    if in_transaction {
                        Some(leader)
                    } else {
                        world.relays[leader].signal("CONT");
                        tokio::time::sleep(Duration::from_millis(7)).await;
                        None
                    }
                },
            )
            .await;
            let stall = longest_stall(&observer, Duration::from_secs(6)).await;
            world.relays[frozen].signal("CONT");
            notes.longest_stall = Some(stall);
            let bound = Duration::from_secs(4);
            assert!(
                stall <= bound,
                "the log stood still {stall:?} behind a frozen leader (bound {bound:?}, lease {LEASE_SECS} s)"
            );
        }
        Fault::KillMailMember => {
            world.mails[0].kill9().await;
            notes.killed.push(world.mails[0].name);
            world.mails[0].start().await;
        }
        Fault::FreezeMailMember => {
            world.mails[0].signal("STOP");
            tokio::time::sleep(Duration::from_secs(6)).await;
            world.mails[0].signal("CONT");
        }
        Fault::RestartPostgres(mode) => {
            let cluster = world.cluster.clone();
            let away = Instant::now();
            blocking(move || {
                cluster.stop_with(mode).unwrap();
                cluster.start_again().unwrap();
            })
            .await;
            notes.database_away = Some(away.elapsed());
        }
        Fault::PostgresOutage => {
            let cluster = world.cluster.clone();
            let away = Instant::now();
            blocking(move || cluster.stop_with(ShutdownMode::Fast).unwrap()).await;
            tokio::time::sleep(Duration::from_secs(8)).await;
            let cluster = world.cluster.clone();
            blocking(move || cluster.start_again().unwrap()).await;
            notes.database_away = Some(away.elapsed());
        }
        Fault::SmtpDown => {
            world.smtp.stop().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            world.smtp.restart().await;
        }
        Fault::SmtpTempfail => {
            world.smtp.restart_with(&["--tempfail-seconds", "5"]).await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            world.smtp.restart_with(&[]).await;
        }
        Fault::SmtpSlowAnswer => {
            world.smtp.restart_with(&["--delay-ms", "3000"]).await;
            tokio::time::sleep(Duration::from_secs(6 * scale as u64)).await;
            world.smtp.restart_with(&[]).await;
        }
        Fault::WriterHeldOpen => {
            let mut writer = world.client().await;
            let held = writer.transaction().await.unwrap();
            held.execute(
                "INSERT INTO outbox (topic, key, payload) VALUES ('sequence-check', 'held', '{\"seq\": -1}')",
                &[],
            )
            .await
            .unwrap();
            let stall = longest_stall(&observer, Duration::from_secs(10) * scale).await;
            held.commit().await.unwrap();
            notes.longest_stall = Some(stall);
            assert!(
                stall <= Duration::from_secs(2),
                "an open writer stalled the log {stall:?}"
            );
            notes
                .notes
                .push("the held row is relayed once it commits".into());
        }
        Fault::GarbageAndFuzz => {
            observer
                .batch_execute(
                    "INSERT INTO outbox (topic, key, payload) VALUES
                       ('order-created', 'g1', '[424242, 1, 99, \"array@example.com\"]'),
                       ('order-created', 'g2', '{\"order_id\": 1}'),
                       ('order-created', 'g3', '\"just a string\"'),
                       ('no-such-topic', 'g4', '{}')",
                )
                .await
                .unwrap();
            notes.garbage_records = 3;
            notes.garbage_unknown_topic = 1;
            let http = reqwest::Client::new();
            let bodies: &[(&str, &[u8])] = &[
                ("application/json", b"{"),
                ("application/json", b"[]"),
                ("application/json", b"{\"user_id\": -1, \"email\": \"x\", \"amount\": 1}"),
                ("application/json", &[0xff, 0xfe, 0x00]),
                ("text/plain", b"hello"),
                ("application/json", b"{\"user_id\": 1, \"email\": \"a@example.com\\r\\nBcc: b@example.com\", \"amount\": 1}"),
            ];
            for round in 0..20 {
                let (content_type, body) = bodies[round % bodies.len()];
                let answer = http
                    .post(format!("{}/orders", world.http))
                    .header("content-type", content_type)
                    .body(body.to_vec())
                    .send()
                    .await
                    .unwrap();
                assert!(
                    answer.status().is_client_error(),
                    "fuzz answered {}",
                    answer.status()
                );
                let error: serde_json::Value = answer.json().await.unwrap();
                assert!(error["error"]["code"].is_string(), "{error}");
            }
        }
        Fault::OddRows => {
            // The issue's reproduction, refused at the door now.
            let refused = observer
                .batch_execute(
                    "INSERT INTO outbox (topic, key, payload) SELECT 'order-created',
                       (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 200)),
                       '{\"order_id\": 900000100, \"user_id\": 1, \"amount\": 5, \"email\": \"hugekey@example.com\"}'",
                )
                .await
                .unwrap_err();
            let constraint = refused.as_db_error().and_then(|e| e.constraint());
            assert_eq!(constraint, Some("outbox_key_at_most_1024_bytes"));
            let order = |id: i64| serde_json::json!({"order_id": id, "user_id": 1, "amount": 5, "email": format!("odd{id}@example.com")});
            let mut padded = order(900_000_104);
            padded["pad"] = serde_json::json!(
                "x".repeat(outbox_relay::outbox::limits::PAYLOAD_MAX_BYTES - 200)
            );
            let rows = [
                ("é".repeat(512), order(900_000_101)),
                (String::new(), order(900_000_102)),
                ("900000103\u{2028}e\u{301}".into(), order(900_000_103)),
                ("odd-900000104".into(), padded),
                // Parked: garbage keys start with g.
                (
                    format!("g{}", "x".repeat(1023)),
                    serde_json::json!({"garbage": 1}),
                ),
            ];
            for (key, payload) in &rows {
                observer
                    .execute(
                        outbox_relay::outbox::INSERT_OUTBOX,
                        &[&"order-created", key, payload, &serde_json::json!({})],
                    )
                    .await
                    .unwrap();
            }
            notes.odd_orders = (900_000_101..=900_000_104).collect();
            notes.garbage_records = 1;
            notes
                .notes
                .push("the 6,400-byte key refused at the door; 4 odd rows mailed, 1 parked".into());
        }
        Fault::KillApi => {
            world.api.kill9().await;
            notes.killed.push(world.api.name);
            tokio::time::sleep(Duration::from_secs(1)).await;
            world.api.start().await;
        }
        Fault::FreezeApi => {
            world.api.signal("STOP");
            tokio::time::sleep(Duration::from_secs(5)).await;
            world.api.signal("CONT");
        }
        Fault::SmtpHangs => {
            world.smtp.restart_with(&["--hang"]).await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            world.smtp.restart_with(&[]).await;
        }
        Fault::ConnectionExhaustion => {
            let mut hogs = Vec::new();
            // Take every connection Postgres will give (it keeps 3 for superusers).
            while let Ok(client) = outbox_relay::db::connect(&world.url).await {
                hogs.push(client);
                if hogs.len() > 500 {
                    break;
                }
            }
            notes.notes.push(format!("{} connections held", hogs.len()));
            let away = Instant::now();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(hogs);
            // No new connection for 5 s: members whose pooled ones broke are cut off.
            notes.database_away = Some(away.elapsed());
        }
        Fault::Burst => {
            // Every request on a connection of its own, all at once.
            let mut burst = tokio::task::JoinSet::new();
            for i in 0..2_000i64 {
                let base = world.http.clone();
                burst.spawn(async move {
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()
                        .unwrap();
                    let user_id = 1_000_000 + i;
                    let body = serde_json::json!({"user_id": user_id, "email": format!("burst{i}@example.com"), "amount": 1});
                    let answer = http
                        .post(format!("{base}/orders"))
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await;
                    match answer {
                        Ok(r) if r.status() == reqwest::StatusCode::CREATED => r
                            .json::<serde_json::Value>()
                            .await
                            .ok()
                            .and_then(|v| v["order_id"].as_i64())
                            .map_or(Answer::Unanswered, Answer::Created),
                        Ok(r) if r.status().is_client_error()
                            || r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE =>
                        {
                            Answer::Refused(user_id)
                        }
                        _ => Answer::Unanswered,
                    }
                });
            }
            let mut unanswered = 0;
            while let Some(done) = burst.join_next().await {
                match done.unwrap_or(Answer::Unanswered) {
                    Answer::Created(id) => notes.created.push(id),
                    Answer::Refused(user_id) => notes.refused.push(user_id),
                    Answer::Unanswered => unanswered += 1,
                }
            }
            notes.notes.push(format!(
                "burst: {} created, {} refused, {unanswered} unanswered",
                notes.created.len(),
                notes.refused.len()
            ));
        }
    }
    notes
}

/// One scenario's outcome, as the report shows it.
struct Outcome {
    scenario: &'static str,
    held: Duration,
    orders: usize,
    records: i64,
    mails: usize,
    duplicates: usize,
    explained_by: Option<&'static str>,
    lost: usize,
    recovery: Duration,
    notes: String,
    failures: Vec<String>,
}

/// Reads everything back, independently of the project's code: the
/// database's tables and the SMTP server's mailbox.
async fn check(
    world: &mut World,
    scenario: &Scenario,
    placed: &Placed,
    notes: &FaultNotes,
) -> Outcome {
    let mut failures = Vec::new();
    let client = world.client().await;
    // Recovery: every order in the database mailed, the group caught up.
    let recovery_start = Instant::now();
    let caught_up = tokio::time::timeout(RECOVERY_BOUND, async {
        loop {
            let orders: i64 = client
                .query_one("SELECT count(*) FROM orders", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(-1);
            let lag: i64 = client
                .query_one(
                    "SELECT coalesce(sum(h.log_end_offset - coalesce(p.committed_offset, 0)), -1)::int8
                       FROM partition_heads h
                       LEFT JOIN group_partitions p ON p.group_id = 'mail-service'
                            AND p.topic = h.topic AND p.partition = h.partition
                      WHERE h.topic = 'order-created'",
                    &[],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(-1);
            let mailed: HashSet<i64> = mails_by_order(&world.smtp).keys().copied().collect();
            if lag == 0 && orders >= 0 && mailed.len() as i64 >= orders {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let recovery = recovery_start.elapsed();
    if caught_up.is_err() {
        failures.push(format!("not caught up within {RECOVERY_BOUND:?}"));
    }

    // Orders: every 201 and every committed order in the log exactly once.
    let orders: HashSet<i64> = client
        .query("SELECT id FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut in_log: HashMap<i64, i64> = HashMap::new();
    for row in client
        .query(
            "SELECT key, count(*) FROM event_log WHERE topic = 'order-created' AND key ~ '^[0-9]+$' GROUP BY key",
            &[],
        )
        .await
        .unwrap()
    {
        in_log.insert(row.get::<_, String>(0).parse().unwrap(), row.get(1));
    }
    for id in &placed.created {
        if !orders.contains(id) {
            failures.push(format!(
                "order {id} was answered 201 but is not in the database"
            ));
        }
    }
    let lost: Vec<i64> = orders
        .iter()
        .filter(|id| !in_log.contains_key(id))
        .copied()
        .collect();
    if !lost.is_empty() {
        failures.push(format!(
            "{} committed orders are not in the log: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ));
    }
    let twice: Vec<i64> = in_log
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    if !twice.is_empty() {
        failures.push(format!("orders in the log more than once: {twice:?}"));
    }
    let made_up: Vec<i64> = in_log
        .keys()
        .filter(|id| !orders.contains(id))
        .copied()
        .collect();
    if !made_up.is_empty() {
        failures.push(format!(
            "log records for orders that do not exist: {made_up:?}"
        ));
    }

    // Offsets gapless in every partition.
    for row in client
        .query(
            "SELECT h.topic, h.partition, h.log_end_offset, count(e.\"offset\"), count(DISTINCT e.\"offset\"),
                    coalesce(min(e.\"offset\"), 0), coalesce(max(e.\"offset\"), -1)
               FROM partition_heads h LEFT JOIN event_log e ON e.topic = h.topic AND e.partition = h.partition
              GROUP BY h.topic, h.partition, h.log_end_offset",
            &[],
        )
        .await
        .unwrap()
    {
        let (topic, partition, end, n, distinct, min, max): (String, i32, i64, i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5), row.get(6));
        if !(n == end && distinct == n && min == 0 && max == end - 1) {
            failures.push(format!(
                "{topic}/{partition}: offsets not gapless (end {end}, {n} records, {distinct} distinct, {min}..{max})"
            ));
        }
    }

    // Per-key order and exactly once for the numbered writer.
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    let mut seen_seq: HashSet<i64> = HashSet::new();
    for row in client
        .query(
            "SELECT key, (payload->>'seq')::int8 FROM event_log WHERE topic = 'sequence-check'
              ORDER BY partition, \"offset\"",
            &[],
        )
        .await
        .unwrap()
    {
        let (key, seq): (String, i64) = (row.get(0), row.get(1));
        if seq < 0 {
            continue; // the held writer's row
        }
        if let Some(previous) = last_seq.insert(key.clone(), seq) {
            if seq <= previous {
                failures.push(format!(
                    "key {key}: seq {seq} after {previous} (per-key order broken)"
                ));
            }
        }
        if !seen_seq.insert(seq) {
            failures.push(format!("sequence-check seq {seq} in the log twice"));
        }
    }
    let missing_seq = placed
        .sequenced
        .iter()
        .filter(|(_, seq)| !seen_seq.contains(seq))
        .count();
    if missing_seq > 0 {
        failures.push(format!(
            "{missing_seq} committed sequence-check events are not in the log"
        ));
    }

    // Mails: every order mailed; a second mail only where explained, and
    // recognisable (the same Message-ID).
    let mails = mails_by_order(&world.smtp);
    let unmailed: Vec<i64> = orders
        .iter()
        .filter(|id| !mails.contains_key(id))
        .copied()
        .collect();
    if !unmailed.is_empty() {
        failures.push(format!(
            "{} orders got no mail: {:?}",
            unmailed.len(),
            &unmailed[..unmailed.len().min(10)]
        ));
    }
    let duplicated: Vec<(&i64, &Vec<String>)> =
        mails.iter().filter(|(_, ids)| ids.len() > 1).collect();
    for (order, ids) in &duplicated {
        if ids.iter().any(|id| id != &ids[0]) {
            failures.push(format!(
                "order {order}: mails with different Message-IDs {ids:?}"
            ));
        }
    }
    // A database away long enough cuts the members off: the documented
    // window of a member treated as crashed. A member stops its partitions
    // one heartbeat interval short of its session after its last heartbeat
    // went out, and that may have been up to an interval before the
    // database went away: so any outage longer than the session less two
    // intervals may cut it off, with sent marks unwritten.
    let mut mail = outbox_relay::app::mail::MailSettings::new(
        None,
        "shop@example.com",
        std::path::Path::new("."),
    )
    .unwrap();
    mail.session_timeout = Duration::from_secs(SESSION_SECS.parse().unwrap());
    let group = mail.consumer_config().group;
    let cut_off_after = group.session_timeout - 2 * group.heartbeat_interval;
    let explained_by = scenario.duplicates_explained_by.or_else(|| {
        notes.database_away.filter(|away| *away > cut_off_after).map(|_| {
            "the database was away longer than the mail members' 3 s session less two heartbeat intervals: members cut off with sent marks unwritten, treated as crashed"
        })
    });
    if !duplicated.is_empty() && explained_by.is_none() {
        failures.push(format!(
            "{} orders were mailed twice with nothing to explain it: {:?}",
            duplicated.len(),
            duplicated
                .iter()
                .map(|(o, _)| **o)
                .take(10)
                .collect::<Vec<_>>()
        ));
    }

    // A refused request wrote nothing.
    let refused: Vec<i64> = placed
        .refused
        .iter()
        .chain(&notes.refused)
        .copied()
        .collect();
    let written_for_refused: i64 = client
        .query_one(
            "SELECT count(*) FROM orders WHERE user_id = ANY($1)",
            &[&refused],
        )
        .await
        .unwrap()
        .get(0);
    if written_for_refused > 0 {
        failures.push(format!(
            "{written_for_refused} orders exist for requests that were refused"
        ));
    }

    // Odd rows within the limits are mailed like any order.
    let unmailed_odd: Vec<i64> = notes
        .odd_orders
        .iter()
        .filter(|id| mails.get(id).is_none_or(|ids| ids.len() != 1))
        .copied()
        .collect();
    if !unmailed_odd.is_empty() {
        failures.push(format!(
            "odd rows not mailed exactly once: {unmailed_odd:?}"
        ));
    }

    // Garbage is parked, not crashed on.
    if notes.garbage_records > 0 {
        let parked: i64 = client
            .query_one("SELECT count(*) FROM dead_letters WHERE key LIKE 'g%'", &[])
            .await
            .unwrap()
            .get(0);
        let unknown_topic: i64 = client
            .query_one("SELECT count(*) FROM outbox_parked", &[])
            .await
            .unwrap()
            .get(0);
        if parked != notes.garbage_records || unknown_topic != notes.garbage_unknown_topic {
            failures.push(format!(
                "garbage: {parked} dead letters (want {}), {unknown_topic} parked rows (want {})",
                notes.garbage_records, notes.garbage_unknown_topic
            ));
        }
    }

    // Nobody died who was not killed.
    for role in std::iter::once(&mut world.api)
        .chain(world.relays.iter_mut())
        .chain(world.mails.iter_mut())
    {
        if let Some(death) = role.died() {
            failures.push(death);
        }
    }

    let records: i64 = client
        .query_one("SELECT count(*) FROM event_log", &[])
        .await
        .unwrap()
        .get(0);
    let mut note = notes.notes.clone();
    if let Some(away) = notes.database_away {
        note.push(format!("database away {:.1} s", away.as_secs_f64()));
    }
    if let Some(stall) = notes.longest_stall {
        note.insert(
            0,
            format!("log stood still at most {:.1} s", stall.as_secs_f64()),
        );
    }
    if !placed.refused.is_empty() || placed.unanswered > 0 {
        note.push(format!(
            "{} requests refused during the fault (none wrote anything), {} unanswered or 500 (counted above if they committed)",
            placed.refused.len(),
            placed.unanswered
        ));
    }
    Outcome {
        scenario: scenario.name,
        held: placed.held,
        orders: orders.len(),
        records,
        mails: mails.values().map(Vec::len).sum(),
        duplicates: duplicated.len(),
        explained_by: (!duplicated.is_empty()).then_some(explained_by).flatten(),
        lost: lost.len() + unmailed.len(),
        recovery,
        notes: note.join("; "),
        failures,
    }
}

/// Order id → the Message-IDs of the mails it got.
fn mails_by_order(smtp: &SmtpServer) -> HashMap<i64, Vec<String>> {
    let mut by_order: HashMap<i64, Vec<String>> = HashMap::new();
    for mail in smtp.messages() {
        let id = mail
            .subject
            .split('#')
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<i64>().ok());
        if let Some(id) = id {
            by_order.entry(id).or_default().push(mail.message_id);
        }
    }
    by_order
}

/// The suite: every scenario on a cluster of its own, one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_injection_suite() {
    let scale: u32 = if std::env::var_os("FAULT_SOAK").is_some() {
        5
    } else {
        1
    };
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let options = ClusterOptions {
        data_dir: tmp.join(format!("fault-postgres-{}", std::process::id())),
        durable: true,
        extra_settings: vec!["max_connections = 150".into()],
    };
    let cluster = blocking(move || EmbeddedPostgres::start(&options))
        .await
        .unwrap();
    cluster.discard_after_exit_of(std::process::id()).unwrap();
    let cluster = Arc::new(cluster);

    let only = std::env::var("FAULT_ONLY").ok();
    let mut outcomes = Vec::new();
    for scenario in SCENARIOS {
        if only
            .as_deref()
            .is_some_and(|only| !scenario.name.contains(only))
        {
            continue;
        }
        let mut world = World::new(cluster.clone(), &[]).await;
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let load = start_load(&world, stopping);
        tokio::time::sleep(Duration::from_secs(3) * scale).await;
        let notes = inject(scenario.fault, &mut world, scale).await;
        tokio::time::sleep(Duration::from_secs(3) * scale).await;
        let _ = stop.send(true);
        let mut placed = load.await.unwrap();
        placed.created.extend(&notes.created);
        placed.refused.extend(&notes.refused);
        let outcome = check(&mut world, scenario, &placed, &notes).await;
        eprintln!(
            "fault suite: {}: {} orders, {} mails, {} duplicates, lost {}, caught up in {:.1} s; {}{}",
            outcome.scenario,
            outcome.orders,
            outcome.mails,
            outcome.duplicates,
            outcome.lost,
            outcome.recovery.as_secs_f64(),
            outcome.notes,
            if outcome.failures.is_empty() { String::new() } else { format!("; FAILED: {:?}", outcome.failures) }
        );
        // A scenario that held leaves nothing on disk; a failed one keeps
        // its processes' logs for whoever reads the failure.
        if outcome.failures.is_empty() {
            if let Some(dir) = world.api.log.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        outcomes.push(outcome);
    }
    if let Some(path) = std::env::var_os("FAULT_REPORT") {
        std::fs::write(path, report(&outcomes)).unwrap();
    }
    let failed: Vec<String> = outcomes
        .iter()
        .flat_map(|o| {
            o.failures
                .iter()
                .map(move |f| format!("{}: {f}", o.scenario))
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// The results as docs/faults.md shows them.
fn report(outcomes: &[Outcome]) -> String {
    let mut text = String::from(
        "# Faults, injected\n\n\
         Written by the fault-injection suite (`tests/it/faults.rs`), which `tests/run` and CI run\n\
         with the other tests:\n\n\
         ```sh\n\
         FAULT_REPORT=docs/faults.md cargo test --test it faults:: -- --nocapture    # FAULT_SOAK=1: 5x longer\n\
         ```\n\n\
         Each scenario runs the real binary as separate processes (the order API, two relays with a\n\
         1 s lease, two mail members with static ids and a 3 s session) against a private Postgres\n\
         cluster with durable commits and a real SMTP server (aiosmtpd), under a steady load of\n\
         orders through `POST /orders` and, beside it, numbered events over 8 keys written with plain\n\
         SQL. One fault is injected in the middle; then an independent checker reads the database\n\
         and the SMTP server's mailbox: every order answered 201 and every order in the database is\n\
         in the log exactly once, offsets are gapless in every partition, events of one key are in\n\
         their writer's order, every order got its mail (a second one only where the scenario killed\n\
         or froze something inside the documented window, and then with the same Message-ID),\n\
         nothing was written for a refused request, and the pipeline caught up within 90 s.\n\n",
    );
    text.push_str(
        "| scenario | load held | orders | records | mails | duplicates (explained by) | lost | caught up in | notes |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let duplicates = match (o.duplicates, o.explained_by) {
            (0, _) => "0".to_string(),
            (n, Some(why)) => format!("{n} ({why}; same Message-ID)"),
            (n, None) => format!("{n} (unexplained)"),
        };
        text.push_str(&format!(
            "| {} | {} orders/s for {:.0} s | {} | {} | {} | {} | {} | {:.1} s | {}{} |\n",
            o.scenario,
            ORDERS_PER_SECOND,
            o.held.as_secs_f64(),
            o.orders,
            o.records,
            o.mails,
            duplicates,
            o.lost,
            o.recovery.as_secs_f64(),
            o.notes,
            if o.failures.is_empty() {
                String::new()
            } else {
                format!(" **FAILED**: {}", o.failures.join("; "))
            }
        ));
    }
    text
}
