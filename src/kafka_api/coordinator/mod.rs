//! Kafka's classic group protocol as a state machine over one group's
//! state: what JoinGroup, SyncGroup, Heartbeat, LeaveGroup and an offset
//! commit do to a group, and what each answers. Here: membership and
//! rebalances (join, session expiry, the barrier); in `generation`: what a
//! member does within a generation (sync, heartbeat, leave, commit). No I/O: `group_store`
//! loads a group under a row lock, one of these runs, the store writes
//! back what changed; a request that must wait (a join for the others, a
//! follower's sync for the leader) runs its poll again until it is done.
//!
//! The coordinator only runs the join/sync barrier: members and their
//! subscriptions go to the leader, the leader's assignments (opaque bytes)
//! to each member. Generations fence: a member of an older generation
//! cannot sync, heartbeat or commit (ILLEGAL_GENERATION), a removed one is
//! unknown (UNKNOWN_MEMBER_ID), an older process of a static member
//! (`group.instance.id`) is fenced (FENCED_INSTANCE_ID).

use bytes::Bytes;
use chrono::{DateTime, TimeDelta, Utc};

pub(super) const ILLEGAL_GENERATION: i16 = 22;
pub(super) const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
pub(super) const UNKNOWN_MEMBER_ID: i16 = 25;
pub(super) const INVALID_SESSION_TIMEOUT: i16 = 26;
pub(super) const REBALANCE_IN_PROGRESS: i16 = 27;
pub(super) const MEMBER_ID_REQUIRED: i16 = 79;
pub(super) const FENCED_INSTANCE_ID: i16 = 82;

/// A group that was empty waits this long after its first join for others
/// to join the same generation (Kafka's `group.initial.rebalance.delay.ms`
/// is 3 s).
pub(super) const INITIAL_REBALANCE_DELAY: TimeDelta = TimeDelta::milliseconds(1000);

