//! What every console page shares: the layout, the request's context (the
//! base path behind a reverse proxy, the session), errors as a page (or
//! JSON for a caller that does not ask for HTML), bounded reads, and the
//! masking of email addresses.

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use maud::{html, Markup, DOCTYPE};

use super::session::Session;
use super::Console;

/// The rows a page shows at most.
pub const PAGE_ROWS: i64 = 50;

/// A browsing read ends after this; the page says so and offers to go on.
pub const BROWSE_TIMEOUT: Duration = Duration::from_millis(1500);

/// The console's path: `X-Forwarded-Prefix` (a reverse proxy that mounts
/// it elsewhere; only plain path segments are taken) then `/console`.
pub fn base(headers: &HeaderMap) -> String {
    let prefix = headers
        .get("x-forwarded-prefix")
        .and_then(|v| v.to_str().ok())
        .map(|p| p.trim_end_matches('/'))
        .filter(|p| {
            p.len() <= 200
                && p.split('/').skip(1).all(|segment| {
                    !segment.is_empty()
                        && segment
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
                })
                && (p.is_empty() || p.starts_with('/'))
        })
        .unwrap_or("");
    format!("{prefix}/console")
}

/// A browser asks for HTML; a script (curl, a test's client) does not.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// A request's context: where the console is, who asks, what they may do.
pub struct Ctx {
    pub base: String,
    pub session: Session,
    pub read_only: bool,
}

impl Ctx {
    /// Whether write controls are rendered (the routes check again).
    pub fn can_write(&self) -> bool {
        !self.read_only && self.session.permissions.write
    }

    pub fn can_see_payloads(&self) -> bool {
        self.session.permissions.payloads
    }

    /// Free text that may quote an address (an SMTP error, a record's key),
    /// masked unless the session may see payloads.
    pub fn shown(&self, text: &str) -> String {
        if self.can_see_payloads() {
            text.to_string()
        } else {
            mask_emails(text)
        }
    }

    /// The hidden CSRF field every write form carries.
    pub fn csrf(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.session.csrf.as_deref().unwrap_or("")); }
    }

    /// A page in the console's layout.
    pub fn page(&self, title: &str, body: Markup) -> Markup {
        let base = &self.base;
        let nav = [
            ("", "Overview"),
            ("/orders", "Orders"),
            ("/topics", "Topics"),
            ("/groups", "Groups"),
            ("/dead-letters", "Dead letters"),
            ("/parked", "Parked rows"),
            ("/replays", "Replays"),
            ("/audit", "Audit"),
        ];
        layout(
            base,
            title,
            html! {
                nav {
                    strong { "outbox-relay" }
                    @for (path, name) in nav { a href={(base) (if path.is_empty() { "/" } else { path })} { (name) } }
                    span.who {
                        (self.session.user)
                        @if self.read_only { " · " span.badge data-test="read-only" { "read-only" } }
                        @if !self.session.permissions.payloads { " · payloads masked" }
                        @if self.session.user != "local" {
                            form.inline method="post" action={(base) "/logout"} {
                                (self.csrf()) button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            },
        )
    }
}

impl FromRequestParts<Console> for Ctx {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Ctx, Failure> {
        let session =
            parts.extensions.get::<Session>().cloned().ok_or_else(|| {
                Failure::new(StatusCode::UNAUTHORIZED, "unauthenticated", "log in")
            })?;
        Ok(Ctx {
            base: base(&parts.headers),
            session,
            read_only: console.read_only,
        })
    }
}

fn layout(base: &str, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · outbox-relay" }
                link rel="stylesheet" href={(base) "/assets/" (super::assets::CSS)};
                script src={(base) "/assets/" (super::assets::HTMX)} {}
                script src={(base) "/assets/" (super::assets::HTMX_SSE)} {}
            }
            body { (body) }
        }
    }
}

/// A page without the navigation (login, errors before a session).
pub fn bare(base: &str, title: &str, body: Markup) -> Markup {
    layout(base, title, html! { main { (body) } })
}

/// A refusal or failure: a page with the message and its stable code (or
/// the JSON error every other route uses, for a caller that does not ask
/// for HTML). Nothing was changed.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// Marks a failure's response, so that [`as_json`] can answer it as JSON.
#[derive(Clone)]
struct Failed {
    code: &'static str,
    message: String,
}

