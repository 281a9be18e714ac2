use super::*;
use crate::kafka_api::NONE;

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
}

fn join(member_id: &str, new_id: &str, instance: Option<&str>) -> Join {
    Join {
        member_id: member_id.into(),
        instance_id: instance.map(Into::into),
        client_id: "client".into(),
        host: "/127.0.0.1".into(),
        session_timeout_ms: 10_000,
        rebalance_timeout_ms: 30_000,
        protocol_type: "consumer".into(),
        protocols: vec![
            ("cooperative-sticky".into(), Bytes::from_static(b"sub-c")),
            ("range".into(), Bytes::from_static(b"sub-r")),
        ],
        require_known_member_id: true,
        new_member_id: new_id.into(),
    }
}

/// Joins a dynamic member the v4+ way: its id first, then the join.
fn join_twice(group: &mut Group, id: &str, now: DateTime<Utc>) -> JoinOutcome {
    let first = group.join(join("", id, None), now);
    assert_eq!(
        first,
        JoinOutcome::Error {
            code: MEMBER_ID_REQUIRED,
            member_id: id.into()
        }
    );
    group.join(join(id, "unused", None), now)
}

fn answered(outcome: JoinOutcome) -> Joined {
    match outcome {
        JoinOutcome::Answer(joined) => joined,
        other => panic!("not answered: {other:?}"),
    }
}

/// Two members in one generation, the leader's assignment synced.
fn stable_pair() -> Group {
    let mut group = Group::new("mail-service");
    assert!(matches!(
        join_twice(&mut group, "a", at(0)),
        JoinOutcome::Wait { .. }
    ));
    assert!(matches!(
        join_twice(&mut group, "b", at(100)),
        JoinOutcome::Wait { .. }
    ));
    // The initial delay holds the first generation for both.
    assert!(matches!(
        group.poll_join("a", None, 1, at(500)),
        JoinOutcome::Wait { .. }
    ));
    let leader = answered(group.poll_join("a", None, 1, at(1_000)));
    let follower = answered(group.poll_join("b", None, 1, at(1_000)));
    assert_eq!((leader.generation, leader.leader.as_str()), (1, "a"));
    assert_eq!(leader.protocol_name.as_deref(), Some("cooperative-sticky"));
    assert_eq!(leader.members.len(), 2);
    assert_eq!(leader.members[1].2, Bytes::from_static(b"sub-c"));
    assert!(follower.members.is_empty());
    assert_eq!(
        group.sync("b", None, 1, (None, None), vec![], at(1_100)),
        SyncOutcome::Wait
    );
    let assignments = vec![
        ("a".into(), Bytes::from_static(b"p0")),
        ("b".into(), Bytes::from_static(b"p1")),
    ];
    assert_eq!(
        group.sync(
            "a",
            None,
            1,
            (Some("consumer"), None),
            assignments,
            at(1_100)
        ),
        SyncOutcome::Answer(Bytes::from_static(b"p0"))
    );
    assert_eq!(
        group.poll_sync("b", None, 1, at(1_150)),
        SyncOutcome::Answer(Bytes::from_static(b"p1"))
    );
    assert_eq!(group.head.state, State::Stable);
    group
}

#[test]
fn members_joining_together_get_one_generation_and_the_leaders_assignments() {
    stable_pair();
}

#[test]
fn a_new_member_makes_the_others_rejoin_and_a_stale_generation_is_fenced() {
    let mut group = stable_pair();
    assert!(matches!(
        join_twice(&mut group, "c", at(2_000)),
        JoinOutcome::Wait { .. }
    ));
    assert_eq!(
        group.heartbeat("a", None, 1, at(2_100)),
        REBALANCE_IN_PROGRESS
    );
    // Commits of the current generation still go through while it prepares.
    assert_eq!(group.may_commit("a", None, 1, at(2_100)), NONE);
    assert!(matches!(
        group.join(join("a", "-", None), at(2_200)),
        JoinOutcome::Wait { .. }
    ));
    assert!(matches!(
        group.poll_join("c", None, 2, at(2_200)),
        JoinOutcome::Wait { .. }
    ));
    // The last to rejoin completes the generation.
    assert!(matches!(
        group.join(join("b", "-", None), at(2_300)),
        JoinOutcome::Answer(_)
    ));
    let c = answered(group.poll_join("c", None, 2, at(2_300)));
    assert_eq!((c.generation, c.leader.as_str()), (2, "a"));
    assert_eq!(group.heartbeat("a", None, 1, at(2_400)), ILLEGAL_GENERATION);
    assert_eq!(
        group.may_commit("b", None, 2, at(2_400)),
        REBALANCE_IN_PROGRESS
    );
    assert_eq!(
        group.may_commit("b", None, 1, at(2_400)),
        ILLEGAL_GENERATION
    );
    assert_eq!(group.heartbeat("zz", None, 2, at(2_400)), UNKNOWN_MEMBER_ID);
}

