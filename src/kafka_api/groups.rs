//! The group APIs of Kafka's classic protocol: FindCoordinator (this
//! process, for every group: the state is in Postgres, so any `kafka-api`
//! process coordinates any group), JoinGroup, SyncGroup, Heartbeat,
//! LeaveGroup, DescribeGroups and ListGroups. Each runs the coordinator
//! (`coordinator`) on the group loaded under its row lock (`group_store`);
//! a join waiting for the others and a follower's sync waiting for the
//! leader look at the group again when a request in this process changed
//! a group, or every [`POLL`] (for a change made by another process), for
//! at most the member's rebalance timeout.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::coordinator::{
    Group, Join, JoinOutcome, SyncOutcome, INCONSISTENT_GROUP_PROTOCOL, REBALANCE_IN_PROGRESS,
};
use super::group_store::{self, NotKafka};
use super::{Front, NODE_ID, NONE};

/// How often a waiting join or sync looks at its group again without a
/// change in this process (one made by another `kafka-api` process).
const POLL: Duration = Duration::from_millis(200);

pub(super) const COORDINATOR_NOT_AVAILABLE: i16 = 15;
pub(super) const INVALID_GROUP_ID: i16 = 24;
pub(super) const GROUP_ID_NOT_FOUND: i16 = 69;

/// Groups listed by ListGroups, with their state.
const KAFKA_GROUPS: &str = "
    SELECT group_id, state, coalesce(protocol_type, '') FROM kafka_groups ORDER BY group_id";

/// Groups whose members' sessions or rebalance deadline need a look.
const GROUPS_TO_SWEEP: &str = "
    SELECT group_id FROM kafka_groups WHERE state <> 'Empty' ORDER BY group_id";

