//! The order API (the reference outbox writer) and health endpoints.
//!
//! Every refusal is a 4xx with `{"error": {"code", "message"}}`, where
//! `code` is stable for clients to match on; nothing is written for a
//! refused request.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde_json::json;
use tokio::net::TcpListener;

use crate::order::{self, NewOrder};
use crate::shutdown::Shutdown;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// An HTTP error: a status, a stable code and a human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn internal(error: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %error, "request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApiError::internal(e)
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        tracing::warn!(error = %e, "no database connection");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database is unavailable",
        )
    }
}

#[derive(Clone)]
struct AppState {
    pool: Pool,
}

/// The API's routes.
pub fn router(pool: Pool) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(AppState { pool })
}

/// The `api` role: the order API on a bound listener.
pub struct ApiService {
    listener: TcpListener,
    pool: Pool,
}

impl ApiService {
    pub fn new(listener: TcpListener, pool: Pool) -> ApiService {
        ApiService { listener, pool }
    }
}

impl crate::service::Service for ApiService {
    fn name(&self) -> &'static str {
        "api"
    }

    async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        serve(self.listener, self.pool, shutdown).await
    }
}

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    pool: Pool,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    axum::serve(listener, router(pool))
        .with_graceful_shutdown(async move { shutdown.recv().await })
        .await?;
    Ok(())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// Counts each answered request by route template (never the raw path, so
/// `/orders/{id}` is one series) and status.
async fn count_requests(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(request).await;
    crate::metrics::metrics()
        .http_requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    response
}

/// `GET /metrics`: Prometheus text format. The process's counters are
/// served even when the database is down (`outbox_relay_database_up` 0).
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut client = state.pool.get().await.ok();
    let body = crate::metrics::metrics()
        .render(client.as_deref_mut().map(|c| &mut **c))
        .await
        .map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the database answers and its schema is the one this binary expects.
async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let not_ready =
        |message: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message);
    let client = state
        .pool
        .get()
        .await
        .map_err(|e| not_ready(format!("database unreachable: {e}")))?;
    let version = crate::migrate::current_version(&**client)
        .await
        .map_err(|e| not_ready(format!("database error: {e}")))?;
    let expected = crate::migrate::latest_version();
    if version != expected {
        return Err(not_ready(format!(
            "schema version {version}, expected {expected}"
        )));
    }
    Ok(Json(
        json!({ "status": "ready", "schema_version": version }),
    ))
}

/// `POST /orders`: the order and its `OrderCreated` outbox row in one transaction.
async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
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
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                rejection.body_text(),
            )
        }
    })?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
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

    let mut client = state.pool.get().await?;
    let canonical = json!({
        "user_id": new_order.user_id,
        "email": new_order.email.as_str(),
        "amount": new_order.amount,
    });
    if let Some(key) = &idempotency_key {
        if let Some(previous) = earlier_answer(&client, key, &canonical).await? {
            return Ok(previous);
        }
    }
    let tx = client.transaction().await?;
    let order_id = order::insert(&tx, &new_order).await?;
    if let Some(key) = &idempotency_key {
        let claimed = tx
            .execute(
                "INSERT INTO order_idempotency_keys (idempotency_key, request_body, order_id)
                 VALUES ($1, $2, $3) ON CONFLICT (idempotency_key) DO NOTHING",
                &[key, &canonical, &order_id],
            )
            .await?;
        if claimed == 0 {
            // A concurrent request with this key committed first: drop ours.
            tx.rollback().await?;
            return earlier_answer(&client, key, &canonical)
                .await?
                .ok_or_else(|| ApiError::internal("idempotency key vanished"));
        }
    }
    tx.commit().await?;
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

/// The first answer for a reused key: the same order for the same body, a
/// 422 for a different body.
async fn earlier_answer(
    client: &tokio_postgres::Client,
    key: &str,
    canonical: &serde_json::Value,
) -> Result<Option<Response>, ApiError> {
    let row = client
        .query_opt(
            "SELECT request_body = $2, order_id FROM order_idempotency_keys WHERE idempotency_key = $1",
            &[&key, canonical],
        )
        .await?;
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
    let mail = crate::mail::confirmation_mail(&**client, order_id).await?;
    let mut body = serde_json::to_value(order).map_err(ApiError::internal)?;
    body["confirmation_mail"] = serde_json::to_value(mail).map_err(ApiError::internal)?;
    Ok(Json(body).into_response())
}