#[test]
fn a_member_whose_session_runs_out_is_removed_and_the_group_rebalances_without_it() {
    let mut group = stable_pair();
    // b heartbeats, a does not.
    assert_eq!(group.heartbeat("b", None, 1, at(9_000)), NONE);
    assert_eq!(
        group.heartbeat("b", None, 1, at(12_000)),
        REBALANCE_IN_PROGRESS
    );
    assert_eq!(group.members.len(), 1);
    assert!(matches!(
        group.join(join("b", "-", None), at(12_100)),
        JoinOutcome::Answer(_)
    ));
    let b = answered(group.poll_join("b", None, 2, at(12_100)));
    assert_eq!(
        (b.generation, b.leader.as_str(), b.members.len()),
        (2, "b", 1)
    );
    assert_eq!(
        group.may_commit("a", None, 1, at(12_200)),
        UNKNOWN_MEMBER_ID
    );
}

#[test]
fn a_rebalance_completes_at_its_deadline_without_members_that_did_not_rejoin() {
    let mut group = stable_pair();
    group.leave(&[("b".into(), None)], at(2_000));
    let mut group2 = group.clone();
    assert_eq!(group.head.state, State::PreparingRebalance);
    // a keeps heartbeating but never rejoins: the group waits for it ...
    assert!(matches!(
        join_twice(&mut group2, "c", at(2_000)),
        JoinOutcome::Wait { .. }
    ));
    for t in (5_000..32_000).step_by(5_000) {
        assert_eq!(group2.heartbeat("a", None, 1, at(t)), REBALANCE_IN_PROGRESS);
        assert!(matches!(
            group2.poll_join("c", None, 2, at(t)),
            JoinOutcome::Wait { .. }
        ));
    }
    // ... until its rebalance timeout (30 s), then goes on without it.
    let c = answered(group2.poll_join("c", None, 2, at(32_001)));
    assert_eq!((c.leader.as_str(), c.members.len()), ("c", 1));
    assert_eq!(
        group2.heartbeat("a", None, 1, at(32_002)),
        UNKNOWN_MEMBER_ID
    );
}

#[test]
fn a_static_member_restarting_keeps_its_assignment_without_a_rebalance_and_fences_its_old_process()
{
    let mut group = Group::new("g");
    assert!(matches!(
        group.join(join("", "a1", Some("a")), at(0)),
        JoinOutcome::Wait { .. }
    ));
    assert!(matches!(
        group.join(join("", "b1", Some("b")), at(0)),
        JoinOutcome::Wait { .. }
    ));
    let a = answered(group.poll_join("a1", None, 1, at(1_000)));
    assert_eq!(a.members[1].1.as_deref(), Some("b"));
    answered(group.poll_join("b1", None, 1, at(1_000)));
    let assignments = vec![
        ("a1".into(), Bytes::from_static(b"p0")),
        ("b1".into(), Bytes::from_static(b"p1")),
    ];
    group.sync("a1", Some("a"), 1, (None, None), assignments, at(1_000));
    // b restarts within its session: new member id, same generation.
    let b = answered(group.join(join("", "b2", Some("b")), at(5_000)));
    assert_eq!((b.generation, b.member_id.as_str()), (1, "b2"));
    assert_eq!(group.head.state, State::Stable);
    assert_eq!(
        group.sync("b2", Some("b"), 1, (None, None), vec![], at(5_100)),
        SyncOutcome::Answer(Bytes::from_static(b"p1"))
    );
    assert_eq!(group.heartbeat("a1", Some("a"), 1, at(5_200)), NONE);
    assert_eq!(
        group.heartbeat("b1", Some("b"), 1, at(5_200)),
        FENCED_INSTANCE_ID
    );
    assert_eq!(
        group.may_commit("b1", Some("b"), 1, at(5_200)),
        FENCED_INSTANCE_ID
    );
}

#[test]
fn commits_outside_a_generation_only_to_a_group_without_members() {
    let mut empty = Group::new("g");
    assert_eq!(empty.may_commit("", None, -1, at(0)), NONE);
    let mut group = stable_pair();
    assert_eq!(group.may_commit("", None, -1, at(1_200)), UNKNOWN_MEMBER_ID);
    assert_eq!(
        group.leave(&[("a".into(), None), ("zz".into(), None)], at(1_300)),
        vec![NONE, UNKNOWN_MEMBER_ID]
    );
    group.leave(&[("b".into(), None)], at(1_300));
    assert_eq!(group.head.state, State::Empty);
    assert_eq!(group.may_commit("", None, -1, at(1_400)), NONE);
}

