//! The assignment as a pure function: given the live members and who owns
//! which partition, what this member keeps, hands over and may claim.
//!
//! Cooperative and incremental (like Kafka's CooperativeSticky): a member
//! above its fair share `ceil(P / M)` hands over the extras; one below claims
//! free partitions (no owner, or a dead one) up to it; when nothing is free
//! and someone holds fewer than `floor(P / M)`, the fullest member (one at a
//! time) hands one over. Only partitions that must move are released.

use std::collections::BTreeMap;

use super::Assignment;

/// A partition of the group as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOwner {
    pub topic: String,
    pub partition: i32,
    /// The member that owns it, alive or not.
    pub owner: Option<String>,
    pub epoch: i64,
}

/// What one member should do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Partitions it owns and keeps.
    pub keep: Vec<Assignment>,
    /// Partitions it should hand over.
    pub release: Vec<Assignment>,
    /// Free partitions it may claim (compare-and-set on owner and epoch).
    pub claim: Vec<PartitionOwner>,
}

/// The plan for member `me`, given the live members and every partition.
pub fn plan(live: &[String], partitions: &[PartitionOwner], me: &str) -> Plan {
    let total = partitions.len();
    let members = live.len().max(1);
    let ceil = total.div_ceil(members);
    let floor = total / members;
    let mut held: BTreeMap<&str, usize> = live.iter().map(|m| (m.as_str(), 0)).collect();
    for p in partitions {
        if let Some(count) = p.owner.as_deref().and_then(|o| held.get_mut(o)) {
            *count += 1;
        }
    }
    let mine: Vec<Assignment> = partitions
        .iter()
        .filter(|p| p.owner.as_deref() == Some(me))
        .map(|p| Assignment {
            topic: p.topic.clone(),
            partition: p.partition,
            epoch: p.epoch,
        })
        .collect();
    let free: Vec<&PartitionOwner> = partitions
        .iter()
        .filter(|p| {
            p.owner
                .as_ref()
                .is_none_or(|o| !held.contains_key(o.as_str()))
        })
        .collect();

    if mine.len() > ceil {
        // Above the fair share (members joined): hand over the extras.
        return Plan {
            keep: mine[..ceil].to_vec(),
            release: mine[ceil..].to_vec(),
            claim: Vec::new(),
        };
    }
    let starving = held.values().any(|&n| n < floor);
    let fullest = held
        .iter()
        .max_by_key(|(m, n)| (**n, std::cmp::Reverse(**m)))
        .map(|(m, _)| *m);
    if free.is_empty() && starving && mine.len() > floor && fullest == Some(me) {
        // Someone holds fewer than floor(P/M) and nothing is free: the
        // fullest member (one at a time) hands one partition over.
        let (keep, give) = mine.split_at(mine.len() - 1);
        return Plan {
            keep: keep.to_vec(),
            release: give.to_vec(),
            claim: Vec::new(),
        };
    }
    let room = ceil.saturating_sub(mine.len());
    Plan {
        keep: mine,
        release: Vec::new(),
        claim: free.into_iter().take(room).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partitions(owners: &[Option<&str>]) -> Vec<PartitionOwner> {
        owners
            .iter()
            .enumerate()
            .map(|(i, o)| PartitionOwner {
                topic: "t".into(),
                partition: i as i32,
                owner: o.map(str::to_string),
                epoch: 1,
            })
            .collect()
    }

    fn live(members: &[&str]) -> Vec<String> {
        members.iter().map(|m| m.to_string()).collect()
    }

    fn numbers(assignments: &[Assignment]) -> Vec<i32> {
        assignments.iter().map(|a| a.partition).collect()
    }

    #[test]
    fn a_lone_member_claims_everything() {
        let plan = plan(&live(&["a"]), &partitions(&[None; 8]), "a");
        assert_eq!(plan.claim.len(), 8);
        assert!(plan.keep.is_empty() && plan.release.is_empty());
    }

    #[test]
    fn a_member_above_its_share_hands_over_only_the_extras() {
        let all_a = partitions(&[Some("a"); 8]);
        let plan = plan(&live(&["a", "b", "c"]), &all_a, "a");
        assert_eq!(numbers(&plan.keep), vec![0, 1, 2]);
        assert_eq!(numbers(&plan.release), vec![3, 4, 5, 6, 7]);
        assert!(plan.claim.is_empty());
    }

    #[test]
    fn a_dead_members_partitions_are_free_up_to_the_share() {
        let owners = partitions(&[Some("dead"), Some("dead"), Some("b"), Some("b"), None, None]);
        let plan = plan(&live(&["a", "b"]), &owners, "a");
        assert_eq!(
            plan.claim.iter().map(|p| p.partition).collect::<Vec<_>>(),
            vec![0, 1, 4]
        );
    }

    #[test]
    fn the_fullest_member_hands_one_over_to_a_starving_one() {
        // 7 partitions, 3 members: ceiling 3, floor 2. Nothing is free and
        // c holds 1: the fullest ("a" and "b" tie at 3; "a" first) gives one.
        let owners = partitions(&[
            Some("a"),
            Some("a"),
            Some("a"),
            Some("b"),
            Some("b"),
            Some("b"),
            Some("c"),
        ]);
        let members = live(&["a", "b", "c"]);
        let a = plan(&members, &owners, "a");
        assert_eq!(numbers(&a.keep), vec![0, 1]);
        assert_eq!(numbers(&a.release), vec![2]);
        let b = plan(&members, &owners, "b");
        assert!(b.release.is_empty(), "one hand-over at a time: {b:?}");
        let c = plan(&members, &owners, "c");
        assert!(c.claim.is_empty(), "nothing is free until a releases");
        // Once a released it, c claims it.
        let mut owners = owners;
        owners[2].owner = None;
        let c = plan(&members, &owners, "c");
        assert_eq!(
            c.claim.iter().map(|p| p.partition).collect::<Vec<_>>(),
            vec![2]
        );
    }

    #[test]
    fn at_the_floor_nobody_moves() {
        let owners = partitions(&[
            Some("a"),
            Some("a"),
            Some("a"),
            Some("b"),
            Some("b"),
            Some("c"),
            Some("c"),
            Some("c"),
        ]);
        for me in ["a", "b", "c"] {
            let plan = plan(&live(&["a", "b", "c"]), &owners, me);
            assert!(
                plan.release.is_empty() && plan.claim.is_empty(),
                "{me}: {plan:?}"
            );
        }
    }
}
