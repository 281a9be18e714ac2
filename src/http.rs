//! The HTTP server of a process: it serves the routes it is given (the
//! order API's, [`crate::app::api`]) beside the operational ones every
//! process can serve (`/healthz`, `/readyz`, `/metrics`), counts every
//! request, and defines the JSON error every refusal uses.
//!
//! Every refusal is a 4xx with `{"error": {"code", "message"}}`, where
//! `code` is stable for clients to match on; nothing is written for a
//! refused request.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::shutdown::Shutdown;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A request's body must arrive within this.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A request's headers must arrive within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 1024;

/// Connections being answered 503 at once; more are closed at once.
const MAX_REFUSALS: usize = 256;

/// On shutdown, requests in flight get this long to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// An HTTP error: a status, a stable code and a human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn internal(error: impl std::fmt::Display) -> ApiError {
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

/// `routes` (an application's, with their state) and the operational
/// endpoints (`/healthz`, `/readyz`, `/metrics`, answered from `pool`),
/// with the refusals, the body limit and the request metrics every route
/// shares. `Router::new()` for the operational endpoints alone (`serve
/// --metrics-addr`).
pub fn with_operational_routes(routes: Router, pool: Pool) -> Router {
    let operational = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(pool);
    routes
        .merge(operational)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(count_requests))
}

/// An HTTP role on a bound listener: `app` served until shutdown.
pub struct HttpService {
    name: &'static str,
    listener: TcpListener,
    app: Router,
}

impl HttpService {
    /// `name` is the role's name in logs (`api`, `metrics`).
    pub fn new(name: &'static str, listener: TcpListener, app: Router) -> HttpService {
        HttpService {
            name,
            listener,
            app,
        }
    }
}

impl crate::service::Service for HttpService {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        serve(self.listener, self.app, shutdown).await
    }
}

/// Serves the API on `listener` until `shutdown` fires.
///
/// Each connection is HTTP/1.1 through hyper with the bounds a server open
/// to clients needs: headers within [`HEADER_READ_TIMEOUT`], bodies within
/// [`BODY_READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] at once. Requests so
/// malformed that hyper refuses them before the application sees them (a
/// broken request line, conflicting `Content-Length`s, a control byte in a
/// header, more than 100 headers) get hyper's own empty 400 or 431.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait a moment, go on.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.recv() => break,
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Answered 503 while few are being refused; past that, closed.
            if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                connections.spawn(async move {
                    refuse_busy(stream).await;
                    drop(refusing);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Each request carries its peer's address (the console serves
        // loopback peers without a token, and no one else).
        let app = app.clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(app.clone(), request)
            },
        );
        let mut stopping = stopping.clone();
        connections.spawn(async move {
            let _permit = permit;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            let stop_requested = async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            };
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop_requested => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    let _ = stop.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("requests still in flight after the shutdown grace period; closing them");
    }
    Ok(())
}

/// The answer to a connection over [`MAX_CONNECTIONS`]: once its request's
/// headers are in (answering earlier confuses clients), the JSON error,
/// then the connection is closed.
async fn refuse_busy(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = json!({"error": {"code": "too_many_connections",
        "message": "the server is at its connection limit; retry later"}})
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    let answered = async {
        let mut head = Vec::new();
        let mut chunk = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&chunk[..n]);
        }
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Read the rest until the client closes: closing a socket with
        // unread input would reset the connection and lose the answer.
        while stream.read(&mut chunk).await? > 0 {}
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, answered).await;
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
    let method = method_label(request.method());
    let started = std::time::Instant::now();
    let span = tracing::info_span!("http.request", method = %method, route = %route);
    let response = tracing::Instrument::instrument(next.run(request), span).await;
    let metrics = http_metrics();
    metrics
        .requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    // Route templates only (`/orders/{id}`), never raw paths: a bounded set.
    metrics
        .request_duration
        .with_label_values(&[route.as_str(), method])
        .observe(started.elapsed().as_secs_f64());
    response
}

struct HttpMetrics {
    requests: prometheus::IntCounterVec,
    request_duration: prometheus::HistogramVec,
}

fn http_metrics() -> &'static HttpMetrics {
    static METRICS: std::sync::OnceLock<HttpMetrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(|| HttpMetrics {
        requests: crate::metrics::counter_vec(
            "outbox_relay_http_requests_total",
            "HTTP requests answered, by route and status",
            &["route", "status"],
        ),
        request_duration: crate::metrics::histogram_vec(
            "outbox_relay_http_request_duration_seconds",
            "HTTP requests from routing to the response, by route template and method",
            &["route", "method"],
            0.0005,
            2.0,
            14,
        ),
    })
}

/// The method as a metric label: the standard methods by name, anything
/// else (a client may send any token) as `other`, so the series stay bounded.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::PATCH, "PATCH"),
        (Method::TRACE, "TRACE"),
        (Method::CONNECT, "CONNECT"),
    ];
    KNOWN
        .iter()
        .find(|(known, _)| known == method)
        .map_or("other", |(_, name)| name)
}

/// `GET /metrics`: Prometheus text format. The process's counters are
/// served even when the database is down (`outbox_relay_database_up` 0).
async fn metrics(State(pool): State<Pool>) -> Result<Response, ApiError> {
    let mut client = pool.get().await.ok();
    let body = crate::metrics::render(client.as_deref_mut().map(|c| &mut **c))
        .await
        .map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the database answers and its schema is the one this binary expects.
async fn readyz(State(pool): State<Pool>) -> Result<Json<serde_json::Value>, ApiError> {
    let not_ready =
        |message: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message);
    let client = pool
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_method_a_client_invents_is_one_metric_label() {
        assert_eq!(method_label(&axum::http::Method::POST), "POST");
        let invented = axum::http::Method::from_bytes(b"XYZZY").unwrap();
        assert_eq!(method_label(&invented), "other");
    }
}