fn text(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

impl Front {
    /// Runs `change` on the group under its row lock and writes back what
    /// it changed, in one transaction.
    pub(super) async fn with_group<T>(
        &self,
        group_id: &str,
        create: bool,
        change: impl FnOnce(&mut Group, chrono::DateTime<chrono::Utc>) -> T,
    ) -> anyhow::Result<Result<T, NotKafka>> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut locked = match group_store::lock(&tx, group_id, create).await? {
            Ok(locked) => locked,
            Err(not_kafka) => return Ok(Err(not_kafka)),
        };
        let out = change(&mut locked.group, locked.now);
        let changed = locked.save(&tx).await?;
        tx.commit().await?;
        if changed {
            self.group_changed.notify_waiters();
        }
        Ok(Ok(out))
    }

    /// Until a request of this process changes a group, or [`POLL`].
    async fn group_change_or_poll(&self) {
        tokio::select! {
            _ = self.group_changed.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }

    pub(super) fn find_coordinator(
        &self,
        request: &FindCoordinatorRequest,
        version: i16,
    ) -> FindCoordinatorResponse {
        // Key type 1 is a transaction coordinator: no transactions here.
        let error = if request.key_type == 0 {
            NONE
        } else {
            COORDINATOR_NOT_AVAILABLE
        };
        let mut response = FindCoordinatorResponse::default();
        if version >= 4 {
            response.coordinators = request
                .coordinator_keys
                .iter()
                .map(|key| {
                    let mut coordinator = Coordinator::default();
                    coordinator.key = key.clone();
                    coordinator.node_id = BrokerId(NODE_ID);
                    coordinator.host = text(&self.advertised.host);
                    coordinator.port = self.advertised.port.into();
                    coordinator.error_code = error;
                    coordinator
                })
                .collect();
        } else {
            response.error_code = error;
            response.node_id = BrokerId(NODE_ID);
            response.host = text(&self.advertised.host);
            response.port = self.advertised.port.into();
        }
        response
    }

    pub(super) async fn join_group(
        &self,
        request: &JoinGroupRequest,
        version: i16,
        client_id: &str,
        peer: SocketAddr,
    ) -> anyhow::Result<JoinGroupResponse> {
        let group_id = request.group_id.0.as_str();
        let error = |code: i16, member_id: &str| {
            let mut response = JoinGroupResponse::default();
            response.error_code = code;
            response.generation_id = -1;
            response.member_id = text(member_id);
            response
        };
        if group_id.is_empty() {
            return Ok(error(INVALID_GROUP_ID, &request.member_id));
        }
        let instance_id = request.group_instance_id.as_ref().map(|i| i.to_string());
        let join = Join {
            member_id: request.member_id.to_string(),
            instance_id: instance_id.clone(),
            client_id: client_id.to_string(),
            host: format!("/{}", peer.ip()),
            session_timeout_ms: request.session_timeout_ms,
            // v0 has no rebalance timeout: the session timeout is it.
            rebalance_timeout_ms: if version >= 1 {
                request.rebalance_timeout_ms
            } else {
                request.session_timeout_ms
            },
            protocol_type: request.protocol_type.to_string(),
            protocols: request
                .protocols
                .iter()
                .map(|p| (p.name.to_string(), p.metadata.clone()))
                .collect(),
            require_known_member_id: version >= 4,
            new_member_id: new_member_id(request.group_instance_id.as_deref().unwrap_or(client_id)),
        };
        let wait_at_most =
            Duration::from_millis(join.rebalance_timeout_ms.max(0) as u64) + Duration::from_secs(5);
        let started = tokio::time::Instant::now();
        let mut outcome = match self
            .with_group(group_id, true, |g, now| g.join(join, now))
            .await?
        {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!(group = %group_id, client = %client_id,
                    "refused a Kafka client's JoinGroup: the group is a native outbox-relay group (INCONSISTENT_GROUP_PROTOCOL)");
                return Ok(error(INCONSISTENT_GROUP_PROTOCOL, &request.member_id));
            }
        };
        loop {
            match outcome {
                JoinOutcome::Error { code, member_id } => return Ok(error(code, &member_id)),
                JoinOutcome::Answer(joined) => {
                    let mut response = JoinGroupResponse::default();
                    response.generation_id = joined.generation;
                    response.protocol_type = joined.protocol_type.as_deref().map(text);
                    response.protocol_name = joined.protocol_name.as_deref().map(text);
                    response.leader = text(&joined.leader);
                    response.member_id = text(&joined.member_id);
                    response.members = joined
                        .members
                        .into_iter()
                        .map(|(member_id, instance_id, metadata)| {
                            let mut member = JoinGroupResponseMember::default();
                            member.member_id = text(&member_id);
                            member.group_instance_id = instance_id.as_deref().map(text);
                            member.metadata = metadata;
                            member
                        })
                        .collect();
                    return Ok(response);
                }
                JoinOutcome::Wait {
                    member_id,
                    generation,
                } => {
                    if started.elapsed() > wait_at_most {
                        return Ok(error(REBALANCE_IN_PROGRESS, &member_id));
                    }
                    self.group_change_or_poll().await;
                    outcome = match self
                        .with_group(group_id, false, |g, now| {
                            g.poll_join(&member_id, instance_id.as_deref(), generation, now)
                        })
                        .await?
                    {
                        Ok(outcome) => outcome,
                        Err(_) => JoinOutcome::Error {
                            code: super::coordinator::UNKNOWN_MEMBER_ID,
                            member_id,
                        },
                    };
                }
            }
        }
    }

    pub(super) async fn sync_group(
        &self,
        request: &SyncGroupRequest,
    ) -> anyhow::Result<SyncGroupResponse> {
        let group_id = request.group_id.0.as_str();
        let member_id = request.member_id.as_str();
        let generation = request.generation_id;
        let assignments: Vec<(String, Bytes)> = request
            .assignments
            .iter()
            .map(|a| (a.member_id.to_string(), a.assignment.clone()))
            .collect();
        let mut outcome = self
            .with_group(group_id, false, |g, now| {
                g.sync(
                    member_id,
                    request.group_instance_id.as_deref(),
                    generation,
                    (
                        request.protocol_type.as_deref(),
                        request.protocol_name.as_deref(),
                    ),
                    assignments,
                    now,
                )
            })
            .await?
            .unwrap_or(SyncOutcome::Error(super::coordinator::UNKNOWN_MEMBER_ID));
        let mut waited = 0u32;
        // The protocol type and name (v5) stay null: clients check them
        // only when given.
        let response = |error_code: i16, assignment: Bytes| {
            let mut response = SyncGroupResponse::default();
            response.error_code = error_code;
            response.assignment = assignment;
            response
        };
        loop {
            match outcome {
                SyncOutcome::Error(code) => return Ok(response(code, Bytes::new())),
                SyncOutcome::Answer(assignment) => return Ok(response(NONE, assignment)),
                SyncOutcome::Wait => {
                    // The leader has its rebalance timeout to assign; a
                    // minute at most here, then the member joins again.
                    waited += 1;
                    if waited > 1_200 {
                        return Ok(response(REBALANCE_IN_PROGRESS, Bytes::new()));
                    }
                    self.group_change_or_poll().await;
                    outcome = self
                        .with_group(group_id, false, |g, now| {
                            g.poll_sync(
                                member_id,
                                request.group_instance_id.as_deref(),
                                generation,
                                now,
                            )
                        })
                        .await?
                        .unwrap_or(SyncOutcome::Error(super::coordinator::UNKNOWN_MEMBER_ID));
                }
            }
        }
    }

    pub(super) async fn heartbeat(
        &self,
        request: &HeartbeatRequest,
    ) -> anyhow::Result<HeartbeatResponse> {
        let code = self
            .with_group(request.group_id.0.as_str(), false, |g, now| {
                g.heartbeat(
                    &request.member_id,
                    request.group_instance_id.as_deref(),
                    request.generation_id,
                    now,
                )
            })
            .await?
            .unwrap_or(super::coordinator::UNKNOWN_MEMBER_ID);
        let mut response = HeartbeatResponse::default();
        response.error_code = code;
        Ok(response)
    }

    pub(super) async fn leave_group(
        &self,
        request: &LeaveGroupRequest,
        version: i16,
    ) -> anyhow::Result<LeaveGroupResponse> {
        let leaving: Vec<(String, Option<String>)> = if version >= 3 {
            request
                .members
                .iter()
                .map(|m| {
                    (
                        m.member_id.to_string(),
                        m.group_instance_id.as_ref().map(|i| i.to_string()),
                    )
                })
                .collect()
        } else {
            vec![(request.member_id.to_string(), None)]
        };
        let codes = self
            .with_group(request.group_id.0.as_str(), false, |g, now| {
                g.leave(&leaving, now)
            })
            .await?
            .unwrap_or_else(|_| vec![super::coordinator::UNKNOWN_MEMBER_ID; leaving.len()]);
        let mut response = LeaveGroupResponse::default();
        if version >= 3 {
            response.members = leaving
                .iter()
                .zip(&codes)
                .map(|((member_id, instance_id), code)| {
                    let mut member = MemberResponse::default();
                    member.member_id = text(member_id);
                    member.group_instance_id = instance_id.as_deref().map(text);
                    member.error_code = *code;
                    member
                })
                .collect();
        } else {
            response.error_code = codes.first().copied().unwrap_or(NONE);
        }
        Ok(response)
    }

    pub(super) async fn describe_groups(
        &self,
        request: &DescribeGroupsRequest,
    ) -> anyhow::Result<DescribeGroupsResponse> {
        let mut response = DescribeGroupsResponse::default();
        for group_id in &request.groups {
            let mut described = DescribedGroup::default();
            described.group_id = group_id.clone();
            match self
                .with_group(group_id.0.as_str(), false, |g, _| g.clone())
                .await?
            {
                Err(NotKafka::Unknown) => described.group_state = text("Dead"),
                Err(NotKafka::Native) => {
                    described.error_code = GROUP_ID_NOT_FOUND;
                    described.error_message = Some(text(
                        "a native outbox-relay group (see `outbox-relay groups describe`)",
                    ));
                }
                Ok(group) => {
                    let head = &group.head;
                    described.group_state = text(head.state.as_str());
                    described.protocol_type = text(head.protocol_type.as_deref().unwrap_or(""));
                    let chosen = head.protocol_name.clone().unwrap_or_default();
                    described.protocol_data = text(&chosen);
                    described.members = group
                        .members
                        .iter()
                        .map(|m| {
                            let mut member = DescribedGroupMember::default();
                            member.member_id = text(&m.id);
                            member.group_instance_id = m.instance_id.as_deref().map(text);
                            member.client_id = text(&m.client_id);
                            member.client_host = text(&m.host);
                            member.member_metadata = m
                                .protocols
                                .iter()
                                .find(|(n, _)| *n == chosen)
                                .map(|(_, b)| b.clone())
                                .unwrap_or_default();
                            member.member_assignment = m.assignment.clone().unwrap_or_default();
                            member
                        })
                        .collect();
                }
            }
            response.groups.push(described);
        }
        Ok(response)
    }

    pub(super) async fn list_groups(
        &self,
        request: &ListGroupsRequest,
    ) -> anyhow::Result<ListGroupsResponse> {
        let client = self.pool.get().await?;
        let mut response = ListGroupsResponse::default();
        for row in client.query(KAFKA_GROUPS, &[]).await? {
            let (group_id, state, protocol_type): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            if !request.states_filter.is_empty()
                && !request
                    .states_filter
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(&state))
            {
                continue;
            }
            let mut listed = ListedGroup::default();
            listed.group_id = GroupId(text(&group_id));
            listed.protocol_type = text(&protocol_type);
            listed.group_state = text(&state);
            listed.group_type = text("classic");
            response.groups.push(listed);
        }
        Ok(response)
    }

    /// Ends the sessions that ran out and completes the rebalances that
    /// are due, in groups no request is looking at (members all gone,
    /// say): once a second, from the role.
    pub(super) async fn sweep_groups(&self) -> anyhow::Result<()> {
        let groups: Vec<String> = {
            let client = self.pool.get().await?;
            client
                .query(GROUPS_TO_SWEEP, &[])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()
        };
        // One group's failure (its row locked by a frozen process, say)
        // does not hold back the others.
        for group_id in groups {
            let swept = self
                .with_group(&group_id, false, |g, now| {
                    let expired = g.expire(now);
                    if !expired.is_empty() {
                        tracing::info!(group = %g.id, members = ?expired,
                            "Kafka group members' sessions ran out; the group rebalances without them");
                    }
                    g.try_complete(now);
                })
                .await;
            if let Err(e) = swept {
                tracing::warn!(group = %group_id, error = %crate::clip::clip_error(&e),
                    "sweeping a Kafka group failed; next in a second");
            }
        }
        Ok(())
    }
}

