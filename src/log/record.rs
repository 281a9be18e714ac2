//! A record of the log, and the one column list every statement that reads
//! records selects, so [`Record::from_row`] reads them all the same way.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// One record of the log.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The outbox row's creation time (Kafka's CreateTime).
    pub created_at: DateTime<Utc>,
    /// When the relay appended it (Kafka's LogAppendTime).
    pub appended_at: DateTime<Utc>,
    pub headers: serde_json::Value,
    pub payload: serde_json::Value,
}

/// The columns of [`Record`], in [`Record::from_row`]'s order, qualified by
/// the alias `e` of `event_log` (or of a table with the same columns).
pub const RECORD_COLUMNS: &str =
    "e.topic, e.partition, e.\"offset\", e.key, e.created_at, e.appended_at, e.headers, e.payload";

impl Record {
    /// Reads a row that starts with [`RECORD_COLUMNS`].
    pub fn from_row(row: &tokio_postgres::Row) -> Record {
        Record {
            topic: row.get(0),
            partition: row.get(1),
            offset: row.get(2),
            key: row.get(3),
            created_at: row.get(4),
            appended_at: row.get(5),
            headers: row.get(6),
            payload: row.get(7),
        }
    }
}
