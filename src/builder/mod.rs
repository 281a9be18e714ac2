//! The application builder: one process's roles, built from checked
//! settings and started under one supervisor. `serve`, `demo` and the tests
//! all start their pipelines here.
//!
//! Each role has a small builder in its own module that returns its
//! service(s) — `relay::role`, `app::mail::role`, `app::webhook::consumers`,
//! `kafka::mirror::PreparedMirror`, `app::api::service` — and this file
//! only says which run, in what order, and on how many database
//! connections. Building does no I/O, so a bad setting starts nothing;
//! then the schema is migrated (or checked), the checks that need it run,
//! and every role starts.

mod gauges;

use std::net::SocketAddr;
use std::time::Duration;

use crate::app::mail::MailSettings;
use crate::app::webhook::SinkSettings;
use crate::db::Db;
use crate::kafka::mirror::PreparedMirror;
use crate::relay::OutboxWritten;
use crate::service::{Service, Supervisor};

pub use gauges::DatabaseGauges;

/// A role a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The order API (POST /orders, GET /orders/{id}) and /metrics.
    Api,
    /// The relay (outbox → event log; one leader among all relay processes) and its upkeep.
    Relay,
    /// The mail worker: consumer group mail-service sending order confirmations.
    Mail,
    /// The Kafka mirror: the log's topics copied into a Kafka cluster
    /// (KAFKA_BROKERS), same partitions and keys. Off unless named.
    Kafka,
    /// Webhook sinks (WEBHOOK_SINKS): each event POSTed to a URL, signed
    /// (Standard Webhooks), each sink a consumer group. Off unless named.
    Webhook,
    /// The Kafka protocol on the log (--kafka-listen): Kafka consumers read
    /// the log's topics directly. Off unless named.
    KafkaApi,
    /// The web console: under /console on the API's address, or on
    /// --console-addr. Off unless named (`demo` runs it).
    Console,
}

/// Enough for the default roles with room to spare (api 16, relay 4, mail
/// 27); with every role (kafka 11, kafka-api 9, webhook sinks 7 each,
/// `--metrics-addr` 2) the mail worker's shared pools shrink to what is
/// left, or give `--max-db-connections` more.
pub const DEFAULT_MAX_DB_CONNECTIONS: u32 = 64;

/// The order API's pool.
const API_POOL_SIZE: usize = 16;
/// The pool of the operational endpoints of a process without the api role
/// (a scrape at a time, and /readyz).
const METRICS_POOL_SIZE: usize = 2;

/// What a process runs, every setting checked and its ports bound: made
/// before the database is opened.
pub struct Settings {
    /// The order API's listener (the api role).
    pub api: Option<std::net::TcpListener>,
    /// The operational endpoints' own listener (`--metrics-addr`).
    pub metrics: Option<std::net::TcpListener>,
    /// The relay role, with its lease's length and how long a busy relay
    /// gathers rows for a batch.
    pub relay: Option<(Duration, Duration)>,
    pub mail: Option<MailSettings>,
    /// The kafka role, its producer built.
    pub kafka: Option<PreparedMirror>,
    /// The webhook role's sinks (none: no webhook role).
    pub webhooks: Vec<SinkSettings>,
    /// The kafka-api role: its bound listener and advertised address.
    pub kafka_api: Option<crate::kafka_api::Listen>,
    /// The console role.
    pub console: Option<crate::console::ConsoleSettings>,
    /// Apply migrations on start (else the schema must be current).
    pub migrate: bool,
    pub max_db_connections: u32,
}

impl Default for Settings {
    /// No role yet, migrations applied, the default connection budget.
    fn default() -> Settings {
        Settings {
            api: None,
            metrics: None,
            relay: None,
            mail: None,
            kafka: None,
            webhooks: Vec::new(),
            kafka_api: None,
            console: None,
            migrate: true,
            max_db_connections: DEFAULT_MAX_DB_CONNECTIONS,
        }
    }
}

