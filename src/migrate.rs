//! Schema migrations: the `.sql` files of `sql/`, applied in order, each
//! recorded in `schema_migrations`.
//!
//! All pending migrations run in one transaction that first takes an
//! advisory *transaction* lock, so two processes starting at once apply them
//! exactly once (the second waits, then finds nothing to do), and the lock
//! cannot leak to another user of the connection.

use anyhow::Context;
use tokio_postgres::Client;

/// One migration, embedded in the binary at build time.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in the order they apply.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "core",
        sql: include_str!("../sql/0001_core.sql"),
    },
    Migration {
        version: 2,
        name: "consumer_groups",
        sql: include_str!("../sql/0002_consumer_groups.sql"),
    },
    Migration {
        version: 3,
        name: "mail_by_order",
        sql: include_str!("../sql/0003_mail_by_order.sql"),
    },
    Migration {
        version: 4,
        name: "faults",
        sql: include_str!("../sql/0004_faults.sql"),
    },
    Migration {
        version: 5,
        name: "replay",
        sql: include_str!("../sql/0005_replay.sql"),
    },
    Migration {
        version: 6,
        name: "pipelined_relay",
        sql: include_str!("../sql/0006_pipelined_relay.sql"),
    },
    Migration {
        version: 7,
        name: "woken_read",
        sql: include_str!("../sql/0007_woken_read.sql"),
    },
    Migration {
        version: 8,
        name: "woken_read_generic_plan",
        sql: include_str!("../sql/0008_woken_read_generic_plan.sql"),
    },
    Migration {
        version: 9,
        name: "row_limits",
        sql: include_str!("../sql/0009_row_limits.sql"),
    },
    Migration {
        version: 10,
        name: "kafka_groups",
        sql: include_str!("../sql/0010_kafka_groups.sql"),
    },
    Migration {
        version: 11,
        name: "console",
        sql: include_str!("../sql/0011_console.sql"),
    },
];

/// The version a fully migrated database reports.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Arbitrary constant naming the migration lock (`pg_advisory_xact_lock`).
const MIGRATION_LOCK_KEY: i64 = 0x6f75_7462_6f78; // "outbox"

/// Applies the pending migrations; returns the versions applied.
pub async fn run(client: &mut Client) -> anyhow::Result<Vec<i32>> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("taking the migration lock")?;
    let current = current_version(&tx).await?;
    if current == 0 {
        // Created only when missing: `IF NOT EXISTS` would print a notice at every start.
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer     PRIMARY KEY,
                 name       text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
    }
    let mut applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(migration.sql).await.with_context(|| {
            format!(
                "applying migration {} ({})",
                migration.version, migration.name
            )
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await?;
        applied.push(migration.version);
    }
    tx.commit().await?;
    Ok(applied)
}

async fn current_version_in(client: &impl tokio_postgres::GenericClient) -> anyhow::Result<i32> {
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Applies pending migrations and creates the log's day partitions ahead:
/// what `migrate` and `serve` do at start. Returns the versions applied.
pub async fn apply_all(url: &str) -> anyhow::Result<Vec<i32>> {
    let mut client = crate::db::connect(url).await?;
    let applied = run(&mut client).await?;
    let tx = client.transaction().await?;
    match crate::log::storage::ensure_day_partitions(&tx).await {
        Ok(()) => tx.commit().await?,
        // The log is busy and the partitions exist days ahead: the relay's
        // upkeep creates the missing ones later.
        Err(e) if is_lock_timeout(&e) => {
            tracing::warn!("event_log is busy; its next day partitions will be created later")
        }
        Err(e) => return Err(e),
    }
    Ok(applied)
}

/// Fails with a hint unless the database has exactly this binary's schema.
pub async fn require_current(url: &str) -> anyhow::Result<()> {
    let client = crate::db::connect(url).await?;
    let version = current_version(&client).await?;
    check_version(version)
}

/// The hint for a database whose schema is not this binary's.
pub fn check_version(version: i32) -> anyhow::Result<()> {
    let expected = latest_version();
    match version.cmp(&expected) {
        std::cmp::Ordering::Equal => Ok(()),
        _ if version == 0 => anyhow::bail!(
            "the database has no outbox-relay schema: run `outbox-relay migrate` \
             (or `outbox-relay serve`, which applies it at start)"
        ),
        std::cmp::Ordering::Less => anyhow::bail!(
            "the database schema is version {version}, older than this binary's {expected}: \
             run `outbox-relay migrate` (or `outbox-relay serve`, which applies it at start)"
        ),
        std::cmp::Ordering::Greater => anyhow::bail!(
            "the database schema is version {version}, newer than this binary's {expected}: \
             use a newer outbox-relay"
        ),
    }
}

/// The applied schema version, or 0 when the database was never migrated.
pub async fn current_version(client: &impl tokio_postgres::GenericClient) -> anyhow::Result<i32> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    current_version_in(client).await
}

fn is_lock_timeout(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(|e| e.code())
            == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
    })
}
