//! One client connection: length-prefixed frames in, one answer per
//! request in order (as a Kafka broker, one request at a time per
//! connection: a long-polling Fetch holds the next request back).
//!
//! Bounds: a frame over [`MAX_REQUEST_BYTES`], a frame that does not
//! decode, an API or version outside the table (`versions`), or a
//! connection idle for [`IDLE_TIMEOUT`] closes this connection only, with
//! a log line naming the client. Before the codecs see a body, its
//! declared lengths are checked against the frame (`shape`: the codecs
//! reserve an array's declared length first, and a failed allocation
//! aborts); decoding then runs under `catch_unwind`, so a codec that
//! panics refuses one connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{decode_request_header_from_buffer, Encodable};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::metrics::kafka_api_metrics;
use super::{sasl, shape, versions, Front, UNSUPPORTED_VERSION};
use crate::shutdown::Shutdown;

/// Largest request frame accepted (Kafka's `socket.request.max.bytes` is
/// 100 MiB for producers' batches; a consumer's requests are kilobytes: a
/// Fetch of 10,000 partitions is about 300 KiB). It also bounds what the
/// codecs reserve for a request's arrays (`shape`).
pub(super) const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// A connection of a listener with users must authenticate within this.
const AUTHENTICATION_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection with no request for this long is closed (Kafka's
/// `connections.max.idle.ms` is 9 minutes).
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(540);

/// How long a connection that failed authentication stays open after its
/// answer (Kafka's `connection.failed.authentication.delay.ms` is 100).
const FAILED_AUTHENTICATION_DELAY: Duration = Duration::from_millis(100);

/// The rest of a frame must arrive within this once its size has, and an
/// answer must be taken by the client within it.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes `frame`, or gives up (with a log line) on a client that does not
/// read its answers: it would hold the answer and a connection slot.
async fn write<S: AsyncWrite + Unpin>(
    stream: &mut S,
    frame: &[u8],
    peer: SocketAddr,
    client: &str,
) -> bool {
    let written = async {
        stream.write_all(frame).await?;
        stream.flush().await
    };
    match tokio::time::timeout(FRAME_TIMEOUT, written).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::warn!(%peer, client = %client,
                "closing a Kafka connection: the client did not take its answer within 30 s");
            false
        }
    }
}

/// A request, decoded.
#[derive(Debug)]
pub(super) struct Request {
    pub header: RequestHeader,
    pub key: ApiKey,
    pub body: RequestKind,
}

/// Why a frame is not answered (the connection is closed).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// An ApiVersions request at a version we do not serve: answered in v0
    /// form with UNSUPPORTED_VERSION and our ranges (what clients rely on
    /// to pick a version), not refused.
    ApiVersionsFallback { correlation_id: i32 },
    /// Anything else outside the table, or a frame that does not decode.
    Close(String),
}

/// Decodes one frame (without its size prefix). Never panics.
pub(super) fn decode(frame: Bytes) -> Result<Request, Refusal> {
    if frame.len() < 8 {
        return Err(Refusal::Close(format!(
            "a request frame of {} bytes is too short for a header",
            frame.len()
        )));
    }
    let raw_key = (&frame[0..2]).get_i16();
    let version = (&frame[2..4]).get_i16();
    let correlation_id = (&frame[4..8]).get_i32();
    let Ok(key) = ApiKey::try_from(raw_key) else {
        return Err(Refusal::Close(format!(
            "API key {raw_key} is not a Kafka API"
        )));
    };
    if !versions::supported(key, version) {
        if key == ApiKey::ApiVersions {
            return Err(Refusal::ApiVersionsFallback { correlation_id });
        }
        return Err(Refusal::Close(match versions::range(key) {
            Some((min, max)) => format!("{key:?} v{version} is not served (v{min} to v{max} are)"),
            None => format!("{key:?} is not served by outbox-relay's Kafka front end"),
        }));
    }
    // The codecs are not ours: should one panic on some bytes, this
    // connection is refused and the process goes on.
    let decoded = std::panic::catch_unwind(move || decode_served(frame, key, version));
    match decoded {
        Ok(Ok((header, body))) => Ok(Request { header, key, body }),
        Ok(Err(e)) => Err(Refusal::Close(format!(
            "{key:?} v{version} does not decode: {e:#}"
        ))),
        Err(_) => Err(Refusal::Close(format!(
            "{key:?} v{version} does not decode (the decoder gave up)"
        ))),
    }
}

