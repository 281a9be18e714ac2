//! The mail's side of a replay: each event of a run rendered as a replayed
//! confirmation (its own Message-ID, `X-Outbox-Replay`) and sent through
//! the SMTP transport.

use lettre::Message;

use super::{
    render_replay, replay_message_id, Letterhead, MailTransport, OrderCreated, SendOutcome,
    SendSlot,
};
use crate::app::replay::{Outcome, ReplayTarget};
use crate::log::Record;

/// Confirmation mails, sent again by a replay.
pub struct MailReplay {
    pub transport: MailTransport,
    pub letterhead: Letterhead,
}

impl ReplayTarget for MailReplay {
    /// The mail, and its name for the transport (a `.eml` file's).
    type Ready = (Message, String);
    type Slot<'a> = SendSlot<'a>;

    fn event_id(&self, run_id: i64, record: &Record) -> String {
        replay_message_id(run_id, record)
    }

    fn prepare(
        &self,
        run_id: i64,
        record: &Record,
        _event_id: &str,
    ) -> Result<Self::Ready, String> {
        let (order, to) = OrderCreated::decode(&record.payload)?;
        let message = render_replay(run_id, record, &order, &to, &self.letterhead)
            .map_err(|e| format!("cannot render: {e:#}"))?;
        let name = format!(
            "order-{}.replay-{run_id}.{}.{}.{}",
            order.order_id, record.topic, record.partition, record.offset
        );
        Ok((message, name))
    }

    async fn slot(&self) -> SendSlot<'_> {
        self.transport.slot().await
    }

    async fn attempt<'a>(
        &'a self,
        (message, name): &'a Self::Ready,
        slot: Option<SendSlot<'a>>,
    ) -> Outcome {
        let outcome = match slot {
            Some(slot) => slot.send(message.clone(), name).await,
            None => self.transport.send(message.clone(), name).await,
        };
        match outcome {
            SendOutcome::Sent => Outcome::Sent,
            SendOutcome::Permanent(error) => Outcome::Permanent {
                reason: "permanent SMTP failure".into(),
                error,
            },
            // The message reached the server and no final answer came.
            SendOutcome::Unknown(error) => Outcome::Unknown(error),
            SendOutcome::Transient(error) => Outcome::Transient(error),
        }
    }
}
