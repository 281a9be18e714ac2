//! Who may use the console and what they may do, enforced on the server.
//!
//! * **Open on loopback.** Without `CONSOLE_TOKEN` or users, the console
//!   answers loopback peers only, and only for a loopback `Host` (a page
//!   elsewhere cannot reach it through DNS rebinding); everyone there may
//!   do everything.
//! * **Token or users.** With `CONSOLE_TOKEN` (every permission) or
//!   `--console-users` (`name:hash:permissions`, hashes from `outbox-relay
//!   kafka-api hash-password`), every request needs a session cookie (from
//!   the login page) or `Authorization: Bearer <token>`; else 401.
//! * **Permissions.** Reading is every session's; `write` (actions) and
//!   `payloads` (record payloads and headers unmasked) are granted.
//!   `--console-read-only` takes `write` from everyone: each write route
//!   answers 403.
//! * **CSRF.** A state change is a POST carrying the session's CSRF token
//!   (an HMAC of the session's nonce); a cross-origin POST is refused.
//!
//! Sessions are signed cookies (HMAC-SHA256 with a secret of the process),
//! valid for [`SESSION_TTL`]; nothing is stored.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::page::{self, Failure};
pub use super::session::{Permissions, Session};
use super::Console;
use crate::kafka_api::security::PasswordHash;

/// How long a login lasts.
pub const SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// The session cookie's name.
const COOKIE: &str = "outbox_console";

/// Largest form a console POST may carry.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// A console user from `--console-users`.
struct User {
    hash: PasswordHash,
    permissions: Permissions,
}

/// The console's credentials, as configured.
#[derive(Clone, Default)]
pub struct AccessSettings {
    pub token: Option<String>,
    users: Option<Arc<std::collections::HashMap<String, User>>>,
}

impl std::fmt::Debug for AccessSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessSettings")
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("users", &self.users.as_ref().map(|u| u.len()))
            .finish()
    }
}

impl AccessSettings {
    /// `token` (CONSOLE_TOKEN) and `users` (the text of --console-users:
    /// `name:hash:permissions` per line or space, permissions `read`,
    /// `write`, `payloads`, comma-separated).
    pub fn new(token: Option<String>, users: Option<&str>) -> anyhow::Result<AccessSettings> {
        if let Some(t) = &token {
            anyhow::ensure!(
                t.len() >= 16,
                "CONSOLE_TOKEN must be at least 16 characters long"
            );
        }
        let users = match users {
            None => None,
            Some(text) => {
                let mut by_name = std::collections::HashMap::new();
                for entry in text.split_whitespace() {
                    let mut fields = entry.splitn(3, ':');
                    let (Some(name), Some(hash)) = (fields.next(), fields.next()) else {
                        anyhow::bail!("a console user is name:hash[:permissions]");
                    };
                    let hash = PasswordHash::parse(hash)
                        .map_err(|e| anyhow::anyhow!("console user {name}: {e}"))?;
                    let mut permissions = Permissions {
                        write: false,
                        payloads: false,
                    };
                    for p in fields.next().unwrap_or("read").split(',') {
                        match p {
                            "read" => {}
                            "write" => permissions.write = true,
                            "payloads" => permissions.payloads = true,
                            other => anyhow::bail!(
                                "console user {name}: unknown permission {other:?} (read, write, payloads)"
                            ),
                        }
                    }
                    by_name.insert(name.to_string(), User { hash, permissions });
                }
                anyhow::ensure!(!by_name.is_empty(), "--console-users names no user");
                Some(Arc::new(by_name))
            }
        };
        Ok(AccessSettings { token, users })
    }

    /// Whether requests must authenticate (else: loopback only).
    pub fn authenticates(&self) -> bool {
        self.token.is_some() || self.users.is_some()
    }
}

/// The console's authenticator.
pub struct Auth {
    settings: AccessSettings,
    /// Signs session cookies, CSRF tokens and previewed plans; new with
    /// each process.
    secret: [u8; 32],
    /// What an unknown user's password is checked against, so that a login
    /// takes as long whether the name exists or not.
    decoy: PasswordHash,
    /// Password checks at a time (each is a few hundred milliseconds of CPU
    /// by design): logins cannot starve the pipeline's cores.
    checks: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Auth {
    pub fn new(settings: &AccessSettings) -> Auth {
        let iterations = settings
            .users
            .as_ref()
            .and_then(|users| users.values().next().map(|u| u.hash.iterations()))
            .unwrap_or(1);
        Auth {
            settings: settings.clone(),
            secret: rand::random(),
            decoy: PasswordHash::new(&hex(&rand::random::<[u8; 16]>()), iterations),
            checks: std::sync::Arc::new(tokio::sync::Semaphore::new(2)),
        }
    }

    /// Whether users (not only a token) may log in.
    pub fn has_users(&self) -> bool {
        self.settings.users.is_some()
    }

    /// A MAC of `parts` under this process's secret (hex): what the console
    /// hands out and takes back unchanged, such as a previewed plan.
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        let mut all: Vec<&[u8]> = vec![b"signed"];
        all.extend_from_slice(parts);
        hex(&self.mac(&all))
    }

