use super::*;
use bytes::{BufMut, BytesMut};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ForgottenTopic};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

/// The versions each shape is written for (what the issue asks served):
/// every range of the served table must lie within these.
const SHAPED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::Metadata, 1, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::Produce, 3, 9),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::SaslHandshake, 1, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
];

fn text(s: &'static str) -> StrBytes {
    StrBytes::from_static_str(s)
}

/// A request of `key` at `version` with one element in every array the
/// version has and a value in every string, so its encoding exercises
/// every field of the shape.
fn populated(key: ApiKey, version: i16) -> RequestKind {
    let topic = || TopicName(text("order-created"));
    let group = || GroupId(text("mail-service"));
    match key {
        ApiKey::ApiVersions => RequestKind::ApiVersions(
            ApiVersionsRequest::default()
                .with_client_software_name(text("probe"))
                .with_client_software_version(text("1.0")),
        ),
        ApiKey::Metadata => {
            RequestKind::Metadata(MetadataRequest::default().with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(topic())),
            ])))
        }
        ApiKey::ListOffsets => {
            RequestKind::ListOffsets(ListOffsetsRequest::default().with_topics(vec![
            ListOffsetsTopic::default()
                .with_name(topic())
                .with_partitions(vec![ListOffsetsPartition::default().with_timestamp(-2)]),
        ]))
        }
        ApiKey::Fetch => {
            let mut request = FetchRequest::default().with_topics(vec![FetchTopic::default()
                .with_topic(topic())
                .with_partitions(vec![FetchPartition::default().with_fetch_offset(7)])]);
            if version >= 7 {
                request = request.with_forgotten_topics_data(vec![ForgottenTopic::default()
                    .with_topic(topic())
                    .with_partitions(vec![1, 2])]);
            }
            if version >= 11 {
                request = request.with_rack_id(text("rack"));
            }
            RequestKind::Fetch(request)
        }
        ApiKey::Produce => RequestKind::Produce(
            ProduceRequest::default()
                .with_transactional_id(Some(TransactionalId(text("tx"))))
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(topic())
                    .with_partition_data(vec![PartitionProduceData::default()
                        .with_records(Some(bytes::Bytes::from_static(b"records")))])]),
        ),
        ApiKey::FindCoordinator => RequestKind::FindCoordinator(if version >= 4 {
            FindCoordinatorRequest::default()
                .with_coordinator_keys(vec![text("mail-service"), text("billing")])
        } else {
            FindCoordinatorRequest::default().with_key(text("mail-service"))
        }),
        ApiKey::JoinGroup => {
            let mut request = JoinGroupRequest::default()
                .with_group_id(group())
                .with_member_id(text("member-1"))
                .with_protocol_type(text("consumer"))
                .with_protocols(vec![JoinGroupRequestProtocol::default()
                    .with_name(text("range"))
                    .with_metadata(bytes::Bytes::from_static(b"subscription"))]);
            if version >= 5 {
                request = request.with_group_instance_id(Some(text("instance-1")));
            }
            if version >= 8 {
                request = request.with_reason(Some(text("why")));
            }
            RequestKind::JoinGroup(request)
        }
        ApiKey::SyncGroup => {
            let mut request = SyncGroupRequest::default()
                .with_group_id(group())
                .with_member_id(text("member-1"))
                .with_assignments(vec![SyncGroupRequestAssignment::default()
                    .with_member_id(text("member-1"))
                    .with_assignment(bytes::Bytes::from_static(b"assignment"))]);
            if version >= 3 {
                request = request.with_group_instance_id(Some(text("instance-1")));
            }
            if version >= 5 {
                request = request
                    .with_protocol_type(Some(text("consumer")))
                    .with_protocol_name(Some(text("range")));
            }
            RequestKind::SyncGroup(request)
        }
        ApiKey::Heartbeat => {
            let mut request = HeartbeatRequest::default()
                .with_group_id(group())
                .with_member_id(text("member-1"));
            if version >= 3 {
                request = request.with_group_instance_id(Some(text("instance-1")));
            }
            RequestKind::Heartbeat(request)
        }
        ApiKey::LeaveGroup => RequestKind::LeaveGroup(if version >= 3 {
            let mut member = MemberIdentity::default()
                .with_member_id(text("member-1"))
                .with_group_instance_id(Some(text("instance-1")));
            if version >= 5 {
                member = member.with_reason(Some(text("why")));
            }
            LeaveGroupRequest::default()
                .with_group_id(group())
                .with_members(vec![member])
        } else {
            LeaveGroupRequest::default()
                .with_group_id(group())
                .with_member_id(text("member-1"))
        }),
        ApiKey::OffsetCommit => {
            let mut request = OffsetCommitRequest::default()
                .with_group_id(group())
                .with_member_id(text("member-1"))
                .with_topics(vec![OffsetCommitRequestTopic::default()
                    .with_name(topic())
                    .with_partitions(vec![OffsetCommitRequestPartition::default()
                        .with_committed_offset(42)
                        .with_committed_metadata(Some(text("meta")))])]);
            if version >= 7 {
                request = request.with_group_instance_id(Some(text("instance-1")));
            }
            RequestKind::OffsetCommit(request)
        }
        ApiKey::OffsetFetch => RequestKind::OffsetFetch(
            OffsetFetchRequest::default()
                .with_group_id(group())
                .with_topics(Some(vec![OffsetFetchRequestTopic::default()
                    .with_name(topic())
                    .with_partition_indexes(vec![0, 1, 2])])),
        ),
        ApiKey::DescribeGroups => RequestKind::DescribeGroups(
            DescribeGroupsRequest::default().with_groups(vec![group(), GroupId(text("billing"))]),
        ),
        ApiKey::ListGroups => RequestKind::ListGroups(if version >= 4 {
            ListGroupsRequest::default().with_states_filter(vec![text("Stable")])
        } else {
            ListGroupsRequest::default()
        }),
        ApiKey::SaslHandshake => RequestKind::SaslHandshake(
            SaslHandshakeRequest::default().with_mechanism(text("PLAIN")),
        ),
        ApiKey::SaslAuthenticate => RequestKind::SaslAuthenticate(
            SaslAuthenticateRequest::default()
                .with_auth_bytes(bytes::Bytes::from_static(b"\0user\0password")),
        ),
        other => panic!("no sample of {other:?}"),
    }
}

