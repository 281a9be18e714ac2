//! The web console (`serve --roles …,console`): an operator answers "did
//! order 4711's confirmation go out, and if not, why?" and acts on it
//! without a terminal. Server-rendered pages (maud templates, compiled in)
//! with htmx vendored and served by the binary; live figures over
//! server-sent events.
//!
//! The pages follow the data's path: [`overview`] (the pipeline, live),
//! [`orders`] (one order's event and mail), [`topics`] (the log, browsed),
//! [`groups`] (lag, offset resets), [`dead_letters`] (dead letters and
//! parked outbox rows, re-driven), [`replays`], and [`audit`]. Every action
//! calls the same functions as the CLI.
//!
//! Security is the server's ([`auth`]): without a token the console serves
//! loopback peers only; with `CONSOLE_TOKEN` (or users) every request needs
//! a session or a bearer token; `--console-read-only` answers 403 to every
//! write; payloads are a permission of their own (emails masked without
//! it); state changes are POSTs with a CSRF token, each written to the
//! audit table.

pub mod assets;
pub mod audit;
pub mod auth;
pub mod dead_letters;
pub mod groups;
pub mod login;
pub mod orders;
pub mod overview;
pub mod page;
pub mod replays;
pub mod session;
pub mod topics;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use deadpool_postgres::Pool;

/// Connections of the console's pool (pages, actions, the overview's read).
pub const POOL_SIZE: usize = 4;

/// Bounds of every console session: a page never waits on a lock, holds a
/// transaction open, or runs a statement for long (browsing reads have a
/// tighter bound of their own, `page::BROWSE_TIMEOUT`).
pub const SESSION_BOUNDS: crate::db::SessionBounds = crate::db::SessionBounds {
    idle_in_transaction: std::time::Duration::from_secs(5),
    lock_wait: std::time::Duration::from_secs(2),
    statement: Some(std::time::Duration::from_secs(10)),
};

/// The console's settings, checked before anything starts.
pub struct ConsoleSettings {
    /// Its own listener (`--console-addr`); None: under `/console` on the
    /// API's address.
    pub listener: Option<std::net::TcpListener>,
    pub access: auth::AccessSettings,
    /// Write routes answer 403 and no write control is rendered.
    pub read_only: bool,
    /// A read-only replica for browsing (`CONSOLE_DATABASE_URL`).
    pub browse_url: Option<String>,
    /// How replays started from the console send their mail: the
    /// process's mail settings as `replay` arguments.
    pub replay_mail_args: Vec<String>,
    /// The data directory (the default `.eml` folder of replayed mail).
    pub data_dir: std::path::PathBuf,
}

impl ConsoleSettings {
    /// Checks that the console is not open off loopback: bound there (its
    /// own address or the API's), it needs a token or users.
    pub fn check_bind(&self, addr: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
        let addr = self
            .listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .or(addr);
        if let Some(addr) = addr {
            if !addr.ip().is_loopback() && !self.access.authenticates() {
                anyhow::bail!(
                    "the console on {addr} would be open off loopback: set CONSOLE_TOKEN \
                     (or --console-users), or serve it on a loopback address (--console-addr 127.0.0.1:8081)"
                );
            }
        }
        Ok(())
    }
}

/// What every console handler shares.
#[derive(Clone)]
pub struct Console(Arc<Inner>);

pub struct Inner {
    /// The primary: actions, and reads that must see them.
    pub pool: Pool,
    /// Browsing (the record browser, lists): the replica when given.
    pub browse: Pool,
    pub database_url: String,
    pub auth: auth::Auth,
    pub read_only: bool,
    pub overview: overview::Hub,
    pub replays: replays::Runner,
    /// Set when the process stops: the live streams end then, instead of
    /// holding the server's shutdown for its whole grace period.
    pub closing: tokio::sync::watch::Sender<bool>,
}

impl Inner {
    /// Resolves when the process stops.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let _ = closing.wait_for(|closing| *closing).await;
        }
    }
}

impl std::ops::Deref for Console {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Console {
    pub fn new(
        settings: &ConsoleSettings,
        pool: Pool,
        browse: Pool,
        database_url: &str,
    ) -> anyhow::Result<Console> {
        Ok(Console(Arc::new(Inner {
            overview: overview::Hub::new(pool.clone()),
            pool,
            browse,
            database_url: database_url.to_string(),
            auth: auth::Auth::new(&settings.access),
            read_only: settings.read_only,
            replays: replays::Runner::new(
                database_url,
                settings.replay_mail_args.clone(),
                settings.data_dir.clone(),
            ),
            closing: tokio::sync::watch::channel(false).0,
        })))
    }
}

/// The console's routes, all under `/console`.
pub fn router(console: Console) -> Router {
    let pages = Router::new()
        .route("/console/", get(overview::page))
        .route("/console/events", get(overview::events))
        .route("/console/orders", get(orders::page))
        .route("/console/topics", get(topics::list))
        .route("/console/topics/{topic}", get(topics::topic))
        .route("/console/topics/{topic}/{partition}", get(topics::records))
        .route("/console/groups", get(groups::list))
        .route("/console/groups/{group}", get(groups::group))
        .route("/console/groups/{group}/reset", post(groups::reset))
        .route("/console/dead-letters", get(dead_letters::list))
        .route("/console/dead-letters/act", post(dead_letters::act))
        .route("/console/parked", get(dead_letters::parked))
        .route(
            "/console/parked/redrive",
            post(dead_letters::redrive_parked),
        )
        .route("/console/replays", get(replays::list))
        .route("/console/replays/start", post(replays::start))
        .route("/console/replays/{run}", get(replays::run))
        .route("/console/replays/{run}/events", get(replays::events))
        .route("/console/replays/{run}/resume", post(replays::resume))
        .route("/console/audit", get(audit::page))
        .route("/console/logout", post(login::logout))
        .route_layer(axum::middleware::from_fn_with_state(
            console.clone(),
            auth::require_session,
        ));
    let open = Router::new()
        .route("/console/login", get(login::login_page).post(login::login))
        .route("/console/assets/{name}", get(assets::asset))
        // Relative, so that it holds behind a proxy's prefix too.
        .route(
            "/console",
            get(|| async { axum::response::Redirect::permanent("console/") }),
        );
    pages.merge(open).with_state(console)
}

/// The console role on its own listener, with the operational endpoints.
pub fn service(
    listener: std::net::TcpListener,
    console: Console,
    pool: Pool,
) -> anyhow::Result<crate::http::HttpService> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tracing::info!(addr = %listener.local_addr()?, "console listening on http://{}/console/", listener.local_addr()?);
    Ok(crate::http::HttpService::new(
        "console",
        listener,
        crate::http::with_operational_routes(router(console), pool),
    ))
}

/// The console's own SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    [
        audit::statements(),
        groups::statements(),
        orders::statements(),
        overview::statements(),
    ]
    .concat()
}