    /// Whether `mac` is [`Auth::sign`]'s for `parts`.
    pub fn verify(&self, parts: &[&[u8]], mac: &str) -> bool {
        bool::from(self.sign(parts).as_bytes().ct_eq(mac.as_bytes()))
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("any key length");
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// A new session's cookie value.
    pub(super) fn issue(&self, user: &str, permissions: Permissions) -> String {
        let nonce: [u8; 16] = rand::random();
        let expires = (chrono::Utc::now() + SESSION_TTL).timestamp();
        let body = format!(
            "{}.{}.{}.{}",
            hex(user.as_bytes()),
            permissions.bits(),
            expires,
            hex(&nonce)
        );
        let mac = self.mac(&[b"session", body.as_bytes()]);
        format!("{body}.{}", hex(&mac))
    }

    /// The session a cookie value carries, if it is ours and current.
    fn session(&self, cookie: &str) -> Option<Session> {
        let (body, mac) = cookie.rsplit_once('.')?;
        let expected = hex(&self.mac(&[b"session", body.as_bytes()]));
        if !bool::from(expected.as_bytes().ct_eq(mac.as_bytes())) {
            return None;
        }
        let mut fields = body.split('.');
        let user = String::from_utf8(unhex(fields.next()?)?).ok()?;
        let bits: u8 = fields.next()?.parse().ok()?;
        let expires: i64 = fields.next()?.parse().ok()?;
        let nonce = fields.next()?;
        if expires < chrono::Utc::now().timestamp() {
            return None;
        }
        Some(Session {
            user,
            permissions: Permissions::from_bits(bits),
            csrf: Some(hex(&self.mac(&[b"csrf", nonce.as_bytes()])[..16])),
        })
    }

    fn bearer(&self, headers: &HeaderMap) -> Option<Session> {
        let token = self.settings.token.as_deref()?;
        let given = headers
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?;
        bool::from(given.as_bytes().ct_eq(token.as_bytes())).then(|| Session {
            user: "token".into(),
            permissions: Permissions::ALL,
            csrf: None,
        })
    }

    /// The permissions of a login, checked off the async threads (a user's
    /// hash takes a few hundred milliseconds by design).
    pub(super) async fn log_in(&self, user: &str, password: &str) -> Option<(String, Permissions)> {
        if user.is_empty() {
            let token = self.settings.token.as_deref()?;
            return bool::from(password.as_bytes().ct_eq(token.as_bytes()))
                .then(|| ("token".to_string(), Permissions::ALL));
        }
        let users = self.settings.users.clone()?;
        // The permit goes with the check: a client that hangs up does not
        // free it while its hash still runs.
        let check = self.checks.clone().acquire_owned().await.ok()?;
        let (user, password) = (user.to_string(), password.to_string());
        let decoy = self.decoy.clone();
        tokio::task::spawn_blocking(move || {
            let _check = check;
            match users.get(&user) {
                Some(found) => found
                    .hash
                    .verify(&password)
                    .then_some((user, found.permissions)),
                None => {
                    decoy.verify(&password);
                    None
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

pub(super) fn set_cookie(base: &str, value: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path={base}; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    ))
    .expect("a cookie of hex digits and a checked path")
}

/// Whether the request's `Host` names this machine's loopback (so a page
/// on another origin cannot reach the open console by DNS rebinding).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The one POST that changes nothing but the caller's own session.
const LOGOUT: &str = "/console/logout";

/// Whether a proxy forwarded the request (it then comes from loopback
/// whoever sent it).
fn forwarded(headers: &HeaderMap) -> bool {
    [
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-real-ip",
    ]
    .iter()
    .any(|h| headers.contains_key(*h))
}

/// A cross-site POST: its `Origin` names another host than its `Host`.
fn cross_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    origin.split_once("://").map(|(_, rest)| rest) != Some(host)
}

/// Every console page but the login and the assets: authenticates, checks
/// a POST's permission and CSRF token, and answers JSON errors to callers
/// that do not ask for HTML.
pub async fn require_session(
    State(console): State<Console>,
    request: Request,
    next: Next,
) -> Response {
    let wants_html = page::wants_html(request.headers());
    let response = authorized(&console, request, next).await;
    if wants_html {
        response
    } else {
        page::as_json(response)
    }
}

async fn authorized(console: &Console, request: Request, next: Next) -> Response {
    let base = page::base(request.headers());
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let headers = request.headers();
    let auth = &console.auth;
    let mut issued = None;
    let session = if auth.settings.authenticates() {
        match auth
            .bearer(headers)
            .or_else(|| cookie(headers).and_then(|c| auth.session(c)))
        {
            Some(session) => session,
            None if request.method() == Method::GET && page::wants_html(headers) => {
                return Redirect::to(&format!("{base}/login")).into_response();
            }
            None => {
                return Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "log in first: the console needs CONSOLE_TOKEN or a user's password",
                )
                .into_response()
            }
        }
    } else {
        // A proxy on this host forwards everyone's requests from loopback:
        // without a token, a forwarded request is not a local one.
        if !peer.is_some_and(|p| p.ip().is_loopback())
            || !loopback_host(headers)
            || forwarded(headers)
        {
            return Failure::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the console without CONSOLE_TOKEN answers local requests only (loopback, not through a proxy)",
            )
            .into_response();
        }
        match cookie(headers).and_then(|c| auth.session(c)) {
            Some(session) => session,
            None => {
                let value = auth.issue("local", Permissions::ALL);
                let session = auth.session(&value).expect("a session just issued");
                issued = Some(value);
                session
            }
        }
    };
    let mut request = request;
    if request.method() == Method::POST && request.uri().path() != LOGOUT {
        if console.read_only {
            return Failure::new(
                StatusCode::FORBIDDEN,
                "read_only",
                "the console is read-only (--console-read-only): nothing was changed",
            )
            .into_response();
        }
        if !session.permissions.write {
            return Failure::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("user {} may not change anything", session.user),
            )
            .into_response();
        }
        match checked_form(request, &session).await {
            Ok(checked) => request = checked,
            Err(failure) => return failure.into_response(),
        }
    }
    request.extensions_mut().insert(session);
    let mut response = next.run(request).await;
    if let Some(value) = issued {
        response.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(&base, &value, SESSION_TTL.as_secs()),
        );
    }
    response
}

