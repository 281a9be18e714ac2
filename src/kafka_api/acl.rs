//! A user's access, applied around the handlers: a group request for a
//! group it may not use is answered GROUP_AUTHORIZATION_FAILED and not
//! run; topics it may not read are taken out of a request before it runs
//! (answered TOPIC_AUTHORIZATION_FAILED) and out of answers that list
//! everything (Metadata for all topics, OffsetFetch for all, ListGroups).
//! An unlimited access leaves requests and answers as they are.

use std::borrow::Cow;

use kafka_protocol::messages::{RequestKind, ResponseKind, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::security::Access;
use super::{refusals, TOPIC_AUTHORIZATION_FAILED};

fn topic_name(name: String) -> TopicName {
    TopicName(StrBytes::from_string(name))
}

pub(super) const GROUP_AUTHORIZATION_FAILED: i16 = 30;

/// The group a group request is about.
pub(super) fn group_of(request: &RequestKind) -> Option<&str> {
    Some(match request {
        RequestKind::JoinGroup(r) => &r.group_id.0,
        RequestKind::SyncGroup(r) => &r.group_id.0,
        RequestKind::Heartbeat(r) => &r.group_id.0,
        RequestKind::LeaveGroup(r) => &r.group_id.0,
        RequestKind::OffsetCommit(r) => &r.group_id.0,
        RequestKind::OffsetFetch(r) => &r.group_id.0,
        _ => return None,
    })
}

/// `request` without the topics `access` may not read, and those topics
/// with the partitions asked.
pub(super) fn restrict<'a>(
    request: &'a RequestKind,
    access: &Access,
) -> (Cow<'a, RequestKind>, Vec<(String, Vec<i32>)>) {
    let mut denied = Vec::new();
    let mut keep = |name: &str, partitions: Vec<i32>| {
        let allowed = access.topic(name);
        if !allowed {
            denied.push((name.to_string(), partitions));
        }
        allowed
    };
    let restricted = match request {
        RequestKind::Fetch(r) if !r.topics.iter().all(|t| access.topic(&t.topic.0)) => {
            let mut r = r.clone();
            r.topics.retain(|t| {
                keep(
                    &t.topic.0,
                    t.partitions.iter().map(|p| p.partition).collect(),
                )
            });
            RequestKind::Fetch(r)
        }
        RequestKind::ListOffsets(r) if !r.topics.iter().all(|t| access.topic(&t.name.0)) => {
            let mut r = r.clone();
            r.topics.retain(|t| {
                keep(
                    &t.name.0,
                    t.partitions.iter().map(|p| p.partition_index).collect(),
                )
            });
            RequestKind::ListOffsets(r)
        }
        RequestKind::OffsetCommit(r) if !r.topics.iter().all(|t| access.topic(&t.name.0)) => {
            let mut r = r.clone();
            r.topics.retain(|t| {
                keep(
                    &t.name.0,
                    t.partitions.iter().map(|p| p.partition_index).collect(),
                )
            });
            RequestKind::OffsetCommit(r)
        }
        _ => return (Cow::Borrowed(request), denied),
    };
    (Cow::Owned(restricted), denied)
}

/// `response` with the denied topics answered TOPIC_AUTHORIZATION_FAILED,
/// and what the user may not see taken out.
pub(super) fn complete(
    response: &mut ResponseKind,
    request: &RequestKind,
    denied: Vec<(String, Vec<i32>)>,
    access: &Access,
) {
    match response {
        ResponseKind::Fetch(f) => {
            f.responses
                .extend(denied.into_iter().map(|(name, partitions)| {
                    refusals::fetch(
                        topic_name(name),
                        partitions.into_iter(),
                        TOPIC_AUTHORIZATION_FAILED,
                    )
                }))
        }
        ResponseKind::ListOffsets(l) => {
            l.topics
                .extend(denied.into_iter().map(|(name, partitions)| {
                    refusals::list_offsets(
                        topic_name(name),
                        partitions.into_iter(),
                        TOPIC_AUTHORIZATION_FAILED,
                    )
                }))
        }
        ResponseKind::OffsetCommit(o) => {
            o.topics
                .extend(denied.into_iter().map(|(name, partitions)| {
                    refusals::offset_commit(
                        topic_name(name),
                        partitions.into_iter(),
                        TOPIC_AUTHORIZATION_FAILED,
                    )
                }))
        }
        // Asked for all: all it may see; asked by name: refused by name.
        ResponseKind::Metadata(m) if matches!(request, RequestKind::Metadata(r) if r.topics.is_none()) => {
            m.topics
                .retain(|t| access.topic(t.name.as_ref().map(|n| n.0.as_str()).unwrap_or_default()))
        }
        ResponseKind::Metadata(m) => {
            for topic in &mut m.topics {
                let name = topic
                    .name
                    .as_ref()
                    .map(|n| n.0.as_str())
                    .unwrap_or_default();
                if !access.topic(name) {
                    topic.error_code = TOPIC_AUTHORIZATION_FAILED;
                    topic.partitions.clear();
                }
            }
        }
        ResponseKind::OffsetFetch(o) => o.topics.retain(|t| access.topic(&t.name.0)),
        ResponseKind::ListGroups(l) => l.groups.retain(|g| access.group(&g.group_id.0)),
        ResponseKind::DescribeGroups(d) => {
            for group in &mut d.groups {
                if !access.group(&group.group_id.0) {
                    let id = group.group_id.clone();
                    *group = Default::default();
                    group.group_id = id;
                    group.error_code = GROUP_AUTHORIZATION_FAILED;
                }
            }
        }
        ResponseKind::FindCoordinator(f) => {
            if let RequestKind::FindCoordinator(r) = request {
                if !r.key.is_empty() && !access.group(&r.key) {
                    f.error_code = GROUP_AUTHORIZATION_FAILED;
                }
            }
            for coordinator in &mut f.coordinators {
                if !access.group(&coordinator.key) {
                    coordinator.error_code = GROUP_AUTHORIZATION_FAILED;
                }
            }
        }
        _ => {}
    }
}
