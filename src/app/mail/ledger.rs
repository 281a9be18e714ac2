//! The delivery ledger (`mail_deliveries`): one row per (group, event).
//!
//! `pending` (an attempt failed, more will come) → `sent` | `failed`
//! (parked as a dead letter) | `unknown` (the message reached the server but
//! no final answer came, and the retries ended without a definite one).
//!
//! * `sent` is a fact about the world: it is recorded whoever sent the mail
//!   (even a member that meanwhile lost the partition) and nothing ever
//!   replaces it.
//! * Every other write is fenced like an offset commit: only the member that
//!   owns the partition at its epoch may write it (docs/invariants.md, 6).
//! * `sent` marks are written in batches by one writer per process, which
//!   keeps each mark until it is in the ledger: a partition worker that is
//!   restarted (say, after a database restart) finds the mark still waiting
//!   and does not send the mail again. One mark the database refuses holds
//!   back no other ([`crate::db::batch`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::MAIL_GROUP;
use crate::db::batch::{BatchStatement, Batcher, ItemError};
use crate::group::consumer::Lease;

/// The status and attempts of many events at once: `$2`–`$4` are their
/// topics, partitions and offsets; each row names its event by position.
///
/// One primary-key probe per event, whatever the ledger's statistics say:
/// the `LIMIT` keeps the lookup a lateral subquery, so the planner cannot
/// turn it into a hash join over the group's whole ledger. That join is
/// what a plan made on an empty or unanalysed ledger chose, and it read
/// every row of the ledger per call (32 s a call at 300,000 rows, in a
/// generic plan cached while the ledger was empty). The statement is also
/// planned for each call (run unprepared, see [`ReadStatuses`]): a plan
/// cached while the ledger was empty probes it with a sequential scan.
/// docs/benchmarks.md has the plans.
pub(super) const LEDGER_STATUSES: &str = "
    SELECT v.i, d.status, d.attempts
      FROM unnest($2::text[], $3::int4[], $4::int8[]) WITH ORDINALITY AS v(topic, partition, log_offset, i)
     CROSS JOIN LATERAL (
           SELECT d.status, d.attempts FROM mail_deliveries d
            WHERE d.group_id = $1 AND d.topic = v.topic AND d.partition = v.partition
              AND d.\"offset\" = v.log_offset
            LIMIT 1) d";