/// The `kafka-protocol` codecs on a frame of a served API and version.
fn decode_served(
    mut frame: Bytes,
    key: ApiKey,
    version: i16,
) -> anyhow::Result<(RequestHeader, RequestKind)> {
    let header = decode_request_header_from_buffer(&mut frame)?;
    shape::check(key, version, &frame).map_err(anyhow::Error::msg)?;
    let body = RequestKind::decode(key, &mut frame, version)?;
    Ok((header, body))
}

/// Encodes `response` to `request` as a frame: size, header, body.
pub(super) fn encode(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    response: &ResponseKind,
) -> anyhow::Result<Bytes> {
    let mut body = BytesMut::new();
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation_id;
    // ApiVersions answers with header v0 whatever its version (KIP-511).
    let header_version = if key == ApiKey::ApiVersions {
        0
    } else {
        key.response_header_version(version)
    };
    header.encode(&mut body, header_version)?;
    response.encode(&mut body, version)?;
    let mut frame = BytesMut::with_capacity(4 + body.len());
    frame.put_i32(i32::try_from(body.len())?);
    frame.extend_from_slice(&body);
    Ok(frame.freeze())
}

/// Serves one connection until the client closes it, it is refused, or
/// the process stops.
pub(super) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    front: Arc<Front>,
    shutdown: Shutdown,
) {
    let _ = stream.set_nodelay(true);
    kafka_api_metrics().connections.inc();
    // Counted down and forgotten however the connection ends.
    struct Open(Arc<Front>, u64);
    impl Drop for Open {
        fn drop(&mut self) {
            kafka_api_metrics().connections.dec();
            self.0.connections.close(self.1);
        }
    }
    let open = Open(front.clone(), front.connections.open(peer));
    let connection = open.1;
    let Some(acceptor) = front.security.tls.clone() else {
        return serve_stream(stream, peer, connection, front, shutdown).await;
    };
    match tokio::time::timeout(FRAME_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => serve_stream(tls, peer, connection, front, shutdown).await,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "closing a Kafka connection: the TLS handshake failed")
        }
        Err(_) => tracing::warn!(%peer, "closing a Kafka connection: no TLS handshake within 30 s"),
    }
}

