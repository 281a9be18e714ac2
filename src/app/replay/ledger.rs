//! A replay run's own ledger (`replay_deliveries`), written in batches: one
//! commit for whatever arrived meanwhile ([`crate::db::batch`]), each
//! writer waiting for its own row. One row the database refuses holds back
//! no other: it is written without its texts (reason, error), or reported.

use crate::db::batch::{BatchStatement, Batcher, ItemError};

/// Events about to be sent (committed before the SMTP exchange). A row in
/// doubt that is being sent again stays `sending`.
const MARK_SENDING: &str = "
    INSERT INTO replay_deliveries (run_id, partition, \"offset\", status, message_id)
    SELECT $1, v.partition, v.log_offset, 'sending', v.message_id
      FROM unnest($2::int4[], $3::int8[], $4::text[]) AS v(partition, log_offset, message_id)
    ON CONFLICT (run_id, partition, \"offset\") DO UPDATE SET updated_at = now()
     WHERE replay_deliveries.status = 'sending'";

/// Events settled: sent, failed (the run's dead letters) or unknown.
const MARK_SETTLED: &str = "
    INSERT INTO replay_deliveries (run_id, partition, \"offset\", status, message_id, attempts, reason, last_error)
    SELECT $1, v.partition, v.log_offset, v.status, v.message_id, v.attempts, v.reason, v.last_error
      FROM unnest($2::int4[], $3::int8[], $4::text[], $5::text[], $6::int4[], $7::text[], $8::text[])
           AS v(partition, log_offset, status, message_id, attempts, reason, last_error)
    ON CONFLICT (run_id, partition, \"offset\") DO UPDATE
       SET status = excluded.status, attempts = excluded.attempts, reason = excluded.reason,
           last_error = excluded.last_error, updated_at = now()";

/// An event settled.
#[derive(Clone)]
pub(super) struct Settle {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) status: &'static str,
    pub(super) message_id: String,
    pub(super) attempts: i32,
    pub(super) reason: Option<String>,
    pub(super) last_error: Option<String>,
}

#[derive(Clone)]
pub(super) enum LedgerWrite {
    /// About to be sent: after a crash it is in doubt.
    Sending {
        partition: i32,
        offset: i64,
        message_id: String,
    },
    Settled(Settle),
}

struct WriteRunLedger {
    run_id: i64,
}

impl BatchStatement for WriteRunLedger {
    type Item = LedgerWrite;
    type Output = ();
    const WHAT: &'static str = "replay ledger rows";

    async fn run(
        &self,
        client: &mut deadpool_postgres::Client,
        writes: &[LedgerWrite],
    ) -> anyhow::Result<Vec<()>> {
        let mut sending = (Vec::new(), Vec::new(), Vec::new());
        let mut settled = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for write in writes {
            match write {
                LedgerWrite::Sending {
                    partition,
                    offset,
                    message_id,
                } => {
                    sending.0.push(*partition);
                    sending.1.push(*offset);
                    sending.2.push(message_id.as_str());
                }
                LedgerWrite::Settled(s) => {
                    settled.0.push(s.partition);
                    settled.1.push(s.offset);
                    settled.2.push(s.status);
                    settled.3.push(s.message_id.as_str());
                    settled.4.push(s.attempts);
                    settled.5.push(s.reason.as_deref());
                    settled.6.push(s.last_error.as_deref());
                }
            }
        }
        let run_id = self.run_id;
        let tx = client.transaction().await?;
        if !sending.0.is_empty() {
            tx.execute(MARK_SENDING, &[&run_id, &sending.0, &sending.1, &sending.2])
                .await?;
        }
        if !settled.0.is_empty() {
            tx.execute(
                MARK_SETTLED,
                &[
                    &run_id, &settled.0, &settled.1, &settled.2, &settled.3, &settled.4,
                    &settled.5, &settled.6,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(vec![(); writes.len()])
    }

    /// A settled row without its texts: its status is what counts.
    fn fallback(&self, write: &LedgerWrite) -> Option<LedgerWrite> {
        match write {
            LedgerWrite::Settled(s) if s.reason.is_some() || s.last_error.is_some() => {
                Some(LedgerWrite::Settled(Settle {
                    reason: None,
                    last_error: None,
                    ..s.clone()
                }))
            }
            _ => None,
        }
    }

    fn answered(&self, write: &LedgerWrite, answer: &Result<(), ItemError>) {
        if let Err(error) = answer {
            let (partition, offset) = match write {
                LedgerWrite::Sending {
                    partition, offset, ..
                } => (*partition, *offset),
                LedgerWrite::Settled(s) => (s.partition, s.offset),
            };
            tracing::error!(run = self.run_id, partition, offset, error = %error,
                "a replay ledger row cannot be written");
        }
    }
}

/// The run's ledger writer.
#[derive(Clone)]
pub(super) struct RunLedger {
    writes: Batcher<WriteRunLedger>,
}

impl RunLedger {
    pub(super) fn spawn(pool: deadpool_postgres::Pool, run_id: i64) -> RunLedger {
        RunLedger {
            writes: Batcher::spawn(pool, WriteRunLedger { run_id }, 1000),
        }
    }

    /// Records `sending` for an event; unless it was, its exchange must
    /// not begin.
    pub(super) async fn sending(
        &self,
        partition: i32,
        offset: i64,
        message_id: &str,
    ) -> Result<(), ItemError> {
        self.writes
            .submit(LedgerWrite::Sending {
                partition,
                offset,
                message_id: message_id.to_string(),
            })
            .await
    }

    /// Records how an event ended (an error is logged by the writer).
    pub(super) async fn settle(&self, settle: Settle) {
        let _ = self.writes.submit(LedgerWrite::Settled(settle)).await;
    }
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement.
pub(super) fn statements() -> Vec<(&'static str, String)> {
    vec![
        (
            "app::replay::ledger::MARK_SENDING",
            MARK_SENDING.to_string(),
        ),
        (
            "app::replay::ledger::MARK_SETTLED",
            MARK_SETTLED.to_string(),
        ),
    ]
}