/// Records `sent` for a batch of events in one statement (one commit).
/// Never fenced: the mail went out, whoever sent it.
pub(super) const MARK_SENT: &str = "
    INSERT INTO mail_deliveries (group_id, topic, partition, \"offset\", key, message_id, recipient, status, attempts, sent_at)
    SELECT $1, v.topic, v.partition, v.log_offset, v.key, v.message_id, v.recipient, 'sent', 1, now()
      FROM unnest($2::text[], $3::int4[], $4::int8[], $5::text[], $6::text[], $7::text[])
           AS v(topic, partition, log_offset, message_id, recipient, key)
    ON CONFLICT (group_id, topic, partition, \"offset\") DO UPDATE
       SET status = 'sent', attempts = mail_deliveries.attempts + 1, sent_at = now(),
           last_error = NULL, updated_at = now()
     WHERE mail_deliveries.status <> 'sent'";

/// Records an attempt that did not deliver (`$9` true: its outcome is
/// unknown); the event stays `pending`. Fenced by the partition's owner
/// (`$10`) and epoch (`$11`); no row back means fenced, or no longer pending.
/// Returns the attempts, the unknown outcomes and the seconds since the
/// first attempt.
pub(super) const MARK_ATTEMPT: &str = "
    INSERT INTO mail_deliveries (group_id, topic, partition, \"offset\", message_id, recipient, status,
                                 attempts, last_error, key, unknown_outcomes, first_attempt_at)
    SELECT $1, $2, $3, $4, $5, $6, 'pending', 1, $7, $8, CASE WHEN $9 THEN 1 ELSE 0 END, now()
     WHERE EXISTS (SELECT 1 FROM group_partitions g
                    WHERE g.group_id = $1 AND g.topic = $2 AND g.partition = $3
                      AND g.owner = $10 AND g.epoch = $11)
    ON CONFLICT (group_id, topic, partition, \"offset\") DO UPDATE
       SET attempts = mail_deliveries.attempts + 1, last_error = $7, updated_at = now(),
           unknown_outcomes = mail_deliveries.unknown_outcomes + CASE WHEN $9 THEN 1 ELSE 0 END,
           first_attempt_at = coalesce(mail_deliveries.first_attempt_at, now())
     WHERE mail_deliveries.status = 'pending'
    RETURNING attempts, unknown_outcomes,
              extract(epoch FROM now() - first_attempt_at)::float8";

/// Records the event as parked (`failed`), with the attempts it took. Run
/// in the transaction that parks the dead letter, after its ownership check.
pub(super) const MARK_FAILED: &str = "
    INSERT INTO mail_deliveries (group_id, topic, partition, \"offset\", message_id, status, attempts, last_error, key)
    VALUES ($1, $2, $3, $4, $5, 'failed', $6, $7, $8)
    ON CONFLICT (group_id, topic, partition, \"offset\")
    DO UPDATE SET status = 'failed', attempts = $6, last_error = $7, updated_at = now()
     WHERE mail_deliveries.status = 'pending'";

/// Ends an event's retries with its outcome unknown (some attempt sent the
/// message without a final answer): not a failure, not parked. Fenced.
pub(super) const MARK_UNKNOWN: &str = "
    UPDATE mail_deliveries d SET status = 'unknown', updated_at = now()
      FROM group_partitions g
     WHERE d.group_id = $1 AND d.topic = $2 AND d.partition = $3 AND d.\"offset\" = $4
       AND d.status = 'pending'
       AND g.group_id = d.group_id AND g.topic = d.topic AND g.partition = d.partition
       AND g.owner = $5 AND g.epoch = $6";

/// The highest offset of a partition the ledger holds a row for, and the
/// last offset in the partition now. `ORDER BY … LIMIT 1` rather than
/// `max()`, run unprepared (planned as the ledger is now): a plan cached
/// while the ledger was empty computed `max()` with a sequential scan (184
/// ms at a million rows, growing); this one walks the primary key
/// backwards from its end.
pub(super) const LEDGER_HIGH_WATER: &str = "
    SELECT coalesce((SELECT \"offset\" FROM mail_deliveries
                      WHERE group_id = $1 AND topic = $2 AND partition = $3
                      ORDER BY \"offset\" DESC LIMIT 1), -1),
           coalesce((SELECT log_end_offset FROM partition_heads
                      WHERE topic = $2 AND partition = $3), 0) - 1";

/// Per partition, an offset at or above every offset anyone may have
/// written (or may still write) a ledger row for, so a record above it
/// needs no ledger read before its first delivery (one round trip less per
/// mail).
///
/// Read once per ownership epoch: the larger of the ledger's highest
/// offset and the partition's last offset at that moment. A former owner
/// (fenced) can only have had records in flight that were in the log then,
/// and its `sent` marks for them may land at any time, unfenced: those
/// offsets are at or below the ceiling and read the ledger at handling time,
/// as before. This process raises the ceiling before it sends or parks
/// anything, so a record handled again here (a restarted partition worker)
/// reads the ledger too.
#[derive(Default)]
pub(super) struct LedgerCeiling {
    /// Held across a ledger read, so the records of a partition that all
    /// arrive at once (a backlog) read it once, not once each: thousands of
    /// reads at once starved the worker's pool.
    partitions: tokio::sync::Mutex<HashMap<(String, i32), Ceiling>>,
}

#[derive(Clone, Copy)]
struct Ceiling {
    /// The epoch whose ledger read this includes (None: not read yet).
    read_at_epoch: Option<i64>,
    offset: i64,
}

impl LedgerCeiling {
    /// The ceiling for `lease`'s partition in `group`'s ledger, read from the
    /// ledger once per epoch (a connection is taken from `pool` only then).
    pub(super) async fn get(
        &self,
        pool: &deadpool_postgres::Pool,
        group: &str,
        lease: &Lease,
    ) -> anyhow::Result<i64> {
        let key = (lease.topic.clone(), lease.partition);
        let mut partitions = self.partitions.lock().await;
        let ceiling = partitions.entry(key).or_insert(Ceiling {
            read_at_epoch: None,
            offset: -1,
        });
        if ceiling.read_at_epoch >= Some(lease.epoch) {
            return Ok(ceiling.offset);
        }
        let client = pool.get().await?;
        // Unprepared: planned as the ledger is now (once per epoch).
        let row = client
            .query_one(LEDGER_HIGH_WATER, &[&group, &lease.topic, &lease.partition])
            .await?;
        let (in_ledger, in_log): (i64, i64) = (row.get(0), row.get(1));
        ceiling.offset = ceiling.offset.max(in_ledger).max(in_log);
        ceiling.read_at_epoch = ceiling.read_at_epoch.max(Some(lease.epoch));
        Ok(ceiling.offset)
    }

    /// This process is about to write ledger rows for `offset`.
    pub(super) async fn raise(&self, topic: &str, partition: i32, offset: i64) {
        let mut partitions = self.partitions.lock().await;
        let ceiling = partitions
            .entry((topic.to_string(), partition))
            .or_insert(Ceiling {
                read_at_epoch: None,
                offset: -1,
            });
        ceiling.offset = ceiling.offset.max(offset);
    }
}

/// An event: (topic, partition, offset).
pub(super) type EventKey = (String, i32, i64);

/// What the ledger says of an event: its status and attempts (None: no row).
pub(super) type LedgerStatus = Option<(String, i32)>;

/// Most items in one statement.
const MAX_BATCH: usize = 1000;

/// Ledger statuses, read for many events at once: the reads that arrive
/// while one is being answered go in the next statement, so the mails of a
/// backlog (each below its partition's ceiling) share a round trip instead
/// of one each.
pub(super) struct ReadStatuses {
    group: String,
}

impl BatchStatement for ReadStatuses {
    type Item = EventKey;
    type Output = LedgerStatus;
    const WHAT: &'static str = "delivery ledger reads";

    async fn run(
        &self,
        client: &mut deadpool_postgres::Client,
        events: &[EventKey],
    ) -> anyhow::Result<Vec<LedgerStatus>> {
        // Unprepared: planned for this call, as the ledger is now.
        let statement = client.prepare(LEDGER_STATUSES).await?;
        let topics: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
        let partitions: Vec<i32> = events.iter().map(|e| e.1).collect();
        let offsets: Vec<i64> = events.iter().map(|e| e.2).collect();
        let mut statuses: Vec<LedgerStatus> = vec![None; events.len()];
        for row in client
            .query(&statement, &[&self.group, &topics, &partitions, &offsets])
            .await?
        {
            let i: i64 = row.get(0);
            statuses[i as usize - 1] = Some((row.get(1), row.get(2)));
        }
        Ok(statuses)
    }
}

/// The process's reader of ledger statuses.
pub(super) type LedgerReads = Batcher<ReadStatuses>;

pub(super) fn ledger_reads(pool: deadpool_postgres::Pool, group: String) -> LedgerReads {
    Batcher::spawn(pool, ReadStatuses { group }, MAX_BATCH)
}

/// One `sent` to record.
#[derive(Clone)]
pub(super) struct SentMark {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) key: Option<String>,
    pub(super) message_id: String,
    pub(super) recipient: Option<String>,
}

impl SentMark {
    fn event(&self) -> EventKey {
        (self.topic.clone(), self.partition, self.offset)
    }
}

/// Marks handed over and not yet in the ledger, each with a flag that
/// turns true once it is settled (written, or given up on).
type Unrecorded = Arc<Mutex<HashMap<EventKey, watch::Sender<bool>>>>;

/// Writes `sent` marks, many in one statement (one commit, one fsync).
struct MarkSent {
    group: String,
    unrecorded: Unrecorded,
}

impl BatchStatement for MarkSent {
    type Item = SentMark;
    type Output = ();
    const WHAT: &'static str = "sent marks";

    async fn run(
        &self,
        client: &mut deadpool_postgres::Client,
        marks: &[SentMark],
    ) -> anyhow::Result<Vec<()>> {
        let topics: Vec<&str> = marks.iter().map(|m| m.topic.as_str()).collect();
        let partitions: Vec<i32> = marks.iter().map(|m| m.partition).collect();
        let offsets: Vec<i64> = marks.iter().map(|m| m.offset).collect();
        let ids: Vec<&str> = marks.iter().map(|m| m.message_id.as_str()).collect();
        let recipients: Vec<Option<&str>> = marks.iter().map(|m| m.recipient.as_deref()).collect();
        let keys: Vec<Option<&str>> = marks.iter().map(|m| m.key.as_deref()).collect();
        // Prepared once per connection: one round trip, no parse or plan.
        let mark_sent = client.prepare_cached(MARK_SENT).await?;
        client
            .execute(
                &mark_sent,
                &[
                    &self.group,
                    &topics,
                    &partitions,
                    &offsets,
                    &ids,
                    &recipients,
                    &keys,
                ],
            )
            .await?;
        Ok(vec![(); marks.len()])
    }

    /// The mark without what came from the record (its key and recipient):
    /// `sent` is what stops a second mail.
    fn fallback(&self, mark: &SentMark) -> Option<SentMark> {
        (mark.key.is_some() || mark.recipient.is_some()).then(|| SentMark {
            key: None,
            recipient: None,
            ..mark.clone()
        })
    }

    fn answered(&self, mark: &SentMark, answer: &Result<(), ItemError>) {
        if let Err(error) = answer {
            tracing::error!(
                topic = %mark.topic, partition = mark.partition, offset = mark.offset,
                message_id = %mark.message_id, error = %error,
                "a sent mail's mark cannot be written: the mail would go out again if its event were delivered again"
            );
        }
        let done = self
            .unrecorded
            .lock()
            .expect("ledger lock")
            .remove(&mark.event());
        if let Some(done) = done {
            let _ = done.send(true);
        }
    }
}

/// The process's writer of `sent` marks: a mark handed over is kept by the
/// process until it is in the ledger (retried while the database is away),
/// whatever happens to the worker that sent the mail. A mark the database
/// refuses for itself is written without the record's key and recipient;
/// if even that is refused, the error is logged with the event, and the
/// record is settled all the same (the mail went out): no mark holds back
/// another.
pub(super) struct SentLedger {
    marks: Batcher<MarkSent>,
    unrecorded: Unrecorded,
}

impl SentLedger {
    pub(super) fn spawn(pool: deadpool_postgres::Pool, group: String) -> SentLedger {
        let unrecorded = Unrecorded::default();
        let statement = MarkSent {
            group,
            unrecorded: unrecorded.clone(),
        };
        SentLedger {
            marks: Batcher::spawn(pool, statement, MAX_BATCH),
            unrecorded,
        }
    }

    /// Hands a `sent` mark over; it is written even if the caller goes
    /// away. The receiver turns true once it is settled.
    pub(super) fn record(&self, mark: SentMark) -> watch::Receiver<bool> {
        let (done, settled) = watch::channel(false);
        self.unrecorded
            .lock()
            .expect("ledger lock")
            .insert(mark.event(), done);
        // Answered through `MarkSent::answered`, whoever waits.
        drop(self.marks.hand_over(mark));
        settled
    }

    /// The flag of a mark for `key` handed over and not yet settled.
    pub(super) fn unrecorded(&self, key: &EventKey) -> Option<watch::Receiver<bool>> {
        self.unrecorded
            .lock()
            .expect("ledger lock")
            .get(key)
            .map(watch::Sender::subscribe)
    }

    /// Waits up to `within` for every mark handed over to be settled;
    /// returns the events whose marks are still unwritten.
    pub(super) async fn flush(&self, within: Duration) -> Vec<EventKey> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let waiting: Vec<(EventKey, watch::Receiver<bool>)> = self
                .unrecorded
                .lock()
                .expect("ledger lock")
                .iter()
                .map(|(event, done)| (event.clone(), done.subscribe()))
                .collect();
            let Some((_, mut first)) = waiting.first().cloned() else {
                return Vec::new();
            };
            let settled = tokio::time::timeout_at(deadline, first.wait_for(|done| *done)).await;
            if settled.is_err() {
                return waiting.into_iter().map(|(event, _)| event).collect();
            }
        }
    }
}

/// What the ledger says after an attempt that did not deliver.
pub(super) struct AttemptsSoFar {
    pub(super) attempts: i32,
    pub(super) unknown_outcomes: i32,
    /// Since the first attempt (the database's clock).
    pub(super) elapsed: Duration,
}

/// Records an attempt that did not deliver; None when fenced (or the event
/// is no longer pending).
pub(super) async fn mark_attempt(
    client: &impl tokio_postgres::GenericClient,
    lease: &Lease,
    record: &crate::log::Record,
    message_id: &str,
    recipient: &str,
    error: &str,
    unknown: bool,
) -> Result<Option<AttemptsSoFar>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            MARK_ATTEMPT,
            &[
                &lease.group_id,
                &lease.topic,
                &lease.partition,
                &record.offset,
                &message_id,
                &recipient,
                &error,
                &record.key,
                &unknown,
                &lease.member_id,
                &lease.epoch,
            ],
        )
        .await?;
    Ok(row.map(|r| AttemptsSoFar {
        attempts: r.get(0),
        unknown_outcomes: r.get(1),
        elapsed: Duration::from_secs_f64(r.get::<_, f64>(2).max(0.0)),
    }))
}

/// Where an order's confirmation mail stands (`GET /orders/{id}`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ConfirmationMail {
    /// Not sent yet: not in the log yet, waiting for its turn, or between
    /// retries (`attempts` failed so far, the last with `last_error`).
    Pending {
        attempts: i32,
        last_error: Option<String>,
    },
    /// Accepted by the SMTP server.
    Sent {
        sent_at: Option<chrono::DateTime<chrono::Utc>>,
        message_id: String,
    },
    /// Parked as a dead letter (see `outbox-relay dead-letters list`).
    DeadLetter {
        dead_letter_id: Option<i64>,
        reason: Option<String>,
        last_error: Option<String>,
    },
    /// The message reached the SMTP server but no final answer came, and
    /// retries ended without a definite one: it may have been delivered.
    OutcomeUnknown {
        attempts: i32,
        last_error: Option<String>,
    },
}

/// The ledger's best word on the mail of events with `key`: `sent` if any
/// was, else the latest attempt. A dead letter that was retried is pending
/// again (its retry is a new event).
const MAIL_FOR_KEY: &str = "
    SELECT d.status, d.attempts, d.last_error, d.sent_at, d.message_id, l.id, l.reason, l.status
      FROM mail_deliveries d
      LEFT JOIN dead_letters l ON l.group_id = d.group_id AND l.topic = d.topic
                              AND l.partition = d.partition AND l.\"offset\" = d.\"offset\"
     WHERE d.group_id = $1 AND d.topic = $2 AND d.key = $3
     ORDER BY d.status = 'sent' DESC, d.updated_at DESC
     LIMIT 1";

/// The confirmation mail of order `order_id`.
pub async fn confirmation_mail(
    client: &impl tokio_postgres::GenericClient,
    order_id: i64,
) -> Result<ConfirmationMail, tokio_postgres::Error> {
    let row = client
        .query_opt(
            MAIL_FOR_KEY,
            &[
                &MAIL_GROUP,
                &crate::app::order::ORDER_CREATED_TOPIC,
                &order_id.to_string(),
            ],
        )
        .await?;
    let Some(row) = row else {
        return Ok(ConfirmationMail::Pending {
            attempts: 0,
            last_error: None,
        });
    };
    let status: &str = row.get(0);
    let dead_letter_status: Option<&str> = row.get(7);
    Ok(match status {
        "sent" => ConfirmationMail::Sent {
            sent_at: row.get(3),
            message_id: row.get(4),
        },
        "failed" if dead_letter_status != Some("retried") => ConfirmationMail::DeadLetter {
            dead_letter_id: row.get(5),
            reason: row.get(6),
            last_error: row.get(2),
        },
        "unknown" => ConfirmationMail::OutcomeUnknown {
            attempts: row.get(1),
            last_error: row.get(2),
        },
        _ => ConfirmationMail::Pending {
            attempts: row.get(1),
            last_error: row.get(2),
        },
    })
}

const SENT_COUNT_FOR_KEYS: &str = "
    SELECT count(DISTINCT key) FROM mail_deliveries
     WHERE group_id = $1 AND topic = $2 AND status = 'sent' AND key = ANY($3)";

/// How many of `keys` have a `sent` confirmation (the demo waits on it).
pub async fn sent_count_for_keys(
    client: &impl tokio_postgres::GenericClient,
    keys: &[String],
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            SENT_COUNT_FOR_KEYS,
            &[&MAIL_GROUP, &crate::app::order::ORDER_CREATED_TOPIC, &keys],
        )
        .await?
        .get(0))
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(super) fn statements() -> Vec<(&'static str, String)> {
    vec![
        (
            "app::mail::ledger::LEDGER_HIGH_WATER",
            LEDGER_HIGH_WATER.to_string(),
        ),
        (
            "app::mail::ledger::LEDGER_STATUSES",
            LEDGER_STATUSES.to_string(),
        ),
        ("app::mail::ledger::MARK_SENT", MARK_SENT.to_string()),
        ("app::mail::ledger::MARK_ATTEMPT", MARK_ATTEMPT.to_string()),
        ("app::mail::ledger::MARK_UNKNOWN", MARK_UNKNOWN.to_string()),
        ("app::mail::ledger::MARK_FAILED", MARK_FAILED.to_string()),
        ("app::mail::ledger::MAIL_FOR_KEY", MAIL_FOR_KEY.to_string()),
        (
            "app::mail::ledger::SENT_COUNT_FOR_KEYS",
            SENT_COUNT_FOR_KEYS.to_string(),
        ),
    ]
}
