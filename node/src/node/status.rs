//! The status of a node's groups (role, term, leader, log indexes), here and on peers,
//! whole or a page at a time (`NodeRequest::StatusPage`).

use super::*;

impl Node {
    /// This node's view of the groups it hosts.
    pub async fn local_status(&self) -> NodeStatus {
        self.local_status_page(None, STATUS_PAGE_GROUPS_MAX).await
    }

    /// This node's view of the groups it hosts after `after`, at most `limit` (bounded by
    /// [`STATUS_PAGE_GROUPS_MAX`]), by group id.
    pub async fn local_status_page(&self, after: Option<GroupId>, limit: usize) -> NodeStatus {
        let mut ids = self.registry.groups();
        ids.sort_unstable();
        let mut groups = Vec::new();
        for g in ids
            .into_iter()
            .filter(|g| after.is_none_or(|a| *g > a))
            .take(limit.min(STATUS_PAGE_GROUPS_MAX))
        {
            if let Some(s) = self.registry.status(g).await {
                groups.push(s);
            }
        }
        NodeStatus {
            node_id: self.id,
            groups,
        }
    }

    /// Asks `peer` for its view of the groups it hosts after `after`, at most `limit` (or
    /// answers locally for this node).
    pub async fn peer_status_page(
        &self,
        peer: NodeId,
        after: Option<GroupId>,
        limit: usize,
    ) -> Result<NodeStatus, String> {
        if peer == self.id {
            return Ok(self.local_status_page(after, limit).await);
        }
        let addr = self
            .peer(peer)
            .ok_or_else(|| format!("unknown node {peer}"))?
            .cluster_addr;
        let limit = limit.min(STATUS_PAGE_GROUPS_MAX) as u32;
        match self
            .call(
                addr,
                &NodeRequest::StatusPage { after, limit },
                Duration::from_millis(STATUS_CALL_TIMEOUT_MS),
            )
            .await
        {
            Ok(NodeReply::Status(s)) => Ok(s),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// `peer`'s view of `group` alone (`None` if it does not host it).
    pub async fn peer_group_status(
        &self,
        peer: NodeId,
        group: GroupId,
    ) -> Result<Option<GroupStatus>, String> {
        let s = self.peer_status_page(peer, group.checked_sub(1), 1).await?;
        Ok(s.groups.into_iter().find(|g| g.group == group))
    }

    /// Asks `peer` for its status over QUIC (or answers locally for this node).
    pub async fn peer_status(&self, peer: NodeId) -> Result<NodeStatus, String> {
        self.peer_status_page(peer, None, STATUS_PAGE_GROUPS_MAX)
            .await
    }
}
