//! The Kafka protocol on the log (the `kafka-api` role): an unmodified
//! Kafka consumer (librdkafka, the Java client, kafka-python, …) points
//! `bootstrap.servers` at this process and reads the log's topics with
//! their partitions, offsets, keys, headers and CreateTime. Writers do not
//! change: they still write the outbox in their own transaction; this
//! front end is for reading.
//!
//! The process is the one broker of every partition and the coordinator
//! of every group (node 0, at its advertised address). What it serves is
//! one table (`versions`): ApiVersions, Metadata, ListOffsets, Fetch, the
//! group APIs (`groups`, `commits`; the groups' state is in Postgres, so
//! several processes serve one group), and Produce, refused (`produce`);
//! any other API closes the connection with a log line. Codecs are the
//! `kafka-protocol` crate's, behind a check of every request's declared
//! lengths (`shape`).

mod acl;
mod commits;
mod connection;
mod coordinator;
mod fetch;
mod group_store;
mod groups;
mod metadata;
mod metrics;
mod offsets;
mod produce;
mod refusals;
mod sasl;
pub mod security;
mod shape;
pub mod status;
mod versions;

use std::net::SocketAddr;
use std::sync::Arc;

use kafka_protocol::messages::{RequestKind, ResponseKind};
use tokio::task::JoinSet;

use crate::log::notify::Appends;
use crate::shutdown::Shutdown;

/// Kafka's error codes this front end answers with.
pub(crate) const UNKNOWN_SERVER_ERROR: i16 = -1;
pub(crate) const NONE: i16 = 0;
pub(crate) const OFFSET_OUT_OF_RANGE: i16 = 1;
pub(crate) const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
pub(crate) const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
pub(crate) const UNSUPPORTED_VERSION: i16 = 35;

/// The node id of this process in every answer.
const NODE_ID: i32 = 0;

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 1024;

/// Database connections of the role (reads of records and offsets, the
/// groups' transactions).
pub const POOL_SIZE: usize = 8;

/// A group's transactions hold its row lock for a few statements: a
/// process frozen inside one (SIGSTOP, a paused VM) must not hold every
/// other process's requests for that group, nor the sweep of all groups.
pub const SESSION_BOUNDS: crate::db::SessionBounds = crate::db::SessionBounds {
    idle_in_transaction: std::time::Duration::from_secs(5),
    lock_wait: std::time::Duration::from_secs(5),
    statement: None,
};

/// Where clients reach this process (what Metadata tells them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    pub host: String,
    pub port: u16,
}

/// What every connection's answers need.
pub(crate) struct Front {
    pool: deadpool_postgres::Pool,
    appends: Appends,
    advertised: Advertised,
    security: security::Security,
    connections: status::Connections,
    /// Notified when a request of this process changed a group: waiting
    /// joins and syncs look again at once.
    group_changed: tokio::sync::Notify,
}

impl Front {
    /// The answer to one request of the table (`versions`) on a connection
    /// with `access`; None for a request Kafka does not answer (a produce
    /// with `acks=0`).
    async fn answer(
        &self,
        request: &connection::Request,
        client_id: &str,
        peer: SocketAddr,
        access: &security::Access,
    ) -> anyhow::Result<Option<ResponseKind>> {
        if let Some(group) = acl::group_of(&request.body) {
            if !access.group(group) {
                return Ok(groups::refused(
                    &request.body,
                    acl::GROUP_AUTHORIZATION_FAILED,
                ));
            }
        }
        let version = request.header.request_api_version;
        if !access.limited() {
            return self.dispatch(&request.body, version, client_id, peer).await;
        }
        let (body, denied) = acl::restrict(&request.body, access);
        let mut answer = self.dispatch(&body, version, client_id, peer).await?;
        if let Some(answer) = &mut answer {
            acl::complete(answer, &request.body, denied, access);
        }
        Ok(answer)
    }

