//! The order API, the reference outbox writer: `POST /orders` writes the
//! order and its `OrderCreated` outbox row in one transaction (with
//! `Idempotency-Key` support); `GET /orders/{id}` shows the order and its
//! confirmation mail's state.

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::app::order::{self, NewOrder};
use crate::http::{ApiError, BODY_READ_TIMEOUT, MAX_BODY_BYTES};
use crate::json::StrictJsonError;
use crate::relay::OutboxWritten;
use crate::trace_context::{TraceParent, TRACEPARENT};
use tracing::Instrument;

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// What the order API's handlers share.
#[derive(Clone)]
pub struct AppState {
    pub pool: deadpool_postgres::Pool,
    /// Told after each order commits.
    pub outbox_written: OutboxWritten,
}

/// The order API's routes with the operational endpoints, on `pool`.
pub fn router(pool: deadpool_postgres::Pool, outbox_written: OutboxWritten) -> Router {
    router_with(pool, outbox_written, Router::new())
}

/// [`router`] with `more` routes beside (the console under `/console`).
pub fn router_with(
    pool: deadpool_postgres::Pool,
    outbox_written: OutboxWritten,
    more: Router,
) -> Router {
    let routes = Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .with_state(AppState {
            pool: pool.clone(),
            outbox_written,
        })
        .merge(more);
    crate::http::with_operational_routes(routes, pool)
}

/// The api role on its bound listener, with `more` routes beside (the
/// console, when it shares the API's address).
pub fn service(
    listener: std::net::TcpListener,
    pool: deadpool_postgres::Pool,
    outbox_written: OutboxWritten,
    more: Router,
) -> anyhow::Result<crate::http::HttpService> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tracing::info!(addr = %listener.local_addr()?, "order API listening");
    Ok(crate::http::HttpService::new(
        "api",
        listener,
        router_with(pool, outbox_written, more),
    ))
}

/// Binds the key to this order; 0 rows when a concurrent request with the
/// key committed first.
const CLAIM_IDEMPOTENCY_KEY: &str = "
    INSERT INTO order_idempotency_keys (idempotency_key, request_body, order_id)
    VALUES ($1, $2, $3) ON CONFLICT (idempotency_key) DO NOTHING";

/// The whole body, at most [`MAX_BODY_BYTES`], within [`BODY_READ_TIMEOUT`]:
/// a client that announces more, or sends too slowly, is answered at once
/// or when the time is up, never held forever.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, MAX_BODY_BYTES),
    )
    .await
    {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e))
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) =>
        {
            Err(too_large())
        }
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unreadable_body",
            format!("the body could not be read: {e}"),
        )),
    }
}

/// `POST /orders`: the order and its `OrderCreated` outbox row in one transaction.
async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the order as Content-Type: application/json",
        ));
    }
    let body = read_body(&headers, body).await?;
    let value = crate::json::parse_strict(&body).map_err(|e| match e {
        StrictJsonError::DuplicateMember(_) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "duplicate_field",
            e.to_string(),
        ),
        StrictJsonError::Malformed(e) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        ),
    })?;
    let new_order = NewOrder::from_json(&value).map_err(|invalid| {
        let code = match invalid.field {
            "user_id" => "invalid_user_id",
            "email" => "invalid_email",
            "amount" => "invalid_amount",
            _ => "invalid_body",
        };
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, invalid.message)
    })?;
    let idempotency_key = idempotency_key(&headers)?;

    // Continue the caller's trace, or start one: the order's span is what
    // the mail worker continues (docs in `trace_context`).
    let trace = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
        .map_or_else(TraceParent::new_root, |parent| parent.child());
    let span = tracing::info_span!("order.create", trace_id = %trace.trace_id(), order_id = tracing::field::Empty);
    let answer = place_order(&state, new_order, idempotency_key, &trace)
        .instrument(span.clone())
        .await;
    let mut response = answer?;
    if let Ok(value) = header::HeaderValue::from_str(&trace.to_string()) {
        response.headers_mut().insert(TRACEPARENT, value);
    }
    Ok(response)
}

