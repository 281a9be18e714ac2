//! What a member does within a generation: SyncGroup (the leader's
//! assignments to each member), Heartbeat, LeaveGroup, and whether it may
//! commit offsets. Each checks first that the member is who it says, of
//! the current generation.

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::{
    Group, State, SyncOutcome, ILLEGAL_GENERATION, INCONSISTENT_GROUP_PROTOCOL,
    REBALANCE_IN_PROGRESS, UNKNOWN_MEMBER_ID,
};
use crate::kafka_api::NONE;

impl Group {
    /// The checks every request of a member makes: it is the member it
    /// says, of this generation; then its session is renewed.
    fn member_of_generation(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now: DateTime<Utc>,
    ) -> Result<usize, i16> {
        self.expire(now);
        let i = self.validate(member_id, instance_id)?;
        if generation != self.head.generation {
            return Err(ILLEGAL_GENERATION);
        }
        self.members[i].heartbeat_at = now;
        Ok(i)
    }

    pub(in crate::kafka_api) fn sync(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        protocol: (Option<&str>, Option<&str>),
        assignments: Vec<(String, Bytes)>,
        now: DateTime<Utc>,
    ) -> SyncOutcome {
        let i = match self.member_of_generation(member_id, instance_id, generation, now) {
            Ok(i) => i,
            Err(code) => return SyncOutcome::Error(code),
        };
        let (protocol_type, protocol_name) = protocol;
        if protocol_type.is_some_and(|t| self.head.protocol_type.as_deref() != Some(t))
            || protocol_name.is_some_and(|n| self.head.protocol_name.as_deref() != Some(n))
        {
            return SyncOutcome::Error(INCONSISTENT_GROUP_PROTOCOL);
        }
        if self.head.state == State::CompletingRebalance
            && self.head.leader.as_deref() == Some(member_id)
        {
            for member in self.members.iter_mut().filter(|m| !m.pending()) {
                member.assignment = Some(
                    assignments
                        .iter()
                        .find(|(id, _)| *id == member.id)
                        .map(|(_, a)| a.clone())
                        .unwrap_or_default(),
                );
            }
            self.head.state = State::Stable;
            return SyncOutcome::Answer(self.members[i].assignment.clone().unwrap_or_default());
        }
        self.poll_sync(member_id, instance_id, generation, now)
    }

    /// A follower's waiting sync, again.
    pub(in crate::kafka_api) fn poll_sync(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now: DateTime<Utc>,
    ) -> SyncOutcome {
        if let Some(i) = self.index(member_id) {
            self.members[i].heartbeat_at = now;
        }
        self.expire(now);
        let Some(i) = self.index(member_id) else {
            return SyncOutcome::Error(self.gone(instance_id));
        };
        if self.head.generation != generation || self.head.state == State::PreparingRebalance {
            return SyncOutcome::Error(REBALANCE_IN_PROGRESS);
        }
        match self.head.state {
            State::Stable => {
                SyncOutcome::Answer(self.members[i].assignment.clone().unwrap_or_default())
            }
            _ => SyncOutcome::Wait,
        }
    }

    pub(in crate::kafka_api) fn heartbeat(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now: DateTime<Utc>,
    ) -> i16 {
        match self.member_of_generation(member_id, instance_id, generation, now) {
            Err(code) => code,
            Ok(_) if self.head.state == State::PreparingRebalance => REBALANCE_IN_PROGRESS,
            Ok(_) => NONE,
        }
    }

    /// Members leave (v3+ may name a static member by its instance id
    /// alone); the error code of each.
    pub(in crate::kafka_api) fn leave(
        &mut self,
        leaving: &[(String, Option<String>)],
        now: DateTime<Utc>,
    ) -> Vec<i16> {
        let codes = leaving
            .iter()
            .map(|(member_id, instance_id)| {
                let found = match (member_id.is_empty(), instance_id) {
                    (true, Some(instance)) => self
                        .members
                        .iter()
                        .position(|m| m.instance_id.as_ref() == Some(instance))
                        .ok_or(UNKNOWN_MEMBER_ID),
                    _ => self.validate(member_id, instance_id.as_deref()),
                };
                match found {
                    Ok(i) => {
                        self.members.remove(i);
                        NONE
                    }
                    Err(code) => code,
                }
            })
            .collect::<Vec<_>>();
        if codes.contains(&NONE) {
            self.after_removal(now);
        }
        codes
    }

    /// Whether a member may commit offsets: a member of this generation,
    /// not while the leader's assignment is awaited; a commit outside any
    /// generation (`-1`, no member: a consumer that assigns itself) only
    /// to a group without members.
    pub(in crate::kafka_api) fn may_commit(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now: DateTime<Utc>,
    ) -> i16 {
        self.expire(now);
        if generation < 0 && member_id.is_empty() && instance_id.is_none() {
            return if self.joined_members().next().is_none() {
                NONE
            } else {
                UNKNOWN_MEMBER_ID
            };
        }
        match self.member_of_generation(member_id, instance_id, generation, now) {
            Err(code) => code,
            Ok(_) if self.head.state == State::CompletingRebalance => REBALANCE_IN_PROGRESS,
            Ok(_) => NONE,
        }
    }
}
