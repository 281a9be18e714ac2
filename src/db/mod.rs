//! Connections: a deadpool pool for request/worker traffic, and single
//! dedicated clients where a session must not be shared (the relay's
//! transactions, LISTEN, migrations).
//!
//! A process's roles get their connections through one [`Db`] handle, which
//! keeps the budget: every pool and dedicated connection is reserved by
//! name when a role is built, so the total a process may open is known (and
//! refused) before anything starts, and `serve` logs it.

pub mod batch;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{Client, Config, NoTls};

/// Parses a `postgres://` URL (or key=value string) into a config.
pub fn parse_url(url: &str) -> anyhow::Result<Config> {
    url.parse::<Config>()
        .map_err(|e| anyhow::anyhow!("invalid database URL: {e}"))
}

/// Server-side bounds of every session of a pool, so that a member frozen
/// mid-transaction cannot hold others up: a transaction idle longer than
/// `idle_in_transaction` is ended by Postgres, and a row lock is waited for
/// at most `lock_wait` (the statement then fails and is retried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionBounds {
    pub idle_in_transaction: Duration,
    pub lock_wait: Duration,
    /// Any statement ends after this (None: no bound).
    pub statement: Option<Duration>,
}

/// Builds a pool of `size` connections. Connections are opened lazily;
/// call [`check`] to fail fast on an unreachable database.
pub fn pool(url: &str, size: usize) -> anyhow::Result<Pool> {
    pool_with(url, size, None)
}

/// A pool whose sessions carry `bounds` (set at connection start).
pub fn pool_with(url: &str, size: usize, bounds: Option<SessionBounds>) -> anyhow::Result<Pool> {
    let mut config = parse_url(url)?;
    if let Some(b) = bounds {
        let mut options = format!(
            "-c idle_in_transaction_session_timeout={} -c lock_timeout={}",
            b.idle_in_transaction.as_millis().max(1),
            b.lock_wait.as_millis().max(1)
        );
        if let Some(statement) = b.statement {
            options.push_str(&format!(
                " -c statement_timeout={}",
                statement.as_millis().max(1)
            ));
        }
        let options = match config.get_options() {
            Some(existing) => format!("{existing} {options}"),
            None => options,
        };
        config.options(&options);
    }
    // A peer that vanished without closing is noticed within a minute.
    config.keepalives_idle(Duration::from_secs(30));
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // Bounded waits: a stuck database turns into errors callers handle
    // (heartbeats fail, requests answer 503) instead of hanging.
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(10)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .context("building the connection pool")
}

/// Opens one dedicated connection, driven on its own task.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let config = parse_url(url)?;
    let (client, connection) = config
        .connect(NoTls)
        .await
        .with_context(|| format!("cannot connect to the database at {}", describe(&config)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "dedicated connection closed");
        }
    });
    Ok(client)
}

/// Checks that the pool can reach the database.
pub async fn check(pool: &Pool) -> anyhow::Result<()> {
    let client = pool.get().await.context("cannot connect to the database")?;
    client.simple_query("SELECT 1").await?;
    Ok(())
}

/// Whether a failed database call may succeed if simply tried again.
///
/// Refused for good, by SQLSTATE class, is what is about the row written:
/// `22` (data exception: a value out of range, a byte sequence the encoding
/// refuses), `23` (integrity constraint: a check, a unique key) and `54`
/// (program limit: an index row too large); an item a [`batch::Batcher`]
/// reports as refused too. The same row fails the same way again, so its
/// writer settles it on its own instead of retrying it. Everything else is
/// transient: a lost connection, a pool that timed out, a serialization
/// failure, a read-only server after a failover (`25006`), a rejected
/// password, a cancelled statement: none of those is one row's fault, and
/// treating them as refused would settle healthy records without their
/// bookkeeping.
pub fn is_transient(error: &anyhow::Error) -> bool {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<batch::ItemError>() {
            return matches!(e, batch::ItemError::Stopped(_));
        }
        let code = if let Some(e) = cause.downcast_ref::<tokio_postgres::Error>() {
            e.code()
        } else if let Some(deadpool_postgres::PoolError::Backend(e)) =
            cause.downcast_ref::<deadpool_postgres::PoolError>()
        {
            e.code()
        } else {
            continue;
        };
        return code.is_none_or(|code| sqlstate_is_transient(code.code()));
    }
    true
}

fn sqlstate_is_transient(code: &str) -> bool {
    !matches!(code.get(..2), Some("22" | "23" | "54"))
}

/// host:port/dbname of a config, for messages (never the password).
pub fn describe(config: &Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("(default)");
    format!("{host}:{port}/{db}")
}

/// The database of a process and its connection budget.
#[derive(Clone)]
pub struct Db {
    inner: Arc<DbInner>,
}

