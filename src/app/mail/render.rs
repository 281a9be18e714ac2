//! The confirmation mail: the `OrderCreated` event decoded, its Message-ID
//! (derived from the event, so a duplicate is recognisable) and its text
//! and HTML bodies.

use anyhow::Context;
use lettre::message::{header, Mailbox, MultiPart, SinglePart};
use lettre::Message;
use serde::Deserialize;

use crate::app::order::EmailAddress;
use crate::log::Record;
use crate::trace_context::TraceParent;

/// The `OrderCreated` event as the mail worker reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct OrderCreated {
    pub order_id: i64,
    pub user_id: i64,
    pub amount: i64,
    pub email: String,
}

impl OrderCreated {
    /// Decodes a payload strictly: a JSON object with these four fields
    /// (more fields are ignored, so producers can add some), and a
    /// recipient that is one plain address. serde alone would also take a
    /// JSON array, by position: `[424242, 1, 99, "x@example.com"]`.
    pub fn decode(payload: &serde_json::Value) -> Result<(OrderCreated, EmailAddress), String> {
        if !payload.is_object() {
            return Err("undecodable payload: not a JSON object".into());
        }
        let order = serde_json::from_value::<OrderCreated>(payload.clone())
            .map_err(|e| format!("undecodable payload: {e}"))?;
        let to =
            EmailAddress::parse(&order.email).map_err(|e| format!("invalid recipient: {e}"))?;
        Ok((order, to))
    }
}

/// The Message-ID of the confirmation for an event: derived from the event,
/// so a duplicate sent in the crash window carries the same one. A retried
/// dead letter keeps the Message-ID of the event it retries: the relay puts
/// that in the reserved header [`crate::outbox::RETRY_OF_HEADER`], which
/// writers cannot set.
pub fn message_id(record: &Record) -> String {
    let origin = record
        .headers
        .get(crate::outbox::RETRY_OF_HEADER)
        .and_then(|v| v.as_str())
        .and_then(|o| {
            let mut parts = o.rsplitn(3, '/');
            let (offset, partition, topic) = (parts.next()?, parts.next()?, parts.next()?);
            let topic_ok = !topic.is_empty()
                && topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            let valid =
                topic_ok && offset.parse::<i64>().is_ok() && partition.parse::<i32>().is_ok();
            valid.then(|| format!("{topic}.{partition}.{offset}"))
        });
    let id = origin
        .unwrap_or_else(|| format!("{}.{}.{}", record.topic, record.partition, record.offset));
    format!("<{id}@outbox-relay>")
}

/// The Message-ID of a replayed mail: its own, naming the run, so it is
/// neither the live mail's nor another run's.
pub fn replay_message_id(run_id: i64, record: &Record) -> String {
    format!(
        "<replay-{run_id}.{}.{}.{}@outbox-relay>",
        record.topic, record.partition, record.offset
    )
}

/// `X-Outbox-Replay: <run id>` on every mail a replay sends.
#[derive(Debug, Clone)]
pub struct OutboxReplay(pub i64);

impl header::Header for OutboxReplay {
    fn name() -> header::HeaderName {
        header::HeaderName::new_from_ascii_str("X-Outbox-Replay")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(OutboxReplay(s.trim().parse()?))
    }

    fn display(&self) -> header::HeaderValue {
        header::HeaderValue::new(Self::name(), self.0.to_string())
    }
}

/// `Traceparent` on a mail whose record carries a trace: the mail is a
/// span of the order's trace, so the systems that handle it next (an MTA,
/// a mail API) can continue it.
#[derive(Debug, Clone)]
pub struct MailTraceparent(pub TraceParent);

impl header::Header for MailTraceparent {
    fn name() -> header::HeaderName {
        header::HeaderName::new_from_ascii_str("Traceparent")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(MailTraceparent(
            TraceParent::parse(s).ok_or("not a valid traceparent")?,
        ))
    }

    fn display(&self) -> header::HeaderValue {
        header::HeaderValue::new(Self::name(), self.0.to_string())
    }
}

/// The currency order amounts are in: an ISO 4217 code. Amounts are
/// integers in its minor unit (cents for EUR and USD), as `POST /orders`
/// takes them, and mails show them with two decimals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency(String);

impl Currency {
    /// `MAIL_CURRENCY`'s default.
    pub const DEFAULT: &'static str = "EUR";

    /// Three capital letters (EUR, USD, GBP…).
    pub fn parse(code: &str) -> Result<Currency, String> {
        if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Currency(code.to_string()))
        } else {
            Err(format!(
                "{code:?} is not an ISO 4217 currency code (three capital letters, e.g. EUR)"
            ))
        }
    }

    /// The ISO 4217 code.
    pub fn code(&self) -> &str {
        &self.0
    }

    /// `amount` minor units as money: 1099 → "10.99 EUR".
    pub fn format(&self, amount: i64) -> String {
        let sign = if amount < 0 { "-" } else { "" };
        let minor = amount.unsigned_abs();
        format!("{sign}{}.{:02} {}", minor / 100, minor % 100, self.0)
    }
}

impl Default for Currency {
    fn default() -> Currency {
        Currency(Currency::DEFAULT.to_string())
    }
}