/// Serves one connection's requests: until SASL/PLAIN succeeds (when the
/// listener has users) only ApiVersions, SaslHandshake and
/// SaslAuthenticate; then the table, as the user's access allows.
async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    connection: u64,
    front: Arc<Front>,
    mut shutdown: Shutdown,
) {
    let metrics = kafka_api_metrics();
    let users = front.security.users.clone();
    let mut access = match users {
        Some(_) => None,
        None => Some(super::security::Access::default()),
    };
    let mut client = String::from("-");
    let authenticate_by = tokio::time::Instant::now() + AUTHENTICATION_TIMEOUT;
    loop {
        // Until authenticated, a connection has a deadline, not an idle
        // timer that each ApiVersions would reset.
        let wait = match access {
            Some(_) => IDLE_TIMEOUT,
            None => authenticate_by.saturating_duration_since(tokio::time::Instant::now()),
        };
        let size = tokio::select! {
            read = tokio::time::timeout(wait, stream.read_i32()) => match read {
                Ok(Ok(size)) => size,
                Ok(Err(_)) => return, // closed by the client
                Err(_) if access.is_none() => {
                    tracing::warn!(%peer, client = %client,
                        "closing a Kafka connection: not authenticated within 30 s");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, client = %client, "closing an idle Kafka connection");
                    return;
                }
            },
            _ = shutdown.recv() => return,
        };
        let Ok(size) = usize::try_from(size) else {
            tracing::warn!(%peer, client = %client, size, "closing a Kafka connection: a negative frame size");
            return;
        };
        if size > MAX_REQUEST_BYTES {
            tracing::warn!(%peer, client = %client, size, limit = MAX_REQUEST_BYTES,
                "closing a Kafka connection: a request over the size limit");
            return;
        }
        let mut frame = vec![0u8; size];
        match tokio::time::timeout(FRAME_TIMEOUT, stream.read_exact(&mut frame)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return, // closed by the client mid-frame
            Err(_) => {
                tracing::warn!(%peer, client = %client, size,
                    "closing a Kafka connection: a request frame did not arrive within 30 s");
                return;
            }
        }
        let request = match decode(Bytes::from(frame)) {
            Ok(request) => request,
            Err(Refusal::ApiVersionsFallback { correlation_id }) => {
                let answer = ResponseKind::ApiVersions(versions::api_versions(UNSUPPORTED_VERSION));
                match encode(ApiKey::ApiVersions, 0, correlation_id, &answer) {
                    Ok(frame) if write(&mut stream, &frame, peer, &client).await => continue,
                    _ => return,
                }
            }
            Err(Refusal::Close(why)) => {
                metrics
                    .requests
                    .with_label_values(&["refused", "closed"])
                    .inc();
                tracing::warn!(%peer, client = %client, "closing a Kafka connection: {why}");
                return;
            }
        };
        if let Some(id) = &request.header.client_id {
            if client != id.as_str() {
                client = crate::clip::clip(id.as_str()).into_owned();
                front
                    .connections
                    .update(connection, |c| c.client_id = client.clone());
            }
        }
        if let RequestKind::ApiVersions(v) = &request.body {
            if !v.client_software_name.is_empty() {
                front.connections.update(connection, |c| {
                    c.software_name = Some(crate::clip::clip(&v.client_software_name).into_owned());
                    c.software_version =
                        Some(crate::clip::clip(&v.client_software_version).into_owned());
                });
            }
        }
        let (key, version) = (request.key, request.header.request_api_version);
        let correlation_id = request.header.correlation_id;
        let started = std::time::Instant::now();
        let api = api_label(key);
        let mut refused = false;
        let answer = match (&access, &request.body) {
            (_, RequestKind::SaslHandshake(r)) => Ok(Some(ResponseKind::SaslHandshake(
                sasl::handshake(r, users.as_deref()),
            ))),
            (_, RequestKind::SaslAuthenticate(r)) => {
                let (answer, granted) = sasl::authenticate(r, users.as_ref(), peer, &client).await;
                refused = granted.is_none();
                if let Some(user) = granted.as_ref().and_then(|g| g.user.clone()) {
                    front
                        .connections
                        .update(connection, |c| c.user = Some(user));
                }
                access = access.or(granted);
                Ok(Some(ResponseKind::SaslAuthenticate(answer)))
            }
            (None, RequestKind::ApiVersions(_)) => Ok(Some(ResponseKind::ApiVersions(
                versions::api_versions(super::NONE),
            ))),
            (None, _) => {
                tracing::warn!(%peer, client = %client, api = ?key,
                    "closing a Kafka connection: a request before SASL authentication");
                return;
            }
            (Some(granted), _) => tokio::select! {
                answer = front.answer(&request, &client, peer, granted) => answer,
                _ = shutdown.recv() => return,
            },
        };
        // No request goes unanswered: a failed handler's request gets its
        // error codes (the connection stays).
        let answer = match answer {
            Err(e) => match front.failed(&request.body) {
                Some(failed) => {
                    tracing::warn!(%peer, client = %client, api = ?key, error = %crate::clip::clip_error(&e),
                        "a Kafka request failed; answered with UNKNOWN_SERVER_ERROR");
                    Ok(Some(failed))
                }
                None => Err(e),
            },
            answered => answered,
        };
        metrics
            .duration
            .with_label_values(&[api])
            .observe(started.elapsed().as_secs_f64());
        let error = match &answer {
            Ok(Some(answer)) => first_error(answer).to_string(),
            _ => "closed".to_string(),
        };
        metrics.requests.with_label_values(&[api, &error]).inc();
        if let Ok(Some(ResponseKind::Fetch(fetched))) = &answer {
            metrics.fetched_bytes.inc_by(record_bytes(fetched));
        }
        let answer = match answer {
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => {
                tracing::info!(%peer, client = %client, api = ?key,
                    "closing a Kafka connection: an unanswered request (produce with acks=0) is refused");
                return;
            }
            Err(e) => Err(e),
        };
        let encoded = answer.and_then(|answer| encode(key, version, correlation_id, &answer));
        let frame: Bytes = match encoded {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(%peer, client = %client, api = ?key, version,
                    error = %crate::clip::clip_error(&e), "closing a Kafka connection: a request failed");
                return;
            }
        };
        if !write(&mut stream, &frame, peer, &client).await {
            return;
        }
        if refused {
            // As Kafka (connection.failed.authentication.delay.ms): the
            // close waits a moment, so the client reads the refusal before
            // it sees the connection end, and guessing is slowed down.
            tokio::time::sleep(FAILED_AUTHENTICATION_DELAY).await;
            let _ = tokio::time::timeout(FRAME_TIMEOUT, stream.shutdown()).await;
            return;
        }
    }
}

