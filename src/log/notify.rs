//! The relay's "records appended" notification: one `NOTIFY` per relay
//! batch (never in a writer's transaction), read on a dedicated LISTEN
//! connection. A pooled connection would drop notifications:
//! tokio-postgres' `Connection` future discards them, so this one is read
//! with `poll_message`.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;

/// The channel the relay notifies once per appended batch.
pub const APPENDED_CHANNEL: &str = "event_log_appended";

/// A counter bumped on every relay batch notification, from a dedicated
/// LISTEN connection (reconnected if it drops).
pub fn listen(database_url: &str) -> anyhow::Result<watch::Receiver<u64>> {
    let (tx, rx) = watch::channel(0u64);
    let url = database_url.to_string();
    let config = crate::db::parse_url(&url)?;
    tokio::spawn(async move {
        loop {
            if tx.is_closed() {
                return;
            }
            match config.connect(tokio_postgres::NoTls).await {
                Ok((client, mut connection)) => {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    let statement = format!("LISTEN {APPENDED_CHANNEL}");
                    let listen = client.batch_execute(&statement);
                    // Drive the connection while LISTEN is sent, then read notifications.
                    tokio::pin!(listen);
                    let mut listening = false;
                    loop {
                        tokio::select! {
                            result = &mut listen, if !listening => {
                                if result.is_err() { break; }
                                listening = true;
                            }
                            message = messages.next() => match message {
                                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                                    tx.send_modify(|n| *n += 1);
                                }
                                Some(Ok(_)) => {}
                                _ => break,
                            },
                            _ = tx.closed() => return,
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "LISTEN connection failed"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    Ok(rx)
}