/// How the mails are written: who they are from, the amounts' currency.
#[derive(Debug, Clone)]
pub struct Letterhead {
    pub from: Mailbox,
    pub currency: Currency,
}

/// Renders the confirmation mail (plain text with an HTML alternative);
/// `trace` is the send's span, carried by the mail's `Traceparent`.
pub fn render(
    record: &Record,
    order: &OrderCreated,
    to: &EmailAddress,
    letterhead: &Letterhead,
    trace: Option<TraceParent>,
) -> anyhow::Result<Message> {
    build(message_id(record), None, trace, order, to, letterhead)
}

/// Renders the confirmation mail again for replay run `run_id`.
pub fn render_replay(
    run_id: i64,
    record: &Record,
    order: &OrderCreated,
    to: &EmailAddress,
    letterhead: &Letterhead,
) -> anyhow::Result<Message> {
    build(
        replay_message_id(run_id, record),
        Some(run_id),
        TraceParent::from_headers(&record.headers).map(|t| t.child()),
        order,
        to,
        letterhead,
    )
}

fn build(
    message_id: String,
    replay: Option<i64>,
    trace: Option<TraceParent>,
    order: &OrderCreated,
    to: &EmailAddress,
    letterhead: &Letterhead,
) -> anyhow::Result<Message> {
    let from = &letterhead.from;
    let to: Mailbox = to.as_str().parse().context("recipient address")?;
    let subject = format!("Your order #{} is confirmed", order.order_id);
    let text = format!(
        "Hello,\n\nthank you for your order #{id}.\nOrder total: {amount}\n\n\
         We will let you know when it ships.\n",
        id = order.order_id,
        amount = letterhead.currency.format(order.amount)
    );
    let html = format!(
        "<!doctype html><html><body><p>Hello,</p>\
         <p>thank you for your order <strong>#{id}</strong>.</p>\
         <p>Order total: <strong>{amount}</strong></p>\
         <p>We will let you know when it ships.</p></body></html>",
        id = order.order_id,
        amount = letterhead.currency.format(order.amount)
    );
    let mut builder = Message::builder().message_id(Some(message_id));
    if let Some(run_id) = replay {
        builder = builder.header(OutboxReplay(run_id));
    }
    if let Some(trace) = trace {
        builder = builder.header(MailTraceparent(trace));
    }
    builder
        .from(from.clone())
        .to(to)
        .subject(subject)
        .multipart(
            MultiPart::alternative()
                .singlepart(
                    SinglePart::builder()
                        .header(header::ContentType::TEXT_PLAIN)
                        .body(text),
                )
                .singlepart(
                    SinglePart::builder()
                        .header(header::ContentType::TEXT_HTML)
                        .body(html),
                ),
        )
        .context("building the message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_shown_as_money_in_the_currency() {
        let eur = Currency::default();
        assert_eq!(eur.format(1099), "10.99 EUR");
        assert_eq!(eur.format(5), "0.05 EUR");
        assert_eq!(eur.format(-250), "-2.50 EUR");
        assert_eq!(Currency::parse("USD").unwrap().format(100), "1.00 USD");
        for bad in ["usd", "EURO", "E1R", ""] {
            assert!(Currency::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn payloads_are_decoded_strictly() {
        let good = serde_json::json!({"order_id": 7, "user_id": 1, "amount": 5, "email": "a@example.com", "note": "extra"});
        assert_eq!(OrderCreated::decode(&good).unwrap().0.order_id, 7);
        let array = serde_json::json!([424242, 1, 99, "array-payload@example.com"]);
        assert!(OrderCreated::decode(&array)
            .unwrap_err()
            .contains("not a JSON object"));
        let missing = serde_json::json!({"order_id": 7, "user_id": 1, "email": "a@example.com"});
        assert!(OrderCreated::decode(&missing)
            .unwrap_err()
            .contains("amount"));
        let injected = serde_json::json!({"order_id": 7, "user_id": 1, "amount": 5, "email": "a@example.com\r\nBcc: x@example.com"});
        assert!(OrderCreated::decode(&injected)
            .unwrap_err()
            .starts_with("invalid recipient"));
    }

    #[test]
    fn message_ids_come_from_the_event_or_the_event_it_retries() {
        let mut record = Record {
            topic: "order-created".into(),
            partition: 3,
            offset: 42,
            key: None,
            created_at: chrono::Utc::now(),
            appended_at: chrono::Utc::now(),
            headers: serde_json::json!({}),
            payload: serde_json::json!({}),
        };
        assert_eq!(message_id(&record), "<order-created.3.42@outbox-relay>");
        record.headers = serde_json::json!({"outbox-relay-retry-of": "order-created/1/7"});
        assert_eq!(message_id(&record), "<order-created.1.7@outbox-relay>");
        record.headers = serde_json::json!({"retry-of": "order-created/1/7"});
        assert_eq!(
            message_id(&record),
            "<order-created.3.42@outbox-relay>",
            "a writer's own retry-of header means nothing"
        );
        record.headers = serde_json::json!({"outbox-relay-retry-of": "x>\r\nBcc: a@b.c/1/7"});
        assert_eq!(
            message_id(&record),
            "<order-created.3.42@outbox-relay>",
            "a forged header is ignored"
        );
    }
}