struct DbInner {
    url: String,
    /// At most this many connections in all (None: no limit).
    limit: Option<usize>,
    /// What each part of the process reserved: (purpose, connections).
    reserved: Mutex<Vec<(&'static str, usize)>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("Db")
            .field("limit", &self.inner.limit)
            .field("reserved", &self.reservations())
            .finish()
    }
}

impl Db {
    /// A handle on `url` allowing at most `limit` connections in all.
    pub fn new(url: &str, limit: Option<usize>) -> anyhow::Result<Db> {
        parse_url(url)?;
        Ok(Db {
            inner: Arc::new(DbInner {
                url: url.to_string(),
                limit,
                reserved: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Reserves `connections` for `purpose`; fails once the budget is spent.
    pub fn reserve(&self, purpose: &'static str, connections: usize) -> anyhow::Result<()> {
        let mut reserved = self.inner.reserved.lock().expect("budget lock");
        let total: usize = reserved.iter().map(|(_, n)| n).sum::<usize>() + connections;
        if let Some(limit) = self.inner.limit.filter(|&limit| total > limit) {
            let mut wanted: Vec<String> =
                reserved.iter().map(|(p, n)| format!("{p} {n}")).collect();
            wanted.push(format!("{purpose} {connections}"));
            anyhow::bail!(
                "this process's roles need {total} database connections ({}), more than \
                 --max-db-connections {limit}",
                wanted.join(", ")
            );
        }
        reserved.push((purpose, connections));
        Ok(())
    }

    /// A pool of `size` connections for `purpose`, reserved from the budget.
    pub fn pool(&self, purpose: &'static str, size: usize) -> anyhow::Result<Pool> {
        self.reserve(purpose, size)?;
        pool(self.url(), size)
    }

    /// A pool whose sessions carry `bounds`, reserved from the budget.
    pub fn bounded_pool(
        &self,
        purpose: &'static str,
        size: usize,
        bounds: SessionBounds,
    ) -> anyhow::Result<Pool> {
        self.reserve(purpose, size)?;
        pool_with(self.url(), size, Some(bounds))
    }

    /// Opens a dedicated connection (reserve it once with [`Db::reserve`]:
    /// a role that reconnects after an error reuses its reservation).
    pub async fn connect(&self) -> anyhow::Result<Client> {
        connect(self.url()).await
    }

    /// What has been reserved so far, by purpose.
    pub fn reservations(&self) -> Vec<(&'static str, usize)> {
        self.inner.reserved.lock().expect("budget lock").clone()
    }

    /// Connections reserved in all.
    pub fn reserved_total(&self) -> usize {
        self.reservations().iter().map(|(_, n)| n).sum()
    }

    /// Connections the budget has left (None: no limit).
    pub fn remaining(&self) -> Option<usize> {
        self.inner
            .limit
            .map(|limit| limit.saturating_sub(self.reserved_total()))
    }
}

/// A URL alone: a handle without a budget (tests, one-shot commands).
impl From<&str> for Db {
    fn from(url: &str) -> Db {
        Db {
            inner: Arc::new(DbInner {
                url: url.to_string(),
                limit: None,
                reserved: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl From<String> for Db {
    fn from(url: String) -> Db {
        Db::from(url.as_str())
    }
}

impl From<&String> for Db {
    fn from(url: &String) -> Db {
        Db::from(url.as_str())
    }
}

impl From<&Db> for Db {
    fn from(db: &Db) -> Db {
        db.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_transient_by_class() {
        // Lost connection, serialization, deadlock, too many connections,
        // shutdown, cancelled, I/O, lock timeout, read-only, bad password.
        for code in [
            "08006", "40001", "40P01", "53300", "57P01", "57014", "58030", "55P03", "25006",
            "28P01",
        ] {
            assert!(sqlstate_is_transient(code), "{code}");
        }
        // Index row size exceeded, check and unique violations, bad bytes.
        for code in ["54000", "23514", "23505", "22021"] {
            assert!(!sqlstate_is_transient(code), "{code}");
        }
        assert!(is_transient(&anyhow::anyhow!("the pool timed out")));
    }

    #[test]
    fn the_budget_refuses_what_it_cannot_hold() {
        let db = Db::new("postgres://u:secret@localhost/db", Some(10)).unwrap();
        db.reserve("api", 6).unwrap();
        db.reserve("relay", 2).unwrap();
        let e = db.reserve("mail", 8).unwrap_err().to_string();
        assert!(
            e.contains("need 16") && e.contains("api 6, relay 2, mail 8"),
            "{e}"
        );
        assert_eq!(db.reserved_total(), 8);
        assert!(!format!("{db:?}").contains("secret"));
        let unlimited = Db::from("postgres://localhost/db");
        unlimited.reserve("anything", 1000).unwrap();
    }
}