/// The API as a metric label: the served ones by name (a bounded set).
fn api_label(key: ApiKey) -> &'static str {
    match key {
        ApiKey::ApiVersions => "ApiVersions",
        ApiKey::Metadata => "Metadata",
        ApiKey::ListOffsets => "ListOffsets",
        ApiKey::Fetch => "Fetch",
        ApiKey::Produce => "Produce",
        ApiKey::FindCoordinator => "FindCoordinator",
        ApiKey::JoinGroup => "JoinGroup",
        ApiKey::SyncGroup => "SyncGroup",
        ApiKey::Heartbeat => "Heartbeat",
        ApiKey::LeaveGroup => "LeaveGroup",
        ApiKey::OffsetCommit => "OffsetCommit",
        ApiKey::OffsetFetch => "OffsetFetch",
        ApiKey::DescribeGroups => "DescribeGroups",
        ApiKey::ListGroups => "ListGroups",
        ApiKey::SaslHandshake => "SaslHandshake",
        ApiKey::SaslAuthenticate => "SaslAuthenticate",
        _ => "other",
    }
}

/// An answer's error code: its own, or its first partition's (0: none).
fn first_error(answer: &ResponseKind) -> i16 {
    fn first(mut codes: impl Iterator<Item = i16>) -> i16 {
        codes.find(|c| *c != 0).unwrap_or(0)
    }
    match answer {
        ResponseKind::ApiVersions(a) => a.error_code,
        ResponseKind::Metadata(m) => first(m.topics.iter().map(|t| t.error_code)),
        ResponseKind::ListOffsets(l) => first(
            &mut l
                .topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
        ),
        ResponseKind::Fetch(f) => first(
            &mut std::iter::once(f.error_code).chain(
                f.responses
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
            ),
        ),
        ResponseKind::Produce(p) => first(
            &mut p
                .responses
                .iter()
                .flat_map(|t| t.partition_responses.iter().map(|p| p.error_code)),
        ),
        ResponseKind::FindCoordinator(f) => {
            first(std::iter::once(f.error_code).chain(f.coordinators.iter().map(|c| c.error_code)))
        }
        ResponseKind::JoinGroup(j) => j.error_code,
        ResponseKind::SyncGroup(s) => s.error_code,
        ResponseKind::Heartbeat(h) => h.error_code,
        ResponseKind::LeaveGroup(l) => {
            first(std::iter::once(l.error_code).chain(l.members.iter().map(|m| m.error_code)))
        }
        ResponseKind::OffsetCommit(o) => first(
            o.topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
        ),
        ResponseKind::OffsetFetch(o) => o.error_code,
        ResponseKind::DescribeGroups(d) => first(d.groups.iter().map(|g| g.error_code)),
        ResponseKind::ListGroups(l) => l.error_code,
        ResponseKind::SaslHandshake(h) => h.error_code,
        ResponseKind::SaslAuthenticate(a) => a.error_code,
        _ => 0,
    }
}

