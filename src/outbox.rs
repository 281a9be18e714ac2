//! The outbox: the one table a producer writes, with a plain `INSERT` inside
//! its own transaction. This module is the Rust writer's API; other languages
//! use the SQL in the README.

use tokio_postgres::Transaction;

/// One event to publish.
#[derive(Debug, Clone)]
pub struct OutboxMessage<'a> {
    /// Destination topic; must exist in `topics` or the relay parks the row.
    pub topic: &'a str,
    /// Partitioning key (Kafka's record key). `None` spreads records over partitions.
    pub key: Option<String>,
    pub payload: serde_json::Value,
    /// A JSON object of string header values.
    pub headers: serde_json::Value,
}

/// The namespace of the headers outbox-relay itself acts on. Writers
/// cannot set any header in it: the relay removes them from outbox rows (a
/// payload or header a service passes through must not steer the relay or
/// the mail worker).
pub const RESERVED_HEADER_PREFIX: &str = "outbox-relay-";

/// On a record republished from a dead letter: `topic/partition/offset` of
/// the record it retries (the relay sets it from the outbox row's
/// `retry_of` column, which only `dead-letters retry` writes).
pub const RETRY_OF_HEADER: &str = "outbox-relay-retry-of";

/// What an outbox row may hold: what every stage after the outbox can carry
/// (the log and the ledgers in Postgres, the Kafka mirror, serde_json
/// readers, mails and webhooks). `sql/0009_row_limits.sql` refuses a row
/// over any of them at the writer's `INSERT`, with a constraint named after
/// the limit; rows written before that migration are checked where they
/// are read (the relay parks a row whose key is over the limit).
pub mod limits {
    /// Kafka's topic names: 1 to 249 of `[A-Za-z0-9._-]`.
    pub const TOPIC_MAX_CHARS: usize = 249;
    /// Bytes of a key (UTF-8).
    pub const KEY_MAX_BYTES: usize = 1024;
    /// Headers of a row; each value a string, number, boolean or null.
    pub const HEADERS_MAX: usize = 64;
    /// Bytes of the headers' JSON text (as Postgres prints it).
    pub const HEADERS_MAX_BYTES: usize = 16_384;
    /// Bytes of the payload's JSON text (as Postgres prints it): with the
    /// key and headers, within librdkafka's default `message.max.bytes`
    /// (1,000,000; Kafka's brokers and Java producer take 1 MiB).
    pub const PAYLOAD_MAX_BYTES: usize = 900_000;
    /// Levels of arrays and objects below the payload's top (serde_json
    /// reads 128 at most).
    pub const PAYLOAD_MAX_DEPTH: usize = 64;
}

/// The statement every writer runs, in any language.
pub const INSERT_OUTBOX: &str =
    "INSERT INTO outbox (topic, key, payload, headers) VALUES ($1, $2, $3, $4)";

/// Adds `message` to the outbox inside the caller's transaction: it is
/// published if and only if that transaction commits.
pub async fn enqueue(
    tx: &Transaction<'_>,
    message: &OutboxMessage<'_>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        INSERT_OUTBOX,
        &[
            &message.topic,
            &message.key,
            &message.payload,
            &message.headers,
        ],
    )
    .await?;
    Ok(())
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![("outbox::INSERT_OUTBOX", INSERT_OUTBOX.to_string())]
}