    async fn dispatch(
        &self,
        body: &RequestKind,
        version: i16,
        client_id: &str,
        peer: SocketAddr,
    ) -> anyhow::Result<Option<ResponseKind>> {
        Ok(Some(match body {
            RequestKind::Produce(r) => match produce::refuse(r) {
                Some(refused) => ResponseKind::Produce(refused),
                None => return Ok(None),
            },
            RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(versions::api_versions(NONE)),
            RequestKind::Metadata(r) => ResponseKind::Metadata(self.metadata(r, version).await?),
            RequestKind::ListOffsets(r) => {
                ResponseKind::ListOffsets(self.list_offsets(r, version).await?)
            }
            RequestKind::Fetch(r) => ResponseKind::Fetch(self.fetch(r, version).await?),
            RequestKind::FindCoordinator(r) => {
                ResponseKind::FindCoordinator(self.find_coordinator(r, version))
            }
            RequestKind::JoinGroup(r) => {
                ResponseKind::JoinGroup(self.join_group(r, version, client_id, peer).await?)
            }
            RequestKind::SyncGroup(r) => ResponseKind::SyncGroup(self.sync_group(r).await?),
            RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(self.heartbeat(r).await?),
            RequestKind::LeaveGroup(r) => {
                ResponseKind::LeaveGroup(self.leave_group(r, version).await?)
            }
            RequestKind::OffsetCommit(r) => {
                ResponseKind::OffsetCommit(self.offset_commit(r).await?)
            }
            RequestKind::OffsetFetch(r) => ResponseKind::OffsetFetch(self.offset_fetch(r).await?),
            RequestKind::DescribeGroups(r) => {
                ResponseKind::DescribeGroups(self.describe_groups(r).await?)
            }
            RequestKind::ListGroups(r) => ResponseKind::ListGroups(self.list_groups(r).await?),
            // SaslHandshake and SaslAuthenticate are the connection's.
            _ => anyhow::bail!("a request in the table of served APIs has no handler"),
        }))
    }
}

impl Front {
    /// The answer to `request` when its handler failed (the database is
    /// unreachable, say): every asked topic or partition with
    /// UNKNOWN_SERVER_ERROR, which clients retry after a backoff. None
    /// for the requests whose handlers cannot fail.
    fn failed(&self, request: &RequestKind) -> Option<ResponseKind> {
        use kafka_protocol::messages::metadata_response::MetadataResponseTopic;
        use kafka_protocol::messages::{FetchResponse, ListOffsetsResponse, MetadataResponse};
        Some(match request {
            RequestKind::Metadata(r) => {
                let mut response = MetadataResponse::default();
                response.brokers = vec![self.broker()];
                response.controller_id = kafka_protocol::messages::BrokerId(NODE_ID);
                response.topics = r
                    .topics
                    .iter()
                    .flatten()
                    .map(|asked| {
                        let mut topic = MetadataResponseTopic::default();
                        topic.name = asked.name.clone();
                        topic.error_code = UNKNOWN_SERVER_ERROR;
                        topic
                    })
                    .collect();
                ResponseKind::Metadata(response)
            }
            RequestKind::ListOffsets(r) => {
                let mut response = ListOffsetsResponse::default();
                response.topics = r
                    .topics
                    .iter()
                    .map(|asked| {
                        let partitions = asked.partitions.iter().map(|p| p.partition_index);
                        refusals::list_offsets(asked.name.clone(), partitions, UNKNOWN_SERVER_ERROR)
                    })
                    .collect();
                ResponseKind::ListOffsets(response)
            }
            RequestKind::Fetch(r) => {
                let mut response = FetchResponse::default();
                response.responses = r
                    .topics
                    .iter()
                    .map(|asked| {
                        let partitions = asked.partitions.iter().map(|p| p.partition);
                        refusals::fetch(asked.topic.clone(), partitions, UNKNOWN_SERVER_ERROR)
                    })
                    .collect();
                ResponseKind::Fetch(response)
            }
            other => return groups::failed(other),
        })
    }
}

