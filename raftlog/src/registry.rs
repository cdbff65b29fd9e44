//! The Raft groups a node hosts, and the entry point for their incoming RPCs.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use chatd_storage::Storage;
use chatd_transport::Endpoint;
use openraft::BasicNode;
use serde::{Deserialize, Serialize};

use crate::batcher::{Committed, Proposal, ProposeError, PROPOSAL_QUEUE_MAX};
use crate::network::{NetworkFactory, RaftEnvelope, RaftReply, RaftRequest};
use crate::{Applier, GroupId, LogStore, NodeId, Raft, RaftOptions, RaftlogError, StateMachine};

/// A group's replication state as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// The group.
    pub group: GroupId,
    /// This node's role: Leader, Follower, Candidate or Learner.
    pub role: String,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Index of the last entry in this node's log.
    pub last_index: u64,
    /// Index of the last entry known committed.
    pub committed_index: u64,
    /// Index of the last entry applied to the state machine.
    pub applied_index: u64,
    /// Index up to which the log was purged after a snapshot.
    pub purged_index: Option<u64>,
    /// Index covered by the latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Voters of the group.
    pub voters: Vec<NodeId>,
}

/// The groups hosted by one node.
pub struct Registry {
    node_id: NodeId,
    store: Storage,
    endpoint: Endpoint,
    snapshot_root: PathBuf,
    config: Arc<openraft::Config>,
    groups: RwLock<HashMap<GroupId, Hosted>>,
}

#[derive(Clone)]
struct Hosted {
    raft: Raft,
    proposals: tokio::sync::mpsc::Sender<Proposal>,
}

impl Registry {
    /// A registry for node `node_id`, its store, and its QUIC endpoint.
    pub fn new(
        node_id: NodeId,
        store: Storage,
        endpoint: Endpoint,
        snapshot_root: PathBuf,
        options: &RaftOptions,
        cluster_name: &str,
    ) -> Result<Arc<Self>, RaftlogError> {
        std::fs::create_dir_all(&snapshot_root).map_err(|e| RaftlogError::SnapshotDir {
            path: snapshot_root.display().to_string(),
            cause: e.to_string(),
        })?;
        Ok(Arc::new(Self {
            node_id,
            store,
            endpoint,
            snapshot_root,
            config: Arc::new(options.to_config(cluster_name)?),
            groups: RwLock::new(HashMap::new()),
        }))
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The node's store.
    pub fn store(&self) -> &Storage {
        &self.store
    }

    /// Starts `group` on this node (its log and state machine are recovered from the store),
    /// or returns it if already started.
    pub async fn open_group(
        &self,
        group: GroupId,
        applier: Arc<dyn Applier>,
    ) -> Result<Raft, RaftlogError> {
        if let Some(raft) = self.get(group) {
            return Ok(raft);
        }
        let start = |cause: String| RaftlogError::Start { group, cause };
        let log = LogStore::new(group, self.store.clone());
        let sm = StateMachine::open(group, self.store.clone(), applier, &self.snapshot_root)
            .map_err(|e| start(e.to_string()))?;
        let network = NetworkFactory::new(group, self.endpoint.clone());
        let raft = Raft::new(self.node_id, self.config.clone(), network, log, sm)
            .await
            .map_err(|e| start(e.to_string()))?;
        let mut groups = match self.groups.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let hosted = groups.entry(group).or_insert_with(|| Hosted {
            proposals: crate::batcher::start(group, raft.clone()),
            raft,
        });
        Ok(hosted.raft.clone())
    }

    /// Proposes `command` to `group` if this node leads it, batched with the proposals made
    /// at the same time; returns once the entry is committed on a majority and applied.
    pub async fn propose(
        &self,
        group: GroupId,
        command: Vec<u8>,
    ) -> Result<Committed, ProposeError> {
        let hosted = {
            let groups = match self.groups.read() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            groups.get(&group).cloned()
        };
        let Some(hosted) = hosted else {
            return Err(ProposeError::NotHosted(group));
        };
        // Refuse at once when another node leads: no need to queue behind a batch.
        let leader = hosted.raft.metrics().borrow().current_leader;
        if leader != Some(self.node_id) {
            return Err(ProposeError::NotLeader { leader });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        hosted
            .proposals
            .try_send(Proposal { command, reply })
            .map_err(|e| match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => ProposeError::Overloaded {
                    group,
                    max: PROPOSAL_QUEUE_MAX,
                },
                tokio::sync::mpsc::error::TrySendError::Closed(_) => {
                    ProposeError::Raft(format!("group {group} stopped"))
                }
            })?;
        answer
            .await
            .map_err(|_| ProposeError::Raft(format!("group {group} stopped")))?
    }

    /// Initializes `group` with `members` as voters if it has never been initialized.
    pub async fn initialize(
        &self,
        group: GroupId,
        members: BTreeMap<NodeId, BasicNode>,
    ) -> Result<(), RaftlogError> {
        let raft = self.get(group).ok_or_else(|| RaftlogError::Start {
            group,
            cause: "group not opened".into(),
        })?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| RaftlogError::Start {
                group,
                cause: e.to_string(),
            })?;
        if initialized {
            return Ok(());
        }
        match raft.initialize(members).await {
            Ok(()) => Ok(()),
            // Another replica got there first: the group exists, which is all we wanted.
            Err(openraft::error::RaftError::APIError(
                openraft::error::InitializeError::NotAllowed(_),
            )) => Ok(()),
            Err(e) => Err(RaftlogError::Start {
                group,
                cause: e.to_string(),
            }),
        }
    }