/// The answer to a group request whose handler failed (the database is
/// unreachable, say): COORDINATOR_NOT_AVAILABLE, on which clients look the
/// coordinator up again and retry.
pub(super) fn failed(request: &RequestKind) -> Option<ResponseKind> {
    refused(request, COORDINATOR_NOT_AVAILABLE)
}

/// A group request answered with `code` and nothing done (None for a
/// request that is not a group request).
pub(super) fn refused(request: &RequestKind, code: i16) -> Option<ResponseKind> {
    Some(match request {
        RequestKind::JoinGroup(r) => {
            let mut response = JoinGroupResponse::default();
            response.error_code = code;
            response.generation_id = -1;
            response.member_id = r.member_id.clone();
            ResponseKind::JoinGroup(response)
        }
        RequestKind::SyncGroup(_) => {
            let mut response = SyncGroupResponse::default();
            response.error_code = code;
            ResponseKind::SyncGroup(response)
        }
        RequestKind::Heartbeat(_) => {
            let mut response = HeartbeatResponse::default();
            response.error_code = code;
            ResponseKind::Heartbeat(response)
        }
        RequestKind::LeaveGroup(r) => {
            let mut response = LeaveGroupResponse::default();
            response.error_code = code;
            response.members = r
                .members
                .iter()
                .map(|m| {
                    let mut member = MemberResponse::default();
                    member.member_id = m.member_id.clone();
                    member.group_instance_id = m.group_instance_id.clone();
                    member.error_code = code;
                    member
                })
                .collect();
            ResponseKind::LeaveGroup(response)
        }
        RequestKind::OffsetCommit(r) => {
            let mut response = OffsetCommitResponse::default();
            response.topics = r
                .topics
                .iter()
                .map(|t| {
                    let partitions = t.partitions.iter().map(|p| p.partition_index);
                    super::refusals::offset_commit(t.name.clone(), partitions, code)
                })
                .collect();
            ResponseKind::OffsetCommit(response)
        }
        RequestKind::OffsetFetch(_) => {
            let mut response = OffsetFetchResponse::default();
            response.error_code = code;
            ResponseKind::OffsetFetch(response)
        }
        RequestKind::DescribeGroups(r) => {
            let mut response = DescribeGroupsResponse::default();
            response.groups = r
                .groups
                .iter()
                .map(|g| {
                    let mut described = DescribedGroup::default();
                    described.group_id = g.clone();
                    described.error_code = code;
                    described
                })
                .collect();
            ResponseKind::DescribeGroups(response)
        }
        RequestKind::ListGroups(_) => {
            let mut response = ListGroupsResponse::default();
            response.error_code = code;
            ResponseKind::ListGroups(response)
        }
        _ => return None,
    })
}

/// A member id as Kafka makes them: the client id (or instance id) and a
/// random suffix.
fn new_member_id(prefix: &str) -> String {
    format!(
        "{}-{:032x}",
        crate::clip::clip(prefix),
        rand::random::<u128>()
    )
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("kafka_api::groups::KAFKA_GROUPS", KAFKA_GROUPS.to_string()),
        (
            "kafka_api::groups::GROUPS_TO_SWEEP",
            GROUPS_TO_SWEEP.to_string(),
        ),
    ]
}
