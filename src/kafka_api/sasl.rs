//! SASL/PLAIN on a connection (KIP-43, KIP-152): SaslHandshake names the
//! mechanism, SaslAuthenticate carries `authzid NUL user NUL password`.
//! Until it succeeds a connection may send only ApiVersions and these two;
//! a failed authentication is answered and the connection closed, with a
//! log line naming the user (never the password).

use std::net::SocketAddr;
use std::sync::Arc;

use kafka_protocol::messages::{
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::security::{Access, Users};

pub(super) const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
pub(super) const ILLEGAL_SASL_STATE: i16 = 34;
pub(super) const SASL_AUTHENTICATION_FAILED: i16 = 58;

pub(super) fn handshake(
    request: &SaslHandshakeRequest,
    users: Option<&Users>,
) -> SaslHandshakeResponse {
    let mut response = SaslHandshakeResponse::default();
    if users.is_some() {
        response.mechanisms = vec![StrBytes::from_static_str("PLAIN")];
    }
    if users.is_none() || request.mechanism.as_str() != "PLAIN" {
        response.error_code = UNSUPPORTED_SASL_MECHANISM;
    }
    response
}

/// The answer, and the access it grants (None: refused; close after it).
pub(super) async fn authenticate(
    request: &SaslAuthenticateRequest,
    users: Option<&Arc<Users>>,
    peer: SocketAddr,
    client: &str,
) -> (SaslAuthenticateResponse, Option<Access>) {
    let mut response = SaslAuthenticateResponse::default();
    let Some(users) = users else {
        response.error_code = ILLEGAL_SASL_STATE;
        response.error_message = Some(StrBytes::from_static_str(
            "SASL is not enabled on this listener",
        ));
        return (response, None);
    };
    let token = request.auth_bytes.to_vec();
    let mut fields = token.split(|b| *b == 0);
    let (_authzid, user, password) = (fields.next(), fields.next(), fields.next());
    let (Some(user), Some(password), None) = (user, password, fields.next()) else {
        response.error_code = SASL_AUTHENTICATION_FAILED;
        response.error_message = Some(StrBytes::from_static_str("not a SASL/PLAIN token"));
        tracing::warn!(%peer, client = %client, "Kafka SASL/PLAIN refused: not a PLAIN token");
        return (response, None);
    };
    let user = String::from_utf8_lossy(user).into_owned();
    let password = String::from_utf8_lossy(password).into_owned();
    let (users, name) = (users.clone(), user.clone());
    // PBKDF2 takes a while: not on the async threads, and two at a time
    // at most, so that clients that cannot log in cannot take every core.
    static VERIFYING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    let access = match VERIFYING.acquire().await {
        Ok(_permit) => tokio::task::spawn_blocking(move || users.authenticate(&name, &password))
            .await
            .ok()
            .flatten(),
        Err(_) => None,
    };
    match &access {
        Some(_) => {
            tracing::debug!(%peer, client = %client, user = %crate::clip::clip(&user), "Kafka client authenticated")
        }
        None => {
            tracing::warn!(%peer, client = %client, user = %crate::clip::clip(&user),
                "Kafka SASL/PLAIN refused: unknown user or wrong password; closing the connection");
            response.error_code = SASL_AUTHENTICATION_FAILED;
            response.error_message = Some(StrBytes::from_static_str(
                "Authentication failed: invalid username or password",
            ));
        }
    }
    (response, access)
}
