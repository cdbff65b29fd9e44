//! Which node leads each partition, as last learned.

use std::collections::HashMap;

use chatd_raftlog::{GroupId, NodeId};
use parking_lot::RwLock;

/// Partition → leader, refreshed from "not leader" answers and local Raft metrics.
#[derive(Default)]
pub struct RoutingTable {
    leaders: RwLock<HashMap<GroupId, NodeId>>,
}

impl RoutingTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last known leader of `group`.
    pub fn leader(&self, group: GroupId) -> Option<NodeId> {
        self.leaders.read().get(&group).copied()
    }

    /// Records a leader hint; `None` forgets the group's leader.
    pub fn update(&self, group: GroupId, leader: Option<NodeId>) {
        let mut g = self.leaders.write();
        match leader {
            Some(l) => g.insert(group, l),
            None => g.remove(&group),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_replace_and_clear_leaders() {
        let t = RoutingTable::new();
        assert_eq!(t.leader(3), None);
        t.update(3, Some(2));
        assert_eq!(t.leader(3), Some(2));
        t.update(3, Some(1));
        assert_eq!(t.leader(3), Some(1));
        t.update(3, None);
        assert_eq!(t.leader(3), None);
    }
}