#[test]
fn every_shape_walks_a_populated_request_of_every_version_to_its_last_byte() {
    for &(key, min, max) in SHAPED {
        for version in min..=max {
            let mut encoded = BytesMut::new();
            populated(key, version)
                .encode(&mut encoded, version)
                .unwrap_or_else(|e| panic!("{key:?} v{version}: {e}"));
            let shape = shape(key).unwrap();
            let walk = Walk {
                version,
                flexible: version >= shape.flexible_since,
            };
            let mut rest = &encoded[..];
            walk.fields(&mut rest, shape.fields)
                .unwrap_or_else(|what| panic!("{key:?} v{version}: {what}"));
            assert!(
                rest.is_empty(),
                "{key:?} v{version}: {} bytes not walked",
                rest.len()
            );
        }
    }
}

#[test]
fn every_served_version_has_a_shape() {
    for &(key, min, max) in super::super::versions::SUPPORTED {
        assert!(
            SHAPED
                .iter()
                .any(|&(k, lo, hi)| k == key && lo <= min && max <= hi),
            "{key:?} v{min}..=v{max} is served without a checked shape"
        );
    }
}

#[test]
fn a_declared_count_or_length_past_the_frame_is_refused() {
    // Fetch v12: four i32 and an i8, session id and epoch, then the topics
    // array declaring (varint) about four billion elements.
    let mut frame = BytesMut::new();
    for value in [-1, 500, 1, 1024] {
        frame.put_i32(value);
    }
    frame.put_i8(0);
    frame.put_i32(0);
    frame.put_i32(-1);
    frame.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    let refused = check(ApiKey::Fetch, 12, &frame).unwrap_err();
    assert!(refused.contains("array's declared count"), "{refused}");

    // Metadata v1: one topic whose name declares 300 bytes.
    let mut frame = BytesMut::new();
    frame.put_i32(1);
    frame.put_i16(300);
    frame.put_slice(b"order-created");
    let refused = check(ApiKey::Metadata, 1, &frame).unwrap_err();
    assert!(refused.contains("a string"), "{refused}");

    // A truncated request is refused, a null array is not.
    assert!(check(ApiKey::Heartbeat, 0, &[0, 3, b'a']).is_err());
    let mut null_topics = BytesMut::new();
    null_topics.put_i32(-1);
    null_topics.put_slice(&[0, 0, 0]);
    assert!(check(ApiKey::Metadata, 8, &null_topics).is_ok());
}