#[test]
fn a_join_that_cannot_share_the_groups_protocols_is_refused() {
    let mut group = stable_pair();
    let mut other = join("", "x", None);
    other.protocols = vec![("roundrobin".into(), Bytes::new())];
    assert!(matches!(
        group.join(other, at(1_200)),
        JoinOutcome::Error {
            code: INCONSISTENT_GROUP_PROTOCOL,
            ..
        }
    ));
    let mut short = join("", "x", None);
    short.session_timeout_ms = 100;
    assert!(matches!(
        group.join(short, at(1_200)),
        JoinOutcome::Error {
            code: INVALID_SESSION_TIMEOUT,
            ..
        }
    ));
}

#[test]
fn the_assignor_most_members_prefer_is_chosen() {
    let member = |protocols: &[&str]| Member {
        id: String::new(),
        instance_id: None,
        client_id: String::new(),
        host: String::new(),
        session_timeout_ms: 0,
        rebalance_timeout_ms: 0,
        protocols: protocols
            .iter()
            .map(|p| (p.to_string(), Bytes::new()))
            .collect(),
        joined_generation: 0,
        assignment: None,
        heartbeat_at: at(0),
    };
    let members = [
        member(&["range", "roundrobin"]),
        member(&["roundrobin", "range"]),
        member(&["roundrobin"]),
    ];
    assert_eq!(choose_protocol(&members).as_deref(), Some("roundrobin"));
}

#[test]
fn a_waiter_is_answered_its_generation_even_if_another_rebalance_begins_first() {
    let mut group = stable_pair();
    // c joins; a and b rejoin; b's join completes generation 2 ...
    assert!(matches!(
        join_twice(&mut group, "c", at(2_000)),
        JoinOutcome::Wait { .. }
    ));
    assert!(matches!(
        group.join(join("a", "-", None), at(2_100)),
        JoinOutcome::Wait { .. }
    ));
    assert!(matches!(
        group.join(join("b", "-", None), at(2_200)),
        JoinOutcome::Answer(_)
    ));
    // ... and a member leaves before the other waiters looked again.
    group.leave(&[("b".into(), None)], at(2_250));
    assert_eq!(group.head.state, State::PreparingRebalance);
    let a = answered(group.poll_join("a", None, 2, at(2_300)));
    assert_eq!(a.generation, 2);
    // Its sync is told the group moved on; it joins again.
    assert_eq!(
        group.sync("a", None, 2, (None, None), vec![], at(2_350)),
        SyncOutcome::Error(REBALANCE_IN_PROGRESS)
    );
}

#[test]
fn a_member_given_its_id_does_not_rebalance_the_group_until_it_joins_with_it() {
    let mut group = stable_pair();
    let first = group.join(join("", "late", None), at(2_000));
    assert!(matches!(
        first,
        JoinOutcome::Error {
            code: MEMBER_ID_REQUIRED,
            ..
        }
    ));
    assert_eq!(group.head.state, State::Stable);
    assert_eq!(group.heartbeat("a", None, 1, at(2_100)), NONE);
    // It never comes back: its session ends, still without a rebalance.
    assert_eq!(group.heartbeat("a", None, 1, at(9_000)), NONE);
    assert_eq!(group.heartbeat("b", None, 1, at(9_000)), NONE);
    assert_eq!(group.heartbeat("a", None, 1, at(12_500)), NONE);
    assert!(group.members.iter().all(|m| m.id != "late"));
    // One that does come back makes the group rebalance.
    let again = group.join(join("", "later", None), at(13_000));
    assert!(matches!(
        again,
        JoinOutcome::Error {
            code: MEMBER_ID_REQUIRED,
            ..
        }
    ));
    assert!(matches!(
        group.join(join("later", "-", None), at(13_100)),
        JoinOutcome::Wait { .. }
    ));
    assert_eq!(
        group.heartbeat("a", None, 1, at(13_200)),
        REBALANCE_IN_PROGRESS
    );
}

#[test]
fn a_static_member_restarting_while_the_leader_assigns_makes_the_group_rebalance() {
    let mut group = Group::new("g");
    assert!(matches!(
        group.join(join("", "a1", Some("a")), at(0)),
        JoinOutcome::Wait { .. }
    ));
    assert!(matches!(
        group.join(join("", "b1", Some("b")), at(0)),
        JoinOutcome::Wait { .. }
    ));
    answered(group.poll_join("a1", Some("a"), 1, at(1_000)));
    assert_eq!(group.head.state, State::CompletingRebalance);
    // b restarts before the leader's SyncGroup: the leader's answer names
    // b1, so b2 would get nothing; the group rebalances instead.
    let restarted = group.join(join("", "b2", Some("b")), at(1_100));
    assert!(
        matches!(restarted, JoinOutcome::Wait { .. }),
        "{restarted:?}"
    );
    assert_eq!(group.head.state, State::PreparingRebalance);
    // The old process, still waiting, is fenced.
    assert_eq!(
        group.poll_join("b1", Some("b"), 1, at(1_200)),
        JoinOutcome::Error {
            code: FENCED_INSTANCE_ID,
            member_id: "b1".into()
        }
    );
}