/// The order's write: one statement, or with an `Idempotency-Key` a
/// transaction that also claims the key.
async fn place_order(
    state: &AppState,
    new_order: NewOrder,
    idempotency_key: Option<String>,
    trace: &TraceParent,
) -> Result<Response, ApiError> {
    let mut client = state.pool.get().await?;
    let Some(key) = idempotency_key else {
        let order_id = order::place(&client, &new_order, trace).await?;
        state.outbox_written.committed();
        tracing::Span::current().record("order_id", order_id);
        tracing::debug!("order placed");
        return Ok(created(order_id));
    };
    let canonical = json!({
        "user_id": new_order.user_id,
        "email": new_order.email.as_str(),
        "amount": new_order.amount,
    });
    if let Some(previous) = earlier_answer(&client, &key, &canonical).await? {
        return Ok(previous);
    }
    let tx = client.transaction().await?;
    let order_id = order::place(&tx, &new_order, trace).await?;
    let claim = tx.prepare_cached(CLAIM_IDEMPOTENCY_KEY).await?;
    if tx.execute(&claim, &[&key, &canonical, &order_id]).await? == 0 {
        // A concurrent request with this key committed first: drop ours.
        tx.rollback().await?;
        return earlier_answer(&client, &key, &canonical)
            .await?
            .ok_or_else(|| ApiError::internal("idempotency key vanished"));
    }
    tx.commit().await?;
    state.outbox_written.committed();
    tracing::Span::current().record("order_id", order_id);
    tracing::debug!("order placed");
    Ok(created(order_id))
}

fn created(order_id: i64) -> Response {
    (StatusCode::CREATED, Json(json!({ "order_id": order_id }))).into_response()
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
            ),
        )
    };
    let key = value.to_str().map_err(|_| invalid())?;
    let visible = key.bytes().all(|b| b.is_ascii_graphic());
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN || !visible {
        return Err(invalid());
    }
    Ok(Some(key.to_string()))
}

/// Whether a key's first request had the same body, and its order.
const EARLIER_ANSWER: &str = "
    SELECT request_body = $2, order_id FROM order_idempotency_keys WHERE idempotency_key = $1";

/// The first answer for a reused key: the same order for the same body, a
/// 422 for a different body.
async fn earlier_answer(
    client: &deadpool_postgres::Client,
    key: &str,
    canonical: &serde_json::Value,
) -> Result<Option<Response>, ApiError> {
    let statement = client.prepare_cached(EARLIER_ANSWER).await?;
    let row = client.query_opt(&statement, &[&key, canonical]).await?;
    match row {
        None => Ok(None),
        Some(row) if row.get::<_, bool>(0) => Ok(Some(created(row.get(1)))),
        Some(_) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different body",
        )),
    }
}

/// `GET /orders/{id}`.
async fn get_order(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    // A path that is not even UTF-8 (`/orders/%FF`) is refused the same way.
    let id = id.ok().and_then(|Path(id)| id.parse::<i64>().ok());
    let order_id: i64 = id.filter(|n| *n > 0).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_order_id",
            "the order id must be a positive integer",
        )
    })?;
    let client = state.pool.get().await?;
    let Some(order) = order::find(&**client, order_id).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "order_not_found",
            format!("no order {order_id}"),
        ));
    };
    let mail = crate::app::mail::confirmation_mail(&**client, order_id).await?;
    let mut body = serde_json::to_value(order).map_err(ApiError::internal)?;
    body["confirmation_mail"] = serde_json::to_value(mail).map_err(ApiError::internal)?;
    Ok(Json(body).into_response())
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        (
            "app::api::CLAIM_IDEMPOTENCY_KEY",
            CLAIM_IDEMPOTENCY_KEY.to_string(),
        ),
        ("app::api::EARLIER_ANSWER", EARLIER_ANSWER.to_string()),
    ]
}