    /// The group's handle, if this node hosts it.
    pub fn get(&self, group: GroupId) -> Option<Raft> {
        let groups = match self.groups.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        groups.get(&group).map(|h| h.raft.clone())
    }

    /// Ids of the hosted groups, sorted.
    pub fn groups(&self) -> Vec<GroupId> {
        let groups = match self.groups.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut ids: Vec<_> = groups.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Status of one hosted group.
    pub async fn status(&self, group: GroupId) -> Option<GroupStatus> {
        let raft = self.get(group)?;
        let m = raft.metrics().borrow().clone();
        let committed = raft
            .with_raft_state(|st| st.committed.map(|l| l.index).unwrap_or(0))
            .await
            .unwrap_or(0);
        Some(GroupStatus {
            group,
            role: format!("{:?}", m.state),
            leader: m.current_leader,
            term: m.current_term,
            last_index: m.last_log_index.unwrap_or(0),
            committed_index: committed,
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            voters: m.membership_config.membership().voter_ids().collect(),
        })
    }

    /// Handles an incoming Raft RPC frame (without its service tag) and encodes the reply.
    pub async fn handle(&self, frame: &[u8]) -> Bytes {
        let reply = match chatd_codec::decode::<RaftEnvelope>(frame) {
            Err(e) => RaftReply::Malformed(e.to_string()),
            Ok(env) => match self.get(env.group) {
                None => RaftReply::UnknownGroup(env.group),
                Some(raft) => match env.request {
                    RaftRequest::Append(r) => RaftReply::Append(raft.append_entries(r).await),
                    RaftRequest::Vote(r) => RaftReply::Vote(raft.vote(r).await),
                    RaftRequest::Snapshot(r) => RaftReply::Snapshot(raft.install_snapshot(r).await),
                },
            },
        };
        match chatd_codec::encode(&reply) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a raft reply");
                Bytes::new()
            }
        }
    }

    /// Stops every group (their logs stay on disk).
    pub async fn shutdown(&self) {
        let all: Vec<Raft> = {
            let groups = match self.groups.read() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            groups.values().map(|h| h.raft.clone()).collect()
        };
        for raft in all {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(error = %e, "raft group shutdown");
            }
        }
    }
}
