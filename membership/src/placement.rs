//! Placement: which nodes replicate each partition, and which should lead it.

use chatd_raftlog::{GroupId, NodeId};
use serde::{Deserialize, Serialize};

/// Upper bound on partitions in a cluster (idle partitions cost ~46 KiB and no timer per
/// replica; BENCHMARKS.md measures 10,000). Equal to `chatd_config::PARTITIONS_MAX`.
pub const PARTITIONS_MAX: u32 = 16_384;

/// One partition's replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionAssignment {
    /// The partition's Raft group (1..=P).
    pub group: GroupId,
    /// Replica nodes; the first is the preferred leader.
    pub replicas: Vec<NodeId>,
}

/// The partition table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionTable {
    /// Number of partitions P.
    pub partitions: u32,
    /// Replicas per partition R.
    pub replication: u32,
    /// One assignment per partition, in group order.
    pub assignments: Vec<PartitionAssignment>,
}

impl PartitionTable {
    /// The assignment of `group`.
    pub fn get(&self, group: GroupId) -> Option<&PartitionAssignment> {
        let i = usize::try_from(group.checked_sub(1)?).ok()?;
        self.assignments.get(i)
    }

    /// Groups that `node` replicates.
    pub fn groups_of(&self, node: NodeId) -> Vec<GroupId> {
        self.assignments
            .iter()
            .filter(|a| a.replicas.contains(&node))
            .map(|a| a.group)
            .collect()
    }
}

/// Why a placement cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    /// No nodes were given.
    #[error("cannot place partitions on an empty cluster")]
    NoNodes,
    /// P is 0 or above the bound.
    #[error("partitions must be between 1 and {PARTITIONS_MAX}, got {0}")]
    Partitions(u32),
    /// R is 0 or above the node count.
    #[error("replication factor must be between 1 and the node count {nodes}, got {replication}")]
    Replication { replication: u32, nodes: usize },
}

/// Places `partitions` partitions with `replication` replicas each on `nodes`.
///
/// Partition p (0-based) goes to the R nodes after position p in the sorted node list, so
/// each node holds about P·R/N replicas and is preferred leader of about P/N partitions.
pub fn place(
    nodes: &[NodeId],
    partitions: u32,
    replication: u32,
) -> Result<PartitionTable, PlacementError> {
    if nodes.is_empty() {
        return Err(PlacementError::NoNodes);
    }
    if partitions == 0 || partitions > PARTITIONS_MAX {
        return Err(PlacementError::Partitions(partitions));
    }
    if replication == 0 || replication as usize > nodes.len() {
        return Err(PlacementError::Replication {
            replication,
            nodes: nodes.len(),
        });
    }
    let mut sorted = nodes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let n = sorted.len();
    let assignments = (0..partitions as usize)
        .map(|p| PartitionAssignment {
            group: p as GroupId + 1,
            replicas: (0..replication as usize)
                .map(|k| sorted[(p + k) % n])
                .collect(),
        })
        .collect();
    Ok(PartitionTable {
        partitions,
        replication,
        assignments,
    })
}

/// The default replication factor for `nodes` nodes: min(3, nodes).
pub fn default_replication(nodes: usize) -> u32 {
    nodes.min(3) as u32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replicas_and_leaders_are_spread_evenly() {
        let t = place(&[3, 1, 2], 64, 3).unwrap();
        assert_eq!(t.assignments.len(), 64);
        for node in 1..=3 {
            assert_eq!(
                t.groups_of(node).len(),
                64,
                "every node replicates all at R=N"
            );
            let leads = t
                .assignments
                .iter()
                .filter(|a| a.replicas[0] == node)
                .count();
            assert!((21..=22).contains(&leads), "node {node} leads {leads}");
        }
        let t5 = place(&[1, 2, 3, 4, 5], 64, 3).unwrap();
        for node in 1..=5 {
            let n = t5.groups_of(node).len();
            assert!((38..=39).contains(&n), "node {node} holds {n}");
        }
        assert_eq!(t.get(1).unwrap().replicas, vec![1, 2, 3]);
        assert_eq!(t.get(2).unwrap().replicas, vec![2, 3, 1]);
        assert!(t.get(0).is_none() && t.get(65).is_none());
    }

    #[test]
    fn bad_placements_are_refused() {
        assert_eq!(place(&[], 8, 1), Err(PlacementError::NoNodes));
        assert_eq!(place(&[1], 0, 1), Err(PlacementError::Partitions(0)));
        assert_eq!(
            place(&[1], PARTITIONS_MAX + 1, 1),
            Err(PlacementError::Partitions(PARTITIONS_MAX + 1))
        );
        assert!(matches!(
            place(&[1, 2], 8, 3),
            Err(PlacementError::Replication { .. })
        ));
        assert_eq!(default_replication(1), 1);
        assert_eq!(default_replication(5), 3);
    }
}
