//! Many callers' small statements as one (group commit): whatever arrives
//! while a batch is being written goes into the next statement, so a
//! thousand `sent` marks share one round trip and one commit.
//!
//! One item's failure never holds back another's (docs/invariants.md, 9):
//! - an error that is about the statement or its data (not transient, see
//!   [`super::is_transient`]) makes the batch be written again item by item;
//!   an item that fails on its own is tried once in its fallback form, if the
//!   statement has one, and is then answered with its error, while every
//!   other item is written;
//! - a transient error (a lost connection, a pool waiting for a slot, a
//!   serialization failure) is retried after a short pause until the batch
//!   is in. Callers just wait: a database outage is one warning every few
//!   seconds, not one per item.
//!
//! An item handed over is written whatever happens to the caller that
//! handed it over. Nothing here bounds how many items wait: each caller
//! waits for its answer, so they are at most as many as the callers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// The statements a [`Batcher`] runs.
pub trait BatchStatement: Send + Sync + 'static {
    type Item: Send + Sync + 'static;
    type Output: Send + 'static;

    /// What the items are, for log lines ("sent marks").
    const WHAT: &'static str;

    /// Writes (or reads) `items` on `client`, in one transaction: one
    /// output per item, in their order.
    fn run(
        &self,
        client: &mut deadpool_postgres::Client,
        items: &[Self::Item],
    ) -> impl Future<Output = anyhow::Result<Vec<Self::Output>>> + Send;

    /// A smaller form of an item the database refused on its own (say,
    /// without the columns that came from a writer), tried once.
    fn fallback(&self, _item: &Self::Item) -> Option<Self::Item> {
        None
    }

    /// Called once per item handed over, with its answer, before the
    /// caller gets it (even if the caller has gone).
    fn answered(&self, _item: &Self::Item, _answer: &Result<Self::Output, ItemError>) {}
}

/// Why an item got no output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// The database refused this item (and its fallback), with this error
    /// (clipped): the same statement would fail the same way again.
    #[error("{0}")]
    Refused(String),
    /// The batcher's task is gone (the process is stopping).
    #[error("the writer of {0} stopped")]
    Stopped(&'static str),
}

type Request<S> = (
    <S as BatchStatement>::Item,
    oneshot::Sender<Result<<S as BatchStatement>::Output, ItemError>>,
);

/// Runs a [`BatchStatement`] for many callers, a batch at a time.
pub struct Batcher<S: BatchStatement> {
    requests: mpsc::UnboundedSender<Request<S>>,
}

impl<S: BatchStatement> Clone for Batcher<S> {
    fn clone(&self) -> Self {
        Batcher {
            requests: self.requests.clone(),
        }
    }
}

impl<S: BatchStatement> Batcher<S> {
    /// Starts the task that runs `statement` on connections of `pool`, at
    /// most `max_batch` items a statement.
    pub fn spawn(pool: deadpool_postgres::Pool, statement: S, max_batch: usize) -> Batcher<S> {
        let (requests, mut rx) = mpsc::unbounded_channel::<Request<S>>();
        let statement = Arc::new(statement);
        tokio::spawn(async move {
            // Whatever waits goes in one batch; 0 only once the channel closed.
            let mut waiting = Vec::new();
            while rx.recv_many(&mut waiting, max_batch.max(1)).await > 0 {
                let (items, replies): (Vec<S::Item>, Vec<_>) = waiting.drain(..).unzip();
                let answers = run_isolated(&pool, &*statement, &items).await;
                for ((item, reply), answer) in items.iter().zip(replies).zip(answers) {
                    statement.answered(item, &answer);
                    let _ = reply.send(answer);
                }
            }
        });
        Batcher { requests }
    }

    /// Hands `item` over: it is written even if the caller goes away. The
    /// receiver gets its answer.
    pub fn hand_over(&self, item: S::Item) -> oneshot::Receiver<Result<S::Output, ItemError>> {
        let (reply, answer) = oneshot::channel();
        // A closed channel drops `reply`: the receiver then reads Stopped.
        let _ = self.requests.send((item, reply));
        answer
    }

    /// Writes (or reads) `item` with whatever else waits, and returns its answer.
    pub async fn submit(&self, item: S::Item) -> Result<S::Output, ItemError> {
        self.hand_over(item)
            .await
            .unwrap_or(Err(ItemError::Stopped(S::WHAT)))
    }
}

/// Answers for `items`: the whole batch at once, or, when the database
/// refuses it, each item on its own.
async fn run_isolated<S: BatchStatement>(
    pool: &deadpool_postgres::Pool,
    statement: &S,
    items: &[S::Item],
) -> Vec<Result<S::Output, ItemError>> {
    let refused = match run_retrying(pool, statement, items).await {
        Ok(outputs) => return outputs.into_iter().map(Ok).collect(),
        Err(refused) => refused,
    };
    if items.len() > 1 {
        tracing::warn!(
            items = items.len(),
            error = %refused,
            "the database refused a batch of {}; writing them one by one",
            S::WHAT
        );
    }
    let mut answers = Vec::with_capacity(items.len());
    for item in items {
        let mut answer = one(pool, statement, item).await;
        if answer.is_err() {
            if let Some(smaller) = statement.fallback(item) {
                answer = one(pool, statement, &smaller).await;
            }
        }
        answers.push(answer);
    }
    answers
}

async fn one<S: BatchStatement>(
    pool: &deadpool_postgres::Pool,
    statement: &S,
    item: &S::Item,
) -> Result<S::Output, ItemError> {
    let mut outputs = run_retrying(pool, statement, std::slice::from_ref(item))
        .await
        .map_err(ItemError::Refused)?;
    outputs
        .pop()
        .ok_or_else(|| ItemError::Refused("the statement returned no answer".into()))
}

/// Runs the statement until it succeeds or fails with an error that is
/// not transient (returned, clipped).
async fn run_retrying<S: BatchStatement>(
    pool: &deadpool_postgres::Pool,
    statement: &S,
    items: &[S::Item],
) -> Result<Vec<S::Output>, String> {
    let mut failures = 0u32;
    loop {
        let result = async {
            let mut client = pool.get().await?;
            statement.run(&mut client, items).await
        }
        .await;
        let error = match result {
            Ok(outputs) if outputs.len() == items.len() => return Ok(outputs),
            Ok(outputs) => {
                return Err(format!(
                    "{} answers for {} items",
                    outputs.len(),
                    items.len()
                ))
            }
            Err(e) if !super::is_transient(&e) => return Err(crate::clip::clip_error(&e)),
            Err(e) => e,
        };
        if failures.is_multiple_of(20) {
            tracing::warn!(
                items = items.len(),
                error = %crate::clip::clip_error(&error),
                "could not write {}; retrying",
                S::WHAT
            );
        }
        // Short pauses: once the database is back, what waits here (a
        // `sent` mark) must be in before another member takes over.
        tokio::time::sleep(Duration::from_millis(50) * 2u32.pow(failures.min(2))).await;
        failures += 1;
    }
}