/// The log start and end offsets of `topic`'s partitions, by partition;
/// none for a topic the log does not have (its partitions are then
/// answered UNKNOWN_TOPIC_OR_PARTITION).
async fn heads(
    client: &tokio_postgres::Client,
    topic: &str,
) -> anyhow::Result<std::collections::HashMap<i32, crate::log::PartitionOffsets>> {
    match crate::log::topics::partition_offsets(client, topic).await {
        Ok(all) => Ok(all.into_iter().map(|p| (p.partition, p)).collect()),
        Err(crate::log::LogError::UnknownTopic(_)) => Ok(Default::default()),
        Err(e) => Err(e.into()),
    }
}

/// Once a second: ends Kafka group members' sessions that ran out and
/// completes rebalances that are due (`Front::sweep_groups`).
async fn sweep_groups(front: Arc<Front>, mut shutdown: Shutdown) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.recv() => return,
        }
        if let Err(e) = front.sweep_groups().await {
            tracing::warn!(error = %crate::clip::clip_error(&e), "sweeping Kafka groups failed; next in a second");
        }
    }
}

/// Writes this process's listener and clients for `kafka-api status`
/// every few seconds; removes them when the process stops.
async fn report(report: status::Report, front: Arc<Front>, mut shutdown: Shutdown) {
    let mut every = tokio::time::interval(status::REPORT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.recv() => break,
        }
        if let Err(e) = report.write(&front.pool, &front.connections).await {
            tracing::debug!(error = %crate::clip::clip_error(&e), "writing the Kafka API's status failed");
        }
    }
    if let Err(e) = report.remove(&front.pool).await {
        tracing::debug!(error = %crate::clip::clip_error(&e), "removing the Kafka API's status failed");
    }
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    [
        status::statements(),
        fetch::statements(),
        group_store::statements(),
        groups::statements(),
        commits::statements(),
    ]
    .concat()
}

/// The `kafka-api` role: the listener and its connections.
pub struct KafkaApi {
    listener: tokio::net::TcpListener,
    report: status::Report,
    front: Arc<Front>,
}

/// The role on `listener`, reading with `pool` (of [`POOL_SIZE`]);
/// `appends` wakes long-polling fetches when the relay appends.
pub fn role(
    pool: deadpool_postgres::Pool,
    listen: Listen,
    appends: Appends,
) -> anyhow::Result<KafkaApi> {
    let Listen {
        listener,
        advertised,
        security,
    } = listen;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    let report = status::Report {
        id: format!(
            "{}:{}:{:08x}",
            crate::host_name(),
            std::process::id(),
            rand::random::<u32>()
        ),
        listen: addr.to_string(),
        advertised: format!("{}:{}", advertised.host, advertised.port),
        tls: security.tls.is_some(),
        sasl: security.users.is_some(),
    };
    tracing::info!(%addr, advertised = %report.advertised, tls = report.tls, sasl = report.sasl,
        "Kafka API listening");
    Ok(KafkaApi {
        listener,
        report,
        front: Arc::new(Front {
            pool,
            appends,
            advertised,
            security,
            connections: Default::default(),
            group_changed: tokio::sync::Notify::new(),
        }),
    })
}

/// Where and how the role listens.
#[derive(Debug)]
pub struct Listen {
    pub listener: std::net::TcpListener,
    pub advertised: Advertised,
    pub security: security::Security,
}

impl crate::service::Service for KafkaApi {
    fn name(&self) -> &'static str {
        "kafka-api"
    }

    async fn run(self, mut shutdown: Shutdown) -> anyhow::Result<()> {
        let mut connections = JoinSet::new();
        connections.spawn(sweep_groups(self.front.clone(), shutdown.clone()));
        let reporting = tokio::spawn(report(self.report, self.front.clone(), shutdown.clone()));
        loop {
            let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a Kafka connection failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.recv() => break,
            };
            while connections.try_join_next().is_some() {}
            if connections.len() >= MAX_CONNECTIONS {
                tracing::warn!(%peer, limit = MAX_CONNECTIONS, "closing a Kafka connection: at the connection limit");
                continue;
            }
            connections.spawn(connection::serve(
                stream,
                peer,
                self.front.clone(),
                shutdown.clone(),
            ));
        }
        connections.shutdown().await;
        let _ = reporting.await;
        Ok(())
    }
}