/// Binds `addr` for a role that serves HTTP (before anything starts, so a
/// port in use stops the process at once).
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use anyhow::Context;
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl Settings {
    /// The bound API address, if the process has the api role.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// A started process: its roles running under one supervisor.
pub struct Application {
    supervisor: Supervisor,
    api_addr: Option<SocketAddr>,
}

/// Starts one built role under the supervisor.
type Start = Box<dyn FnOnce(&mut Supervisor) + Send>;

/// Roles built and waiting to start, whatever their type.
#[derive(Default)]
struct Built(Vec<Start>);

impl Built {
    fn add<S: Service>(&mut self, service: S) {
        self.0
            .push(Box::new(move |supervisor| supervisor.start(service)));
    }
}

impl Application {
    /// Builds every role of `settings` on the database at `url`, migrates
    /// (unless told not to), then starts them.
    pub async fn start(settings: Settings, url: &str) -> anyhow::Result<Application> {
        // Build everything first (no I/O yet): a failure here starts nothing.
        let db = Db::new(url, Some(settings.max_db_connections as usize))?;
        let api_addr = settings.api_addr();
        let mut built = Built::default();
        let api_pool = match &settings.api {
            Some(_) => Some(db.pool("api", API_POOL_SIZE)?),
            None => None,
        };
        let metrics_pool = match &settings.metrics {
            Some(_) => Some(db.pool("metrics", METRICS_POOL_SIZE)?),
            None => None,
        };
        let relay = match settings.relay {
            Some((lease_ttl, gather)) => Some(crate::relay::role(&db, lease_ttl, gather)?),
            None => None,
        };
        // Orders placed here wake the relay directly when it runs here too,
        // else through `NOTIFY outbox_written` on a connection of its own.
        let outbox_written = match (&relay, &api_pool) {
            (_, None) => OutboxWritten::default(),
            (Some((relay, _)), Some(_)) => OutboxWritten::Relay(relay.wakeup()),
            (None, Some(_)) => {
                db.reserve("API's NOTIFY outbox_written", 1)?;
                OutboxWritten::Notify(crate::log::notify::OutboxNotifier::start(url)?)
            }
        };
        let kafka_api_pool = match &settings.kafka_api {
            Some(_) => {
                db.reserve("kafka-api wake-ups (LISTEN log appends)", 1)?;
                Some(db.bounded_pool(
                    "kafka-api",
                    crate::kafka_api::POOL_SIZE,
                    crate::kafka_api::SESSION_BOUNDS,
                )?)
            }
            None => None,
        };
        let console = match &settings.console {
            Some(console) => {
                console.check_bind(api_addr)?;
                if console.listener.is_none() && settings.api.is_none() {
                    anyhow::bail!(
                        "the console role is served on the API's address (the api role) or on --console-addr"
                    );
                }
                let pool = db.bounded_pool(
                    "console",
                    crate::console::POOL_SIZE,
                    crate::console::SESSION_BOUNDS,
                )?;
                // A replica for browsing is another server: not this budget.
                let browse = match &console.browse_url {
                    Some(replica) => crate::db::pool_with(
                        replica,
                        crate::console::POOL_SIZE,
                        Some(crate::console::SESSION_BOUNDS),
                    )?,
                    None => pool.clone(),
                };
                let built = crate::console::Console::new(console, pool.clone(), browse, url)?;
                Some((built, pool))
            }
            None => None,
        };
        let webhooks: usize = settings.webhooks.iter().map(|s| s.connections()).sum();
        for sink in crate::app::webhook::consumers(&db, &settings.webhooks)? {
            built.add(sink);
        }
        // The mail worker's pools take what the roles built after it leave.
        if let Some(mail) = &settings.mail {
            let later = settings
                .kafka
                .as_ref()
                .map_or(0, |_| crate::kafka::mirror::CONNECTIONS);
            built.add(crate::app::mail::role(&db, mail, later)?);
        }
        tracing::debug!(connections = db.reserved_total(), reserved = ?db.reservations(),
            webhooks, "database connection budget");

        if settings.migrate {
            crate::migrate::apply_all(url).await?;
        } else {
            crate::migrate::require_current(url).await?;
        }
        // What needs the schema: the sinks' topics must exist; the mirror's
        // topics are the log's.
        if !settings.webhooks.is_empty() {
            let client = db.connect().await?;
            crate::app::webhook::check_topics(&client, &settings.webhooks).await?;
        }
        if let Some(prepared) = settings.kafka {
            let client = db.connect().await?;
            let topics = prepared.topics(&client).await?;
            drop(client);
            built.add(prepared.build(&db, topics)?);
        }
        if let (Some(listen), Some(pool)) = (settings.kafka_api, kafka_api_pool) {
            let appends = crate::log::notify::listen(url)?;
            built.add(crate::kafka_api::role(pool, listen, appends)?);
        }
        if api_pool.is_some() || metrics_pool.is_some() {
            DatabaseGauges::register();
        }
        // The console on its own address, or beside the API.
        let mut beside_api = axum::Router::new();
        let console_listener = settings.console.and_then(|c| c.listener);
        if let Some((console, pool)) = console {
            built.add(crate::console::replays::Runner::stopper(&console));
            match console_listener {
                Some(listener) => built.add(crate::console::service(listener, console, pool)?),
                None => beside_api = crate::console::router(console),
            }
        }
        if let (Some(listener), Some(pool)) = (settings.api, api_pool) {
            crate::db::check(&pool).await?;
            built.add(crate::app::api::service(
                listener,
                pool,
                outbox_written,
                beside_api,
            )?);
        }
        if let (Some(listener), Some(pool)) = (settings.metrics, metrics_pool) {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tracing::info!(addr = %listener.local_addr()?, "metrics listening");
            let routes = crate::http::with_operational_routes(axum::Router::new(), pool);
            built.add(crate::http::HttpService::new("metrics", listener, routes));
        }

        let mut supervisor = Supervisor::new();
        if let Some((relay, maintenance)) = relay {
            let wakeup = relay.wakeup();
            crate::log::notify::listen_outbox_written(url, move || wakeup.wake())?;
            supervisor.start(relay);
            supervisor.start(maintenance);
        }
        for start in built.0 {
            start(&mut supervisor);
        }
        Ok(Application {
            supervisor,
            api_addr,
        })
    }

    /// The order API's address, if the process has the api role.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// Runs until Ctrl-C / SIGTERM or a role stops on its own, then stops
    /// every role.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        self.supervisor.run_until_signal().await
    }

    /// Stops every role and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.supervisor.stop().await
    }

    /// Runs until `stop` resolves (or a role stops on its own), then stops
    /// every role and waits for them.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        self.supervisor.run_until(stop).await
    }
}
