//! The console's audit trail: every action (who, what, on what, the
//! preview's counts, how it ended) in `console_audit`, and the page that
//! shows it, newest first.

use axum::extract::{Query, State};
use maud::{html, Markup};

use super::page::{self, Ctx, Failure, PAGE_ROWS};
use super::Console;

const RECORD: &str = "
    INSERT INTO console_audit (actor, action, target, detail, outcome) VALUES ($1, $2, $3, $4, $5)";

const NEWEST: &str = "
    SELECT id, at, actor, action, target, detail, outcome FROM console_audit
     WHERE $1::int8 IS NULL OR id < $1 ORDER BY id DESC LIMIT $2";

/// Writes one action to the audit trail.
pub async fn record(
    client: &impl tokio_postgres::GenericClient,
    ctx: &Ctx,
    action: &str,
    target: &str,
    detail: serde_json::Value,
    outcome: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            RECORD,
            &[&ctx.session.user, &action, &target, &detail, &outcome],
        )
        .await?;
    Ok(())
}

#[derive(serde::Deserialize)]
pub struct Paging {
    /// Entries older than this id.
    before: Option<i64>,
}

pub async fn page(
    State(console): State<Console>,
    ctx: Ctx,
    Query(paging): Query<Paging>,
) -> Result<Markup, Failure> {
    let client = console.pool.get().await?;
    let rows = client.query(NEWEST, &[&paging.before, &PAGE_ROWS]).await?;
    let last = rows.last().map(|r| r.get::<_, i64>(0));
    Ok(ctx.page(
        "Audit",
        html! {
            p.hint { "Every action taken in the console, newest first." }
            table #audit {
                tr { th { "When" } th { "Who" } th { "Action" } th { "On" } th { "Detail" } th { "Outcome" } }
                @for r in &rows {
                    tr {
                        td { (page::time(&r.get(1))) }
                        td { (r.get::<_, String>(2)) }
                        td.action { (r.get::<_, String>(3)) }
                        td { (r.get::<_, String>(4)) }
                        td { pre { (page::json(&r.get(5), ctx.can_see_payloads())) } }
                        td { (r.get::<_, String>(6)) }
                    }
                }
            }
            @if rows.is_empty() { p { "Nothing yet." } }
            @if let (Some(last), true) = (last, rows.len() as i64 == PAGE_ROWS) {
                a href={(ctx.base) "/audit?before=" (last)} { "Older →" }
            }
        },
    ))
}

pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("console::audit::RECORD", RECORD.to_string()),
        ("console::audit::NEWEST", NEWEST.to_string()),
    ]
}
