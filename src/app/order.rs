//! The reference writer's domain: a new order, parsed from untrusted input
//! into types that cannot hold invalid values, and its one-transaction write
//! of the order together with its `OrderCreated` outbox row.

use serde::Serialize;
use serde_json::json;
use tokio_postgres::{GenericClient, Transaction};

use crate::trace_context::TraceParent;

/// The topic order events go to.
pub const ORDER_CREATED_TOPIC: &str = "order-created";

/// A single mailbox address (`local@domain`), checked strictly enough that it
/// can be put in a mail header as is: no display name, no second address, no
/// whitespace or control characters (so no header injection through CR/LF).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(input: &str) -> Result<EmailAddress, String> {
        if input.is_empty() {
            return Err("email is empty".into());
        }
        if input.len() > 254 {
            return Err("email is longer than 254 characters".into());
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("email contains whitespace or control characters".into());
        }
        if let Some(c) = input.chars().find(|c| "<>()[]\\,;:\"".contains(*c)) {
            return Err(format!(
                "email contains {c:?}: give exactly one plain address"
            ));
        }
        let (local, domain) = input
            .split_once('@')
            .ok_or_else(|| "email has no '@'".to_string())?;
        if domain.contains('@') {
            return Err("email has more than one '@'".into());
        }
        if local.is_empty() || local.len() > 64 {
            return Err("email's local part must be 1 to 64 characters".into());
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err("email's local part has a misplaced '.'".into());
        }
        if !local.is_ascii() {
            return Err("email's local part must be ASCII".into());
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 {
            return Err("email's domain must have a dot (e.g. example.com)".into());
        }
        for label in labels {
            let valid = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !valid {
                return Err(format!("email's domain has an invalid label {label:?}"));
            }
        }
        Ok(EmailAddress(input.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated order request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub user_id: i64,
    pub email: EmailAddress,
    pub amount: i64,
}

/// A field that failed validation, with a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    pub field: &'static str,
    pub message: String,
}

impl NewOrder {
    /// Validates a decoded JSON body. Unknown fields are refused so a typo
    /// (`ammount`) is not silently ignored.
    pub fn from_json(body: &serde_json::Value) -> Result<NewOrder, InvalidField> {
        let object = body.as_object().ok_or(InvalidField {
            field: "body",
            message: "the body must be a JSON object".into(),
        })?;
        if let Some(unknown) = object
            .keys()
            .find(|k| !matches!(k.as_str(), "user_id" | "email" | "amount"))
        {
            return Err(InvalidField {
                field: "body",
                message: format!("unknown field {unknown:?}"),
            });
        }
        let user_id = positive_integer(object.get("user_id"), "user_id")?;
        let amount = positive_integer(object.get("amount"), "amount")?;
        let email = match object.get("email") {
            Some(serde_json::Value::String(s)) => {
                EmailAddress::parse(s).map_err(|message| InvalidField {
                    field: "email",
                    message,
                })?
            }
            Some(_) => {
                return Err(InvalidField {
                    field: "email",
                    message: "email must be a string".into(),
                })
            }
            None => {
                return Err(InvalidField {
                    field: "email",
                    message: "email is required".into(),
                })
            }
        };
        Ok(NewOrder {
            user_id,
            email,
            amount,
        })
    }
}

fn positive_integer(
    value: Option<&serde_json::Value>,
    field: &'static str,
) -> Result<i64, InvalidField> {
    let invalid = |message: String| InvalidField { field, message };
    match value {
        None => Err(invalid(format!("{field} is required"))),
        Some(v) => match v.as_i64() {
            Some(n) if n > 0 => Ok(n),
            Some(_) => Err(invalid(format!("{field} must be greater than 0"))),
            None => Err(invalid(format!(
                "{field} must be a positive integer below 2^63"
            ))),
        },
    }
}

/// A stored order.
#[derive(Debug, Clone, Serialize)]
pub struct Order {
    pub order_id: i64,
    pub user_id: i64,
    pub email: String,
    pub amount: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The order and its `OrderCreated` outbox row in one statement (one round
/// trip; on its own it is its own transaction). The event body built here
/// is [`order_created_payload`]'s (a test holds them equal); `$5`, when
/// given, is the order's `traceparent`, kept in the row's headers.
const PLACE_ORDER: &str = "
    WITH placed AS (
        INSERT INTO orders (user_id, email, amount) VALUES ($1, $2, $3)
        RETURNING id, user_id, email, amount)
    INSERT INTO outbox (topic, key, payload, headers)
    SELECT $4, id::text,
           jsonb_build_object('order_id', id, 'user_id', user_id, 'amount', amount, 'email', email),
           jsonb_strip_nulls(jsonb_build_object('event-type', 'OrderCreated', 'traceparent', $5::text))
      FROM placed
    RETURNING (SELECT id FROM placed)";

/// Inserts the order and its `OrderCreated` outbox row within the caller's
/// transaction: both rows commit together or not at all.
pub async fn insert(tx: &Transaction<'_>, order: &NewOrder) -> Result<i64, tokio_postgres::Error> {
    let no_trace: Option<String> = None;
    let row = tx
        .query_one(PLACE_ORDER, &place_params(order, &no_trace))
        .await?;
    Ok(row.get(0))
}

/// [`insert`] with the statement prepared once per pooled connection, and
/// the order's trace in the event's headers; on a client outside a
/// transaction the order commits by itself.
pub async fn place(
    client: &impl deadpool_postgres::GenericClient,
    order: &NewOrder,
    trace: &TraceParent,
) -> Result<i64, tokio_postgres::Error> {
    let statement = client.prepare_cached(PLACE_ORDER).await?;
    let trace = Some(trace.to_string());
    let row = client
        .query_one(&statement, &place_params(order, &trace))
        .await?;
    Ok(row.get(0))
}

fn place_params<'a>(
    order: &'a NewOrder,
    trace: &'a Option<String>,
) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 5] {
    [
        &order.user_id,
        &order.email.0,
        &order.amount,
        &ORDER_CREATED_TOPIC,
        trace,
    ]
}

/// The `OrderCreated` event body.
pub fn order_created_payload(order_id: i64, order: &NewOrder) -> serde_json::Value {
    json!({
        "order_id": order_id,
        "user_id": order.user_id,
        "amount": order.amount,
        "email": order.email.as_str(),
    })
}

const FIND_ORDER: &str = "SELECT id, user_id, email, amount, created_at FROM orders WHERE id = $1";

pub async fn find(
    client: &impl GenericClient,
    order_id: i64,
) -> Result<Option<Order>, tokio_postgres::Error> {
    let row = client.query_opt(FIND_ORDER, &[&order_id]).await?;
    Ok(row.map(|r| Order {
        order_id: r.get(0),
        user_id: r.get(1),
        email: r.get(2),
        amount: r.get(3),
        created_at: r.get(4),
    }))
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("app::order::PLACE_ORDER", PLACE_ORDER.to_string()),
        ("app::order::FIND_ORDER", FIND_ORDER.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_addresses() {
        for ok in [
            "a@example.com",
            "first.last+tag@mail.example.co.uk",
            "x_y-z@a-b.io",
        ] {
            assert!(EmailAddress::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_header_injection_and_lists() {
        for bad in [
            "a@example.com\r\nBcc: victim@example.com",
            "a@example.com\nx",
            "a@example.com, b@example.com",
            "a@example.com;b@example.com",
            "Alice <a@example.com>",
            "a@b@example.com",
            "a @example.com",
            "",
            "no-at-sign",
            "a@localhost",
            "a@-bad.com",
            ".a@example.com",
            "a..b@example.com",
            "a@exa_mple.com",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn validates_order_fields() {
        let ok = json!({"user_id": 7, "email": "a@example.com", "amount": 1250});
        assert_eq!(NewOrder::from_json(&ok).unwrap().amount, 1250);
        let cases = [
            (
                json!({"user_id": 0, "email": "a@example.com", "amount": 1}),
                "user_id",
            ),
            (
                json!({"user_id": -3, "email": "a@example.com", "amount": 1}),
                "user_id",
            ),
            (
                json!({"user_id": 1.5, "email": "a@example.com", "amount": 1}),
                "user_id",
            ),
            (
                json!({"user_id": "1", "email": "a@example.com", "amount": 1}),
                "user_id",
            ),
            (
                json!({"user_id": 1, "email": "a@example.com", "amount": 0}),
                "amount",
            ),
            (json!({"user_id": 1, "email": "a@example.com"}), "amount"),
            (json!({"user_id": 1, "email": 5, "amount": 1}), "email"),
            (
                json!({"user_id": 1, "email": "a@example.com", "amount": 1, "x": 1}),
                "body",
            ),
            (json!([1, 2]), "body"),
        ];
        for (body, field) in cases {
            assert_eq!(
                NewOrder::from_json(&body).unwrap_err().field,
                field,
                "{body}"
            );
        }
    }
}
