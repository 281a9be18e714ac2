//! Connections: a deadpool pool for request/worker traffic, and single
//! dedicated clients where a session must not be shared (migrations, LISTEN).

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{Client, Config, NoTls};

/// Parses a `postgres://` URL (or key=value string) into a config.
pub fn parse_url(url: &str) -> anyhow::Result<Config> {
    url.parse::<Config>()
        .map_err(|e| anyhow::anyhow!("invalid database URL: {e}"))
}

/// Builds a pool of `size` connections. Connections are opened lazily;
/// call [`check`] to fail fast on an unreachable database.
pub fn pool(url: &str, size: usize) -> anyhow::Result<Pool> {
    let mut config = parse_url(url)?;
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