/// Record batch bytes of a Fetch answer.
fn record_bytes(fetched: &kafka_protocol::messages::FetchResponse) -> u64 {
    fetched
        .responses
        .iter()
        .flat_map(|t| t.partitions.iter())
        .filter_map(|p| p.records.as_ref())
        .map(|r| r.len() as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{ApiVersionsRequest, MetadataRequest};
    use kafka_protocol::protocol::encode_request_header_into_buffer;
    use proptest::prelude::*;

    fn frame(key: ApiKey, version: i16, body: impl Encodable) -> Bytes {
        let mut header = RequestHeader::default();
        header.request_api_key = key as i16;
        header.request_api_version = version;
        header.correlation_id = 7;
        let mut buf = BytesMut::new();
        encode_request_header_into_buffer(&mut buf, &header).unwrap();
        body.encode(&mut buf, version).unwrap();
        buf.freeze()
    }

    #[test]
    fn a_served_request_decodes_and_others_are_refused_with_a_reason() {
        let request = decode(frame(ApiKey::Metadata, 12, MetadataRequest::default())).unwrap();
        assert_eq!(request.key, ApiKey::Metadata);
        assert_eq!(request.header.correlation_id, 7);
        assert!(matches!(request.body, RequestKind::Metadata(_)));

        let too_new = frame(ApiKey::Metadata, 13, MetadataRequest::default());
        assert!(matches!(decode(too_new), Err(Refusal::Close(why)) if why.contains("v1 to v12")));
        let create_topics = Bytes::from_static(&[0, 19, 0, 3, 0, 0, 0, 1, 0, 0]);
        assert!(
            matches!(decode(create_topics), Err(Refusal::Close(why)) if why.contains("CreateTopics"))
        );
        assert!(matches!(
            decode(Bytes::from_static(&[0, 3])),
            Err(Refusal::Close(_))
        ));
    }

    #[test]
    fn api_versions_at_an_unknown_version_falls_back_to_v0_with_the_error() {
        let newer = frame(ApiKey::ApiVersions, 3, ApiVersionsRequest::default());
        let mut bytes = BytesMut::from(&newer[..]);
        bytes[3] = 9; // version 9
        assert!(matches!(
            decode(bytes.freeze()),
            Err(Refusal::ApiVersionsFallback { correlation_id: 7 })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// No bytes make the codecs of a served API panic or abort (the
        /// codecs themselves, without the `catch_unwind` that guards them
        /// in `decode`, so a panic fails this test): they decode or refuse.
        #[test]
        fn the_codecs_of_every_served_api_decode_or_refuse_any_bytes(
            served in 0..versions::SUPPORTED.len(),
            version_pick in any::<u16>(),
            correlation_id in any::<i32>(),
            null_client_id in any::<bool>(),
            rest in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let (key, min, max) = versions::SUPPORTED[served];
            let version = min + (version_pick % (max - min + 1) as u16) as i16;
            let mut bytes = BytesMut::new();
            bytes.put_i16(key as i16);
            bytes.put_i16(version);
            bytes.put_i32(correlation_id);
            if null_client_id {
                // A header that decodes, so the bytes reach the body's codec.
                bytes.put_i16(-1);
            }
            bytes.extend_from_slice(&rest);
            let _ = decode_served(bytes.freeze(), key, version);
        }
    }
}
