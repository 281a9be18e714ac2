//! The order API over real HTTP against a real Postgres.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::*;

struct TestApi {
    base: String,
    http: reqwest::Client,
    db: TestDb,
}

impl TestApi {
    async fn spawn() -> TestApi {
        TestApi::spawn_on(TestDb::migrated().await).await
    }

    async fn spawn_on(db: TestDb) -> TestApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let pool = db.pool(4);
        tokio::spawn(outbox_relay::http::serve(
            listener,
            outbox_relay::app::api::router(pool, Default::default()),
            outbox_relay::shutdown::Shutdown::never(),
        ));
        TestApi {
            base,
            http: reqwest::Client::new(),
            db,
        }
    }

    async fn post_raw(
        &self,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.post(format!("{}/orders", self.base)).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post_order(&self, body: &Value) -> (StatusCode, Value) {
        self.post_raw(Some("application/json"), body.to_string())
            .await
    }

    async fn rows_written(&self) -> i64 {
        let client = self.db.client().await;
        count(
            &client,
            "SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM outbox)",
        )
        .await
    }
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

#[tokio::test]
async fn post_order_writes_order_and_event_in_one_transaction() {
    let api = TestApi::spawn().await;
    let (status, body) = api
        .post_order(&json!({"user_id": 42, "email": "ada@example.com", "amount": 1250}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let order_id = body["order_id"].as_i64().unwrap();

    let client = api.db.client().await;
    let row = client
        .query_one("SELECT topic, key, payload, headers FROM outbox", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "order-created");
    assert_eq!(row.get::<_, String>(1), order_id.to_string());
    assert_eq!(
        row.get::<_, Value>(2),
        json!({"order_id": order_id, "user_id": 42, "amount": 1250, "email": "ada@example.com"})
    );

    let got: Value = api
        .http
        .get(format!("{}/orders/{order_id}", api.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["amount"], 1250);
    assert_eq!(got["email"], "ada@example.com");
}

#[tokio::test]
async fn get_unknown_or_invalid_order_is_a_json_error() {
    let api = TestApi::spawn().await;
    let cases = [
        (
            reqwest::Method::GET,
            "/orders/999",
            StatusCode::NOT_FOUND,
            "order_not_found",
        ),
        (
            reqwest::Method::GET,
            "/orders/abc",
            StatusCode::BAD_REQUEST,
            "invalid_order_id",
        ),
        (
            reqwest::Method::GET,
            "/orders/%FF",
            StatusCode::BAD_REQUEST,
            "invalid_order_id",
        ),
        (
            reqwest::Method::GET,
            "/nope",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            reqwest::Method::DELETE,
            "/orders",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (method, path, status, code) in cases {
        let response = api
            .http
            .request(method, format!("{}{path}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(error_code(&response.json().await.unwrap()), code, "{path}");
    }
}

#[tokio::test]
async fn every_bad_input_class_is_refused_and_writes_nothing() {
    let api = TestApi::spawn().await;
    let valid = || json!({"user_id": 1, "email": "a@example.com", "amount": 5});

    let (status, body) = api
        .post_raw(Some("application/json"), "{\"user_id\": 1,")
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "malformed_json")
    );

    let (status, body) = api.post_raw(Some("text/plain"), valid().to_string()).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let (status, _) = api.post_raw(None, valid().to_string()).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let huge = format!(
        "{{\"user_id\": 1, \"email\": \"a@example.com\", \"amount\": 5, \"pad\": \"{}\"}}",
        "x".repeat(70_000)
    );
    let (status, body) = api.post_raw(Some("application/json"), huge).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );

    let invalid = [
        (
            json!({"user_id": 0, "email": "a@example.com", "amount": 5}),
            "invalid_user_id",
        ),
        (
            json!({"user_id": -1, "email": "a@example.com", "amount": 5}),
            "invalid_user_id",
        ),
        (
            json!({"user_id": 1, "email": "a@example.com", "amount": 0}),
            "invalid_amount",
        ),
        (
            json!({"user_id": 1, "email": "a@example.com", "amount": -5}),
            "invalid_amount",
        ),
        (
            json!({"user_id": 1, "email": "a@example.com", "amount": 1e30}),
            "invalid_amount",
        ),
        (
            json!({"user_id": 1, "email": "a@example.com\r\nBcc: x@example.com", "amount": 5}),
            "invalid_email",
        ),
        (
            json!({"user_id": 1, "email": "a@example.com, b@example.com", "amount": 5}),
            "invalid_email",
        ),
        (
            json!({"user_id": 1, "email": "not-an-address", "amount": 5}),
            "invalid_email",
        ),
        (json!({"user_id": 1, "amount": 5}), "invalid_email"),
        (
            json!({"user_id": 1, "email": "a@example.com", "amount": 5, "admin": true}),
            "invalid_body",
        ),
        (json!("just a string"), "invalid_body"),
    ];
    for (body, code) in invalid {
        let (status, answer) = api.post_order(&body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} -> {answer}"
        );
        assert_eq!(error_code(&answer), code, "{body}");
        assert!(answer["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // A member named twice is refused, not resolved to either value.
    for duplicated in [
        r#"{"user_id": 1, "email": "a@example.com", "amount": 5, "amount": 6}"#,
        r#"{"user_id": 1, "email": "a@example.com", "email": "b@example.com", "amount": 5}"#,
    ] {
        let (status, body) = api.post_raw(Some("application/json"), duplicated).await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::UNPROCESSABLE_ENTITY, "duplicate_field"),
            "{duplicated} -> {body}"
        );
    }
    // Bytes that are not UTF-8 at all.
    let (status, body) = api
        .post_raw(Some("application/json"), vec![0xff, 0xfe, 0x00])
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "malformed_json")
    );

    assert_eq!(
        api.rows_written().await,
        0,
        "a refused request must write nothing"
    );
}

#[tokio::test]
async fn idempotency_key_replays_the_first_answer_and_refuses_a_different_body() {
    let api = TestApi::spawn().await;
    let body = json!({"user_id": 3, "email": "c@example.com", "amount": 700});
    let post = |key: &'static str, body: Value| {
        let api = &api;
        async move {
            let response = api
                .http
                .post(format!("{}/orders", api.base))
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (first_status, first) = post("order-abc", body.clone()).await;
    assert_eq!(first_status, StatusCode::CREATED);
    let (again_status, again) = post("order-abc", body.clone()).await;
    assert_eq!(
        (again_status, &again),
        (StatusCode::CREATED, &first),
        "a retry returns the first answer"
    );

    let (status, answer) = post(
        "order-abc",
        json!({"user_id": 3, "email": "c@example.com", "amount": 701}),
    )
    .await;
    assert_eq!(
        (status, error_code(&answer)),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
    );

    // Concurrent retries with one key still create one order.
    let concurrent =
        futures_util::future::join_all((0..8).map(|_| post("order-xyz", body.clone()))).await;
    let ids: std::collections::HashSet<i64> = concurrent
        .iter()
        .map(|(s, b)| {
            assert_eq!(*s, StatusCode::CREATED, "{b}");
            b["order_id"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "concurrent retries created {} orders",
        ids.len()
    );

    let client = api.db.client().await;
    assert_eq!(count(&client, "SELECT count(*) FROM orders").await, 2);
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 2);
}

#[tokio::test]
async fn health_and_readiness() {
    let api = TestApi::spawn().await;
    let response = api
        .http
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = api
        .http
        .get(format!("{}/readyz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let unmigrated = TestApi::spawn_on(TestDb::empty().await).await;
    let response = unmigrated
        .http
        .get(format!("{}/readyz", unmigrated.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&response.json().await.unwrap()), "not_ready");
}

/// Sends `request` on a new connection; returns what came back before the
/// server closed it or `limit` passed (the test fails on the deadline).
async fn exchange(addr: &str, request: &[u8], limit: std::time::Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and lets go of the connection in time")
        .ok();
    String::from_utf8_lossy(&answer).to_string()
}

/// Issue "faults", 5: clients that announce more than they send, or never
/// finish their headers, get an answer (JSON where the application can
/// shape it) and lose the connection, instead of holding it forever.
#[tokio::test]
async fn slow_and_lying_clients_are_answered_and_let_go() {
    let api = TestApi::spawn().await;
    let addr = api.base.trim_start_matches("http://").to_string();
    let long = std::time::Duration::from_secs(20);

    let announced_too_much = exchange(
        &addr,
        b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"user_id\": 1}",
        long,
    )
    .await;
    assert!(
        announced_too_much.starts_with("HTTP/1.1 413"),
        "{announced_too_much}"
    );
    assert!(
        announced_too_much.contains("\"payload_too_large\""),
        "{announced_too_much}"
    );

    let stops_short = exchange(
        &addr,
        b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"user_id\"",
        long,
    )
    .await;
    assert!(stops_short.starts_with("HTTP/1.1 408"), "{stops_short}");
    assert!(stops_short.contains("\"request_timeout\""), "{stops_short}");

    // Headers that never end: the connection is closed (hyper's own answer).
    exchange(&addr, b"POST /orders HTTP/1.1\r\nHost: x\r\n", long).await;
    assert_eq!(api.rows_written().await, 0);
}

/// Issue "faults", 5: past the connection limit (1,024), a new connection
/// is answered `503` with a JSON error and closed, and once the others go,
/// requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_get_a_json_503_and_service_resumes() {
    let api = TestApi::spawn().await;
    let addr = api.base.trim_start_matches("http://").to_string();
    let probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    // Idle connections that hold the server's permits (it closes them after
    // its 10 s header deadline; the checks below come well before).
    let mut idle = Vec::new();
    for _ in 0..1024 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let refused = eventually(
        "a connection past the limit refused",
        std::time::Duration::from_secs(8),
        || async {
            let answer = exchange(&addr, probe, std::time::Duration::from_secs(5)).await;
            answer.starts_with("HTTP/1.1 503").then_some(answer)
        },
    )
    .await;
    assert!(refused.contains("\"too_many_connections\""), "{refused}");
    assert!(
        refused.contains("content-type: application/json"),
        "{refused}"
    );
    drop(idle);
    eventually(
        "service once the idle connections are gone",
        std::time::Duration::from_secs(10),
        || async {
            let answer = exchange(&addr, probe, std::time::Duration::from_secs(5)).await;
            answer.starts_with("HTTP/1.1 200").then_some(())
        },
    )
    .await;
}

/// Issue "faults", 5: requests hyper refuses before the application sees
/// them get its own answer and a closed connection, as the README says.
#[tokio::test]
async fn requests_too_malformed_for_the_application_get_hypers_answer() {
    let api = TestApi::spawn().await;
    let addr = api.base.trim_start_matches("http://").to_string();
    let limit = std::time::Duration::from_secs(20);
    let conflicting = exchange(
        &addr,
        b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        limit,
    )
    .await;
    assert!(conflicting.starts_with("HTTP/1.1 400"), "{conflicting}");
    let mut many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..120 {
        many.extend_from_slice(format!("X-Header-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let too_many = exchange(&addr, &many, limit).await;
    assert!(too_many.starts_with("HTTP/1.1 431"), "{too_many}");
    let control = exchange(
        &addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        limit,
    )
    .await;
    assert!(control.starts_with("HTTP/1.1 400"), "{control}");
    // The server goes on.
    let fine = exchange(
        &addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        limit,
    )
    .await;
    assert!(fine.starts_with("HTTP/1.1 200"), "{fine}");
}