/// A POST's body, read (bounded) to check its CSRF token and its origin,
/// and put back for the handler.
async fn checked_form(request: Request, session: &Session) -> Result<Request, Failure> {
    if cross_origin(request.headers()) {
        return Err(Failure::new(
            StatusCode::FORBIDDEN,
            "cross_origin",
            "a request from another site: nothing was changed",
        ));
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "form_too_large",
                format!("a console form is at most {MAX_FORM_BYTES} bytes"),
            )
        })?;
    if let Some(expected) = &session.csrf {
        let given = page::FormFields::parse(&bytes).get("csrf");
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return Err(Failure::new(
                StatusCode::FORBIDDEN,
                "bad_csrf_token",
                "the form's CSRF token is missing or wrong (reload the page): nothing was changed",
            ));
        }
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&AccessSettings::new(Some("a-token-of-16-chars".into()), None).unwrap())
    }

    #[test]
    fn a_session_is_read_back_and_a_changed_one_is_refused() {
        let auth = auth();
        let value = auth.issue(
            "ada",
            Permissions {
                write: false,
                payloads: true,
            },
        );
        let session = auth.session(&value).expect("our own session");
        assert_eq!(session.user, "ada");
        assert_eq!(
            session.permissions,
            Permissions {
                write: false,
                payloads: true
            }
        );
        // Granting oneself write by changing the permission bits breaks the MAC.
        let forged = value.replacen(".2.", ".3.", 1);
        assert_ne!(forged, value);
        assert!(auth.session(&forged).is_none());
        // Another process's secret does not sign ours.
        assert!(super::Auth::new(&auth.settings).session(&value).is_none());
    }

    #[test]
    fn csrf_tokens_differ_per_session() {
        let auth = auth();
        let a = auth.session(&auth.issue("a", Permissions::ALL)).unwrap();
        let b = auth.session(&auth.issue("a", Permissions::ALL)).unwrap();
        assert_ne!(a.csrf, b.csrf);
    }

    #[test]
    fn only_loopback_hosts_are_loopback() {
        let host = |h: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_str(h).unwrap());
            loopback_host(&headers)
        };
        assert!(host("127.0.0.1:8080"));
        assert!(host("localhost:8080"));
        assert!(host("[::1]:8080"));
        assert!(!host("evil.example:8080"));
        assert!(!host("127.0.0.1.evil.example"));
    }

    #[test]
    fn users_parse_with_their_permissions_and_bad_entries_are_refused() {
        let hash = PasswordHash::new("pw", 1000).to_string();
        let settings =
            AccessSettings::new(None, Some(&format!("ops:{hash}:read,write viewer:{hash}")))
                .unwrap();
        let users = settings.users.as_ref().unwrap();
        assert_eq!(
            users["ops"].permissions,
            Permissions {
                write: true,
                payloads: false
            }
        );
        assert_eq!(
            users["viewer"].permissions,
            Permissions {
                write: false,
                payloads: false
            }
        );
        assert!(AccessSettings::new(None, Some(&format!("x:{hash}:admin"))).is_err());
        assert!(AccessSettings::new(None, Some("x")).is_err());
        assert!(AccessSettings::new(Some("short".into()), None).is_err());
    }
}