impl Failure {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn internal(error: impl std::fmt::Display) -> Failure {
        tracing::error!(error = %error, "console request failed");
        Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (see the server's log)",
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = html! {
            (DOCTYPE)
            html lang="en" {
                head { meta charset="utf-8"; title { "Error · outbox-relay" } }
                body { main {
                    h1 { "Nothing was changed" }
                    p.error data-code=(self.code) { (self.message) }
                    p { code { (self.code) } " · " a href="javascript:history.back()" { "back" } }
                } }
            }
        };
        let mut response = (self.status, body).into_response();
        response.extensions_mut().insert(Failed {
            code: self.code,
            message: self.message,
        });
        response
    }
}

/// A failure's response as the JSON error (`{"error": {"code", "message"}}`).
pub fn as_json(response: Response) -> Response {
    match response.extensions().get::<Failed>().cloned() {
        Some(failed) => (
            response.status(),
            Json(
                serde_json::json!({ "error": { "code": failed.code, "message": failed.message } }),
            ),
        )
            .into_response(),
        None => response,
    }
}

impl From<deadpool_postgres::PoolError> for Failure {
    fn from(e: deadpool_postgres::PoolError) -> Failure {
        tracing::warn!(error = %e, "console: no database connection");
        Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database is unavailable",
        )
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        if timed_out(&e) {
            return Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "query_timeout",
                "the database did not answer within the console's bound; try again",
            );
        }
        Failure::internal(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        match e.downcast::<tokio_postgres::Error>() {
            Ok(e) => e.into(),
            Err(e) => Failure::internal(format!("{e:#}")),
        }
    }
}

/// A statement ended by `statement_timeout`.
pub fn timed_out(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
}

/// A read-only transaction whose statements end after `limit`.
pub async fn bounded_read<'a>(
    client: &'a mut deadpool_postgres::Object,
    limit: Duration,
) -> Result<deadpool_postgres::Transaction<'a>, Failure> {
    let tx = client.build_transaction().read_only(true).start().await?;
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = {}",
        limit.as_millis().max(1)
    ))
    .await?;
    Ok(tx)
}

/// A POST's fields as sent: each field's value, and every value of a
/// repeated one (a selection's ids, a plan's partitions).
pub struct FormFields(Vec<(String, String)>);

impl FormFields {
    pub fn parse(body: &[u8]) -> FormFields {
        FormFields(url::form_urlencoded::parse(body).into_owned().collect())
    }

    /// The field's (last) value; empty when it is absent.
    pub fn get(&self, name: &str) -> String {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// Every value of a repeated field, in order.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// One value per field (the last).
    pub fn into_map(self) -> std::collections::HashMap<String, String> {
        self.0.into_iter().collect()
    }
}

/// A time as the console shows it (UTC, milliseconds).
pub fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string()
}

/// A JSON value pretty-printed, with email addresses masked unless `reveal`.
pub fn json(value: &serde_json::Value, reveal: bool) -> String {
    let shown = if reveal { value.clone() } else { masked(value) };
    serde_json::to_string_pretty(&shown).unwrap_or_default()
}

/// `value` with every email address in its strings masked (`a•••@example.com`).
pub fn masked(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(mask_emails(s)),
        Value::Array(items) => Value::Array(items.iter().map(masked).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (mask_emails(k), masked(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Each `local@domain` in `text` with its local part hidden but the first
/// character.
pub fn mask_emails(text: &str) -> String {
    text.split_inclusive(|c: char| c.is_whitespace() || ",;<>\"'()".contains(c))
        .map(|word| {
            let trimmed =
                word.trim_end_matches(|c: char| c.is_whitespace() || ",;<>\"'()".contains(c));
            let rest = &word[trimmed.len()..];
            match trimmed.split_once('@') {
                Some((local, domain)) if !local.is_empty() && domain.contains('.') => {
                    let first: String = local.chars().take(1).collect();
                    format!("{first}•••@{domain}{rest}")
                }
                _ => word.to_string(),
            }
        })
        .collect()
}

/// A number with thousands separators.
pub fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Percent-encodes a path segment or query value (a space as `%20`, which
/// both read as a space; `+` itself is `%2B`).
pub fn enc(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_masked_anywhere_in_a_payload() {
        let payload = serde_json::json!({"email": "ada@example.com", "note": "cc bob.smith@corp.example, thanks",
            "items": [{"to": "x@y.io"}], "amount": 4200, "not": "user@localhost"});
        let shown = masked(&payload);
        assert_eq!(shown["email"], "a•••@example.com");
        assert_eq!(shown["note"], "cc b•••@corp.example, thanks");
        assert_eq!(shown["items"][0]["to"], "x•••@y.io");
        assert_eq!(shown["amount"], 4200);
        assert_eq!(shown["not"], "user@localhost");
        assert!(!json(&payload, false).contains("ada@"));
        // Addresses used as object keys too.
        let by_address = serde_json::json!({"ada@example.com": 1});
        assert_eq!(
            masked(&by_address),
            serde_json::json!({"a•••@example.com": 1})
        );
        assert!(json(&payload, true).contains("ada@example.com"));
    }

    #[test]
    fn the_base_path_takes_a_plain_forwarded_prefix_only() {
        let base_with = |prefix: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-forwarded-prefix", prefix.parse().unwrap());
            base(&headers)
        };
        assert_eq!(base(&HeaderMap::new()), "/console");
        assert_eq!(base_with("/ops"), "/ops/console");
        assert_eq!(base_with("/ops/relay/"), "/ops/relay/console");
        assert_eq!(base_with("/x\"><script>"), "/console");
        assert_eq!(base_with("//evil.example"), "/console");
        assert_eq!(base_with("ops"), "/console");
    }

    #[test]
    fn counts_have_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(1234), "1,234");
        assert_eq!(count(10_000_000), "10,000,000");
        assert_eq!(count(-1234), "-1,234");
    }
}