/// The session timeouts a member may ask for (Kafka's
/// `group.min.session.timeout.ms` and `group.max.session.timeout.ms`).
pub(super) const SESSION_TIMEOUT_MS: std::ops::RangeInclusive<i32> = 6_000..=1_800_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }

    pub(super) fn parse(s: &str) -> State {
        match s {
            "PreparingRebalance" => State::PreparingRebalance,
            "CompletingRebalance" => State::CompletingRebalance,
            "Stable" => State::Stable,
            _ => State::Empty,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Member {
    pub id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    /// Assignor names with their subscriptions, in the member's order of
    /// preference.
    pub protocols: Vec<(String, Bytes)>,
    pub joined_generation: i32,
    pub assignment: Option<Bytes>,
    pub heartbeat_at: DateTime<Utc>,
}

/// The `joined_generation` of a member that has its id (v4+
/// MEMBER_ID_REQUIRED) but has not joined with it yet: it neither starts
/// a rebalance nor counts in one, and its session ends it if it never
/// comes back (Kafka's pending members).
const PENDING: i32 = -1;

impl Member {
    fn pending(&self) -> bool {
        self.joined_generation == PENDING
    }

    fn expired(&self, now: DateTime<Utc>) -> bool {
        self.heartbeat_at + TimeDelta::milliseconds(self.session_timeout_ms.into()) < now
    }
}

/// The group's own row.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Head {
    pub state: State,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: Option<String>,
    pub rebalance_deadline: Option<DateTime<Utc>>,
    pub initial_rebalance: bool,
}

#[derive(Debug, Clone)]
pub(super) struct Group {
    pub id: String,
    pub head: Head,
    /// In the order they first joined.
    pub members: Vec<Member>,
}

/// A JoinGroup, as the coordinator needs it.
#[derive(Debug, Clone)]
pub(super) struct Join {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// v4+: a new dynamic member is given its id first (MEMBER_ID_REQUIRED)
    /// and joins again with it.
    pub require_known_member_id: bool,
    /// A fresh id, used if the member gets one.
    pub new_member_id: String,
}

/// What a JoinGroup is answered.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Joined {
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// The leader's answer lists every member with its subscription to the
    /// chosen assignor; the others' is empty.
    pub members: Vec<(String, Option<String>, Bytes)>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum JoinOutcome {
    Answer(Joined),
    /// Poll [`Group::poll_join`] for `member_id` until the rebalance to
    /// `generation` completes.
    Wait {
        member_id: String,
        generation: i32,
    },
    Error {
        code: i16,
        member_id: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum SyncOutcome {
    Answer(Bytes),
    /// A follower waits for the leader's assignments.
    Wait,
    Error(i16),
}

impl Group {
    #[cfg(test)]
    pub(super) fn new(id: &str) -> Group {
        Group {
            id: id.to_string(),
            head: Head {
                state: State::Empty,
                generation: 0,
                protocol_type: None,
                protocol_name: None,
                leader: None,
                rebalance_deadline: None,
                initial_rebalance: false,
            },
            members: Vec::new(),
        }
    }

    fn index(&self, member_id: &str) -> Option<usize> {
        self.members.iter().position(|m| m.id == member_id)
    }

    /// The member a request speaks for: by its instance id when it gives one
    /// (another member id under that instance is a newer process: this one
    /// is fenced), else by member id.
    fn validate(&self, member_id: &str, instance_id: Option<&str>) -> Result<usize, i16> {
        if let Some(instance) = instance_id {
            if let Some(i) = self
                .members
                .iter()
                .position(|m| m.instance_id.as_deref() == Some(instance))
            {
                return if self.members[i].id == member_id {
                    Ok(i)
                } else {
                    Err(FENCED_INSTANCE_ID)
                };
            }
        }
        self.index(member_id).ok_or(UNKNOWN_MEMBER_ID)
    }

    /// Removes members whose session ran out; a group that loses a member
    /// rebalances (an emptied one is Empty).
    pub(super) fn expire(&mut self, now: DateTime<Utc>) -> Vec<String> {
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.expired(now))
            .map(|m| m.id.clone())
            .collect();
        let joined_expired = self.members.iter().any(|m| m.expired(now) && !m.pending());
        self.members.retain(|m| !m.expired(now));
        if joined_expired {
            self.after_removal(now);
        }
        expired
    }

    /// The members that have joined (not pending).
    fn joined_members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| !m.pending())
    }

    fn after_removal(&mut self, now: DateTime<Utc>) {
        if self.joined_members().next().is_none() {
            self.become_empty();
        } else if self.head.state != State::PreparingRebalance {
            self.prepare_rebalance(now, 0);
        }
    }

    fn become_empty(&mut self) {
        let head = &mut self.head;
        if head.state != State::Empty {
            head.generation += 1;
        }
        head.state = State::Empty;
        head.protocol_type = None;
        head.protocol_name = None;
        head.leader = None;
        head.rebalance_deadline = None;
        head.initial_rebalance = false;
    }

    /// Starts a rebalance: members must join the next generation by the
    /// deadline (the longest rebalance timeout, or for a group that was
    /// empty the initial delay).
    fn prepare_rebalance(&mut self, now: DateTime<Utc>, joining_timeout_ms: i32) {
        if self.head.state == State::PreparingRebalance {
            return;
        }
        let initial = self.head.state == State::Empty;
        let wait = if initial {
            INITIAL_REBALANCE_DELAY
        } else {
            let longest = self
                .members
                .iter()
                .map(|m| m.rebalance_timeout_ms)
                .chain(std::iter::once(joining_timeout_ms))
                .max()
                .unwrap_or(0);
            TimeDelta::milliseconds(longest.into())
        };
        self.head.state = State::PreparingRebalance;
        self.head.rebalance_deadline = Some(now + wait);
        self.head.initial_rebalance = initial;
    }

    /// Completes the rebalance once every member has joined (or, from
    /// Empty, once the initial delay is over), or at the deadline without
    /// those that have not.
    pub(super) fn try_complete(&mut self, now: DateTime<Utc>) {
        if self.head.state != State::PreparingRebalance {
            return;
        }
        let next = self.head.generation + 1;
        let due = self.head.rebalance_deadline.is_none_or(|d| now >= d);
        let all_joined = self.joined_members().all(|m| m.joined_generation == next);
        if !(due || (all_joined && !self.head.initial_rebalance)) {
            return;
        }
        self.members
            .retain(|m| m.joined_generation == next || m.pending());
        let joined: Vec<Member> = self.joined_members().cloned().collect();
        if joined.is_empty() {
            self.become_empty();
            return;
        }
        let head = &mut self.head;
        head.generation = next;
        head.protocol_name = choose_protocol(&joined);
        if !head
            .leader
            .as_ref()
            .is_some_and(|l| joined.iter().any(|m| &m.id == l))
        {
            head.leader = Some(joined[0].id.clone());
        }
        head.state = State::CompletingRebalance;
        head.rebalance_deadline = None;
        head.initial_rebalance = false;
        for member in &mut self.members {
            member.assignment = None;
        }
    }

    /// The answer to a member whose join completed: the leader gets every
    /// member's subscription to the chosen assignor.
    fn joined(&self, member_id: &str) -> Joined {
        let head = &self.head;
        let leader = head.leader.clone().unwrap_or_default();
        let members = if leader == member_id {
            let chosen = head.protocol_name.as_deref().unwrap_or_default();
            self.joined_members()
                .map(|m| {
                    let metadata = m
                        .protocols
                        .iter()
                        .find(|(name, _)| name == chosen)
                        .map(|(_, metadata)| metadata.clone())
                        .unwrap_or_default();
                    (m.id.clone(), m.instance_id.clone(), metadata)
                })
                .collect()
        } else {
            Vec::new()
        };
        Joined {
            generation: head.generation,
            protocol_type: head.protocol_type.clone(),
            protocol_name: head.protocol_name.clone(),
            leader,
            member_id: member_id.to_string(),
            members,
        }
    }

    /// Why a waiting member is no longer in the group: a newer process of
    /// the same static instance took its place, or it was removed.
    fn gone(&self, instance_id: Option<&str>) -> i16 {
        let replaced = instance_id.is_some_and(|instance| {
            self.members
                .iter()
                .any(|m| m.instance_id.as_deref() == Some(instance))
        });
        if replaced {
            FENCED_INSTANCE_ID
        } else {
            UNKNOWN_MEMBER_ID
        }
    }

    pub(super) fn join(&mut self, join: Join, now: DateTime<Utc>) -> JoinOutcome {
        let error = |code: i16| JoinOutcome::Error {
            code,
            member_id: join.member_id.clone(),
        };
        if !SESSION_TIMEOUT_MS.contains(&join.session_timeout_ms) {
            return error(INVALID_SESSION_TIMEOUT);
        }
        if join.protocols.is_empty()
            || join.protocol_type.is_empty()
            || !self.members.is_empty()
                && (self.head.protocol_type.as_deref() != Some(join.protocol_type.as_str())
                    || !self.supports_a_common_protocol(&join.protocols))
        {
            return error(INCONSISTENT_GROUP_PROTOCOL);
        }
        self.expire(now);
        let static_index = join.instance_id.as_deref().and_then(|instance| {
            self.members
                .iter()
                .position(|m| m.instance_id.as_deref() == Some(instance))
        });
        let index = match (join.member_id.is_empty(), static_index) {
            // A static member's new process: it takes the old one's place
            // under a new id (the old one is fenced from now on).
            (true, Some(i)) => {
                let was_leader = self.head.leader.as_deref() == Some(self.members[i].id.as_str());
                self.members[i].id = join.new_member_id.clone();
                if was_leader {
                    self.head.leader = Some(join.new_member_id.clone());
                }
                self.update(i, &join, now);
                // Its subscription may differ (a new process owns nothing
                // yet); what matters is that the chosen assignor stays.
                let unchanged = choose_protocol(&self.members) == self.head.protocol_name;
                // In CompletingRebalance the leader's assignment names the
                // old id: a rebalance, as Kafka does.
                if self.head.state == State::Stable && unchanged && !was_leader {
                    return JoinOutcome::Answer(self.joined(&join.new_member_id));
                }
                i
            }
            (true, None) if join.require_known_member_id && join.instance_id.is_none() => {
                // Pending: it counts once it joins with the id.
                self.add(&join, now, PENDING);
                return JoinOutcome::Error {
                    code: MEMBER_ID_REQUIRED,
                    member_id: join.new_member_id,
                };
            }
            (true, None) => self.add(&join, now, self.head.generation),
            (false, _) => match self.validate(&join.member_id, join.instance_id.as_deref()) {
                Err(code) => return error(code),
                Ok(i) => {
                    let unchanged = self.members[i].protocols == join.protocols;
                    let is_leader =
                        self.head.leader.as_deref() == Some(self.members[i].id.as_str());
                    let pending = self.members[i].pending();
                    self.update(i, &join, now);
                    match self.head.state {
                        // A pending member joining with its id is new.
                        _ if pending => i,
                        // It lost its answer: the same generation again.
                        State::CompletingRebalance if unchanged => {
                            return JoinOutcome::Answer(self.joined(&join.member_id))
                        }
                        State::Stable if unchanged && !is_leader => {
                            return JoinOutcome::Answer(self.joined(&join.member_id))
                        }
                        _ => i,
                    }
                }
            },
        };
        self.prepare_rebalance(now, join.rebalance_timeout_ms);
        let next = self.head.generation + 1;
        self.members[index].joined_generation = next;
        let member_id = self.members[index].id.clone();
        let instance_id = join.instance_id.clone();
        self.poll_join(&member_id, instance_id.as_deref(), next, now)
    }

    fn supports_a_common_protocol(&self, protocols: &[(String, Bytes)]) -> bool {
        protocols.iter().any(|(name, _)| {
            self.joined_members()
                .all(|m| m.protocols.iter().any(|(n, _)| n == name))
        })
    }

    fn add(&mut self, join: &Join, now: DateTime<Utc>, joined_generation: i32) -> usize {
        if self.members.is_empty() {
            self.head.protocol_type = Some(join.protocol_type.clone());
        }
        self.members.push(Member {
            id: join.new_member_id.clone(),
            instance_id: join.instance_id.clone(),
            client_id: join.client_id.clone(),
            host: join.host.clone(),
            session_timeout_ms: join.session_timeout_ms,
            rebalance_timeout_ms: join.rebalance_timeout_ms,
            protocols: join.protocols.clone(),
            joined_generation,
            assignment: None,
            heartbeat_at: now,
        });
        self.members.len() - 1
    }

    fn update(&mut self, i: usize, join: &Join, now: DateTime<Utc>) {
        let member = &mut self.members[i];
        member.client_id = join.client_id.clone();
        member.host = join.host.clone();
        member.session_timeout_ms = join.session_timeout_ms;
        member.rebalance_timeout_ms = join.rebalance_timeout_ms;
        member.protocols = join.protocols.clone();
        member.heartbeat_at = now;
    }

    /// A waiting join, again: answered once its generation is complete.
    pub(super) fn poll_join(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now: DateTime<Utc>,
    ) -> JoinOutcome {
        // Waiting is not a lost session.
        if let Some(i) = self.index(member_id) {
            self.members[i].heartbeat_at = now;
        }
        self.expire(now);
        self.try_complete(now);
        match self.index(member_id) {
            None => JoinOutcome::Error {
                code: self.gone(instance_id),
                member_id: member_id.to_string(),
            },
            // Its generation is complete: answered even if another
            // rebalance has begun since (its SyncGroup is then told so and
            // it joins again), so no waiter misses its generation.
            Some(_) if self.head.generation >= generation => {
                JoinOutcome::Answer(self.joined(member_id))
            }
            Some(_) => JoinOutcome::Wait {
                member_id: member_id.to_string(),
                generation,
            },
        }
    }
}

/// The assignor every member offers that most members prefer (each votes
/// for the first of its own list that all offer); ties go to the earlier
/// member's preference.
fn choose_protocol(members: &[Member]) -> Option<String> {
    let common = |name: &str| {
        members
            .iter()
            .all(|m| m.protocols.iter().any(|(n, _)| n == name))
    };
    let mut votes: Vec<(String, usize)> = Vec::new();
    for member in members {
        let Some((vote, _)) = member.protocols.iter().find(|(n, _)| common(n)) else {
            continue;
        };
        match votes.iter_mut().find(|(n, _)| n == vote) {
            Some((_, count)) => *count += 1,
            None => votes.push((vote.clone(), 1)),
        }
    }
    let most = votes.iter().map(|(_, count)| *count).max()?;
    votes
        .into_iter()
        .find(|(_, count)| *count == most)
        .map(|(name, _)| name)
}

mod generation;

#[cfg(test)]
mod tests;
