//! A running chatd node: storage, QUIC, the Raft groups it hosts, and proposal routing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatd_membership::{
    place, ClusterMeta, MetaApplier, MetaCommand, NodeInfo, PartitionTable, RoutingTable,
    META_GROUP,
};
use chatd_raftlog::{
    GroupId, GroupStatus, NodeId, ProposeError as RaftProposeError, RaftReply, Registry,
    RAFT_BATCH_SERVICE_TAG, RAFT_SERVICE_TAG,
};
use chatd_storage::{NodeIdentity, Storage};
use chatd_transport::{Endpoint, PeerInfo, TlsIdentity, TransportError, TransportLimits};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::config::{Config, Peer, SectionOptions};
use crate::queries::{ChatQuery, ChatQueryReply};

mod outbox;
mod routing;
mod status;
mod transfer;

/// First byte of node-to-node requests that are not Raft RPCs.
pub const NODE_SERVICE_TAG: u8 = 0x02;
/// Upper bound on routing attempts of one proposal.
pub const PROPOSE_ATTEMPTS_MAX: u32 = 20;
/// A QUIC connection silent for this long is dead (keep-alives go at a third of it).
/// 1 s: a dead peer's in-flight calls fail within it even where no local replica sees the
/// new term (see `Node::unless_leader_changes`).
const CLUSTER_IDLE_TIMEOUT_MS: u64 = 1_000;
/// Longest dial (QUIC + TLS handshake) to a peer: a few round trips inside a cluster. A
/// dial to a node that is down or paused gives up within it, and the next one (Raft retries
/// after `UNREACHABLE_BACKOFF_MS`) reaches the node soon after it is back: with the
/// transport's 2 s default, a restarted follower waited that long for its leader's first
/// heartbeat, its start-up election hold lapsed, and its campaign unseated the leader.
const CLUSTER_CONNECT_TIMEOUT_MS: u64 = 500;
/// How long an unknown user or token waits for this node's group 0 replica to catch up.
const USER_CATCH_UP_MS: u64 = 1_000;
const USER_CATCH_UP_POLL_MS: u64 = 20;
/// Timeout of a status call to a peer.
const STATUS_CALL_TIMEOUT_MS: u64 = 1_000;

/// Node-to-node requests.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NodeRequest {
    /// Propose `command` to `group`, here only (the receiver does not forward).
    Propose {
        group: GroupId,
        #[serde(with = "serde_bytes")]
        command: Vec<u8>,
    },
    /// The receiver's view of its groups.
    Status,
    /// A read of `group`'s chat state, on its leader.
    Query { group: GroupId, query: ChatQuery },
    /// Chat events applied by a partition leader, for the receiver's local sessions.
    Deliver { events: Vec<chatd_chat::ChatEvent> },
    /// Ephemeral frames (typing, presence) for the receiver's local sessions.
    Ephemeral {
        items: Vec<crate::gateway::Ephemeral>,
    },
    /// The receiver's local presence of `users`.
    Presence { users: Vec<String> },
    /// The receiver campaigns for leadership of `group` (a leadership transfer).
    Elect { group: GroupId },
    /// The receiver's replica of `group` does not campaign on its own timeouts for `ms`
    /// (bounded by [`chatd_raftlog::ELECTION_HOLD_MS_MAX`]; 0 lifts an earlier hold):
    /// leadership is moving to another replica.
    HoldElections { group: GroupId, ms: u64 },
    /// A node asks to join the cluster (any member serves it): group 0 records it and
    /// adds it as a learner. Answers `Proposed` (admitted) or `Refused`.
    Join { info: chatd_membership::NodeInfo },
    /// On `group`'s leader: adds `node`, reached at `addr`, as a learner. Answers
    /// `Proposed` with the index of the membership entry.
    AddLearner {
        group: GroupId,
        node: NodeId,
        addr: String,
    },
    /// On `group`'s leader: makes `voters` the group's voters once the new ones caught up
    /// (waiting at most `catch_up_ms`). Answers `Proposed` with the membership entry's index.
    ChangeVoters {
        group: GroupId,
        voters: Vec<NodeId>,
        /// Learners to remove from the group entirely (not voters in `voters`).
        drop: Vec<NodeId>,
        catch_up_ms: u64,
    },
    /// On `group`'s leader: hands the leadership to `to` (a transfer coordinated elsewhere,
    /// e.g. by the rebalancer on group 0's leader): only the leader can stop taking
    /// proposals until `to` holds its whole log, so `to` wins its campaign. Answers
    /// `Proposed` (index 0, response: the new leader's id, 8 bytes little-endian),
    /// `NotLeader`, or `Failed`.
    TransferLeadership { group: GroupId, to: NodeId },
    /// The receiver's view of the groups it hosts after `after` (all when `None`), at most
    /// `limit` of them (bounded by [`STATUS_PAGE_GROUPS_MAX`]), by group id. Answers
    /// `Status`.
    StatusPage { after: Option<GroupId>, limit: u32 },
    /// Stores chunk `index` of `file` on the receiver, a replica of `file`'s home partition
    /// `group`, with an fdatasync before the answer (`Delivered`). See `files.rs`.
    PutChunk {
        group: GroupId,
        file: String,
        index: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The receiver's copy of chunk `index` of `file` in `group`: answers `Chunk`.
    GetChunk {
        group: GroupId,
        file: String,
        index: u32,
    },
    /// The receiver (a new replica of `group`) fetches, now, the chunks it lacks of the
    /// group's files as it has applied them, at most `REPAIR_CHUNKS_PER_CALL_MAX`; answers
    /// `FilesMissing` with how many it still lacks. A move waits for 0 before the replica
    /// that leaves stops being a voter (files/repair.rs).
    RepairFiles { group: GroupId },
}

/// Groups one status page lists at most: every group of the largest cluster allowed
/// (`cluster.partitions` ≤ 4,096, plus group 0).
pub const STATUS_PAGE_GROUPS_MAX: usize = 4_097;

/// Answers to [`NodeRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum NodeReply {
    /// Committed and applied at `index`, with the state machine's answer.
    Proposed {
        index: u64,
        #[serde(with = "serde_bytes")]
        response: Vec<u8>,
    },
    /// The receiver is not the leader; `leader` is its hint.
    NotLeader { leader: Option<NodeId> },
    /// The receiver's status.
    Status(NodeStatus),
    /// The answer to a query.
    QueryResult(ChatQueryReply),
    /// Delivered to local sessions.
    Delivered,
    /// Local presence: (user, online, last seen ms).
    Presence(Vec<(String, bool, Option<u64>)>),
    /// The receiver's queue for the group is full; nothing was appended.
    Overloaded(String),
    /// The request failed; the outcome of a proposal is unknown.
    Failed(String),
    /// Refused for good, with the reason (e.g. a join with a tombstoned id): retrying
    /// changes nothing.
    Refused(String),
    /// A chunk as the receiver stores it (`None`: it has none).
    Chunk(Option<serde_bytes::ByteBuf>),
    /// The answer to `RepairFiles`: chunks the receiver still lacks.
    FilesMissing(u64),
}

/// One node's view of its groups.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub node_id: NodeId,
    /// Every group it hosts.
    pub groups: Vec<GroupStatus>,
}

/// A committed proposal.
#[derive(Clone, Debug)]
pub struct Proposed {
    /// Raft log index of the entry.
    pub index: u64,
    /// The state machine's answer.
    pub response: Vec<u8>,
    /// The leader that committed it.
    pub leader: NodeId,
}

/// Why a proposal has no result.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// The group does not exist in this cluster.
    #[error("partition {0} does not exist")]
    UnknownGroup(GroupId),
    /// No leader accepted it within the time or attempt bound; it was not committed.
    #[error("no leader for partition {group} after {attempts} attempts")]
    NoLeader { group: GroupId, attempts: u32 },
    /// The leader's proposal queue is full; nothing was appended.
    #[error("partition {group} is overloaded: {cause}")]
    Overloaded { group: GroupId, cause: String },
    /// The request may or may not have been committed (a leader failed mid-request).
    #[error("outcome unknown for partition {group}: {cause}")]
    Unknown { group: GroupId, cause: String },
    /// This node reaches no majority of the partition's replicas and knows no leader: it
    /// cannot serve the partition now (a client should try another node). Nothing was sent.
    #[error(
        "this node reaches no majority of partition {group}'s replicas (unreachable: \
         {unreachable:?}): try another node"
    )]
    CutOff {
        group: GroupId,
        unreachable: Vec<NodeId>,
    },
}

/// The QUIC handler: routes on the first byte to Raft or node services.
#[derive(Default)]
struct QuicHandler {
    registry: OnceLock<Arc<Registry>>,
    node: OnceLock<Weak<Node>>,
}

impl QuicHandler {
    fn serve(self: &Arc<Self>, _peer: PeerInfo, request: Bytes) -> BoxFuture<'static, Bytes> {
        let this = self.clone();
        Box::pin(async move {
            match request.first() {
                Some(&RAFT_SERVICE_TAG | &RAFT_BATCH_SERVICE_TAG) => match this.registry.get() {
                    Some(r) => r.handle_frame(&request).await.unwrap_or_default(),
                    None => encode_or_empty(&RaftReply::UnknownGroup(0)),
                },
                Some(&NODE_SERVICE_TAG) => {
                    let node = this.node.get().and_then(Weak::upgrade);
                    let reply = match (node, chatd_codec::decode::<NodeRequest>(&request[1..])) {
                        (None, _) => NodeReply::Failed("node is starting".into()),
                        (_, Err(e)) => NodeReply::Failed(format!("malformed request: {e}")),
                        (Some(node), Ok(req)) => node.serve(req).await,
                    };
                    encode_or_empty(&reply)
                }
                _ => {
                    tracing::warn!("QUIC request with an unknown service tag; ignored");
                    Bytes::new()
                }
            }
        })
    }
}

/// [`QuicHandler`] as the transport's handler: calls, and liveness datagrams (heard on the
/// connection's reader, without a task; acknowledged by QUIC, not answered).
struct QuicService(Arc<QuicHandler>);

impl chatd_transport::Handler for QuicService {
    fn handle(&self, peer: PeerInfo, request: Bytes) -> BoxFuture<'static, Bytes> {
        self.0.serve(peer, request)
    }

    fn datagram(&self, _peer: &PeerInfo, datagram: Bytes) -> Option<Bytes> {
        self.0.registry.get()?.handle_datagram(&datagram)
    }
}

fn encode_or_empty<T: Serialize>(v: &T) -> Bytes {
    match chatd_codec::encode(v) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply");
            Bytes::new()
        }
    }
}

/// A running node.
pub struct Node {
    /// Its configuration.
    pub config: Config,
    /// Its id.
    pub id: NodeId,
    /// Its database.
    pub store: Storage,
    /// Its QUIC endpoint.
    pub endpoint: Endpoint,
    /// The Raft groups it hosts.
    pub registry: Arc<Registry>,
    /// Group 0's state.
    pub meta: Arc<MetaApplier>,
    /// The applier of every chat partition this node hosts (groups opened later, when
    /// placement moves a replica here, get the same one).
    chat_applier: Arc<dyn chatd_raftlog::Applier>,
    /// The placement this node bootstraps group 0 with, computed from its config's peer
    /// list (`None` on a node that joined a running cluster or restarted as a member).
    bootstrap_table: Option<PartitionTable>,
    /// Partition → leader hints.
    pub routing: RoutingTable,
    /// Client sessions on this node.
    pub gateway: crate::gateway::Gateway,
    /// The cluster's live nodes: group 0's membership once known, the config's peer list
    /// (seeds) before.
    peers: parking_lot::RwLock<Arc<BTreeMap<NodeId, Peer>>>,
    propose_timeout: Duration,
    /// Set once a graceful drain starts: no new sessions, `/readyz` answers 503.
    draining: std::sync::atomic::AtomicBool,
    /// Per peer: the queue of [`Node::broadcast`] requests its sender task drains.
    outboxes: std::sync::Mutex<HashMap<NodeId, tokio::sync::mpsc::Sender<outbox::Outgoing>>>,
    /// This node, for tasks it spawns.
    me: std::sync::OnceLock<Weak<Node>>,
    /// Moves replicas while this node leads group 0.
    pub rebalancer: crate::rebalance::Rebalancer,
    /// Set once group 0 says this node was removed: it drains and exits.
    retired: tokio::sync::watch::Sender<bool>,
    /// File upload requests this node is serving.
    pub uploads: crate::files::upload::Uploads,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory cannot be used.
    #[error(transparent)]
    Storage(#[from] chatd_storage::StorageError),
    /// TLS files or the QUIC endpoint.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Raft groups.
    #[error(transparent)]
    Raft(#[from] chatd_raftlog::RaftlogError),
    /// Placement.
    #[error(transparent)]
    Placement(#[from] chatd_membership::PlacementError),
    /// Group 0's stored state.
    #[error(transparent)]
    Membership(#[from] chatd_membership::MembershipError),
    /// The webhook of `[notify]` (its URL or its CA file).
    #[error("{0}")]
    Webhook(String),
    /// Joining the cluster failed.
    #[error(transparent)]
    Join(#[from] crate::members::JoinError),
    /// This node was removed from the cluster; its id never serves again.
    #[error(
        "node {0} was removed from the cluster (its id is tombstoned in group 0): it cannot \
         serve again; give a new machine a new id with `chatd cluster add-node`"
    )]
    Removed(NodeId),
}

impl Node {
    /// Opens the node's data, binds QUIC, and starts (or recovers) every group it hosts.
    pub async fn start(config: Config) -> Result<Arc<Self>, StartError> {
        let id = config.node_id;
        let identity = NodeIdentity {
            cluster_id: config.cluster_id.clone(),
            node_id: id,
        };
        let tls = TlsIdentity::load(&config.tls.ca_cert, &config.tls.cert, &config.tls.key)?;
        let webhook =
            crate::notify::Webhook::from_config(&config.notify).map_err(StartError::Webhook)?;
        let store = Storage::open(
            &config.data_dir.join("db"),
            &identity,
            &config.storage.options(),
        )?;
        let me = config.me().cloned().ok_or_else(|| {
            chatd_raftlog::RaftlogError::Config(format!("node {id} is not in the peer list"))
        })?;
        let handler = Arc::new(QuicHandler::default());
        let h = handler.clone();
        let endpoint = Endpoint::bind(
            me.cluster_addr,
            &tls,
            TransportLimits {
                // A dead peer is noticed within this bound, not after the default 10 s.
                idle_timeout_ms: CLUSTER_IDLE_TIMEOUT_MS,
                connect_timeout_ms: CLUSTER_CONNECT_TIMEOUT_MS,
                ..TransportLimits::default()
            },
            Arc::new(QuicService(h)),
        )?;
        let registry = Registry::new(
            id,
            store.clone(),
            endpoint.clone(),
            config.data_dir.join("snapshots"),
            &config.raft.options(),
            &config.cluster_id,
        )?;
        let _ = handler.registry.set(registry.clone());

        let meta = MetaApplier::new();
        meta.load(&store)?;
        let membership = meta.membership();
        if membership
            .as_ref()
            .is_some_and(|m| m.state_of(id) == Some(chatd_membership::NodeState::Removed))
        {
            return Err(StartError::Removed(id));
        }
        let seeds: BTreeMap<NodeId, Peer> =
            config.peers.iter().map(|p| (p.id, p.clone())).collect();
        // A member (restarted) follows group 0; a joining node hosts only group 0 until
        // placement gives it more; a founding node bootstraps from its config.
        let (peers, bootstrap_table) = match &membership {
            Some(m) => (peers_of(m), None),
            None if config.cluster.join => (seeds.clone(), None),
            None => {
                let ids: Vec<NodeId> = seeds.keys().copied().collect();
                let table = place(&ids, config.cluster.partitions, config.replication())?;
                (seeds.clone(), Some(table))
            }
        };
        registry.open_group(META_GROUP, meta.clone()).await?;
        let all_voters: BTreeMap<NodeId, String> = peers
            .values()
            .map(|p| (p.id, p.cluster_addr.to_string()))
            .collect();
        let mut inits = Vec::new();
        if bootstrap_table.is_some() {
            inits.push((META_GROUP, all_voters, peers.keys().next() == Some(&id)));
        }
        let (events_tx, events_rx) =
            tokio::sync::mpsc::channel(crate::gateway::DELIVERY_QUEUE_BATCHES_MAX);
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let dropped_in_apply = dropped.clone();
        // On the apply path: never block; a full queue drops the batch (clients sync).
        let applier = Arc::new(chatd_chat::ChatApplier::new(move |group, events| {
            if events_tx.try_send((group, events)).is_err() {
                dropped_in_apply.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
        if let Some(table) = &bootstrap_table {
            for group in table.groups_of(id) {
                registry.open_group(group, applier.clone()).await?;
                let Some(a) = table.get(group) else { continue };
                let voters = a
                    .replicas
                    .iter()
                    .filter_map(|r| peers.get(r))
                    .map(|p| (p.id, p.cluster_addr.to_string()))
                    .collect();
                inits.push((group, voters, a.replicas.first() == Some(&id)));
            }
        } else if let Some(m) = &membership {
            // Groups exist already (or are being created on this node by a move): open
            // them; never initialize, which would start a second membership.
            for group in m.hosted_by(id) {
                registry.open_group(group, applier.clone()).await?;
            }
        }
        // The preferred leader initializes its groups now, so leadership starts spread
        // evenly; the other replicas initialize with the same (deterministic) membership after
        // a delay if nobody did, so a group forms even when its preferred leader is down.
        // openraft allows several nodes to initialize with an identical config.
        let fallback_delay =
            Duration::from_millis(config.raft.election_timeout_max_ms.saturating_mul(3));
        let mut deferred = Vec::new();
        for (group, voters, preferred) in inits {
            if preferred {
                registry.initialize(group, voters).await?;
            } else {
                deferred.push((group, voters));
            }
        }
        let reg = registry.clone();
        tokio::spawn(async move {
            tokio::time::sleep(fallback_delay).await;
            for (group, voters) in deferred {
                if let Err(e) = reg.initialize(group, voters).await {
                    tracing::warn!(group, error = %e, "fallback initialization failed");
                }
            }
        });
        let node = Arc::new(Node {
            propose_timeout: Duration::from_millis(config.raft.propose_timeout_ms),
            gateway: crate::gateway::Gateway::new(config.gateway.clone(), dropped),
            config,
            id,
            store,
            endpoint,
            registry,
            meta,
            bootstrap_table,
            routing: RoutingTable::new(),
            peers: parking_lot::RwLock::new(Arc::new(peers)),
            chat_applier: applier,
            draining: std::sync::atomic::AtomicBool::new(false),
            outboxes: std::sync::Mutex::new(HashMap::new()),
            me: std::sync::OnceLock::new(),
            rebalancer: crate::rebalance::Rebalancer::default(),
            uploads: crate::files::upload::Uploads::default(),
            retired: tokio::sync::watch::Sender::new(false),
        });
        let _ = node.me.set(Arc::downgrade(&node));
        let _ = handler.node.set(Arc::downgrade(&node));
        // Every node replicates group 0, so each closes its own sessions of a user as soon
        // as it applies the user's disabling or token rotation.
        let weak = Arc::downgrade(&node);
        node.meta.on_revoke(move |user| {
            if let Some(n) = weak.upgrade() {
                let closed = n.gateway.close_user(
                    user,
                    chatd_proto::close::REVOKED,
                    crate::gateway::REVOKED_REASON,
                );
                tracing::info!(user, sessions = closed, "token revoked; sessions closed");
            }
        });
        if node.bootstrap_table.is_some() {
            tokio::spawn(bootstrap_meta(Arc::downgrade(&node)));
        }
        if node.meta.membership().is_none() && node.config.cluster.join {
            crate::members::join(&node).await?;
        }
        tokio::spawn(crate::rebalance::run(Arc::downgrade(&node)));
        tokio::spawn(crate::members::follow(
            Arc::downgrade(&node),
            node.meta.subscribe(),
        ));
        tokio::spawn(crate::gateway::run_delivery(
            Arc::downgrade(&node),
            events_rx,
        ));
        tokio::spawn(crate::gateway::run_receipts(Arc::downgrade(&node)));
        tokio::spawn(crate::files::repair::run(Arc::downgrade(&node)));
        tokio::spawn(crate::gateway::run_presence(Arc::downgrade(&node)));
        if let Some(webhook) = webhook {
            let window = Duration::from_millis(node.config.notify.coalesce_window_ms.max(1));
            let notifier = crate::notify::Notifier::start(Arc::downgrade(&node), webhook, window);
            let _ = node.gateway.notifier.set(notifier);
        }
        tracing::info!(
            node = id,
            groups = node.registry.groups().len(),
            cluster_addr = %me.cluster_addr,
            "node started"
        );
        Ok(node)
    }

    /// The cluster's live nodes (this one included): group 0's membership once this node
    /// knows it, its config's peer list (seeds) before.
    pub fn peers(&self) -> Arc<BTreeMap<NodeId, Peer>> {
        self.peers.read().clone()
    }

    /// Where node `id` is reached, if it is a live member.
    pub fn peer(&self, id: NodeId) -> Option<Peer> {
        self.peers.read().get(&id).cloned()
    }

    /// Replaces the live node list (group 0's membership changed).
    pub(crate) fn set_peers(&self, peers: BTreeMap<NodeId, Peer>) {
        *self.peers.write() = Arc::new(peers);
    }

    /// The chat applier shared by every partition hosted here.
    pub(crate) fn chat_applier(&self) -> Arc<dyn chatd_raftlog::Applier> {
        self.chat_applier.clone()
    }

    /// Sends `req` to node `id` (a live member or a seed) and waits at most `timeout`.
    pub(crate) async fn call_peer(
        &self,
        id: NodeId,
        req: &NodeRequest,
        timeout: Duration,
    ) -> Result<NodeReply, String> {
        let addr = match self.peer(id) {
            Some(p) => p.cluster_addr,
            None => {
                self.config
                    .peers
                    .iter()
                    .find(|p| p.id == id)
                    .ok_or_else(|| format!("unknown node {id}"))?
                    .cluster_addr
            }
        };
        self.call(addr, req, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    /// Proposes a membership change to group 0 and decodes its answer.
    pub(crate) async fn propose_member(
        &self,
        cmd: chatd_membership::MemberCommand,
    ) -> Result<chatd_membership::MemberReply, ProposeError> {
        let bytes =
            chatd_codec::encode(&MetaCommand::Member(cmd)).map_err(|e| ProposeError::Unknown {
                group: META_GROUP,
                cause: e.to_string(),
            })?;
        let proposed = self.propose(META_GROUP, bytes).await?;
        chatd_codec::decode(&proposed.response).map_err(|e| ProposeError::Unknown {
            group: META_GROUP,
            cause: format!("unreadable membership answer: {e}"),
        })
    }

    /// Adds `node` (at `addr`) to `group` as a learner, on the group's leader wherever it
    /// is. Returns the index of the membership entry.
    pub(crate) async fn add_learner(
        &self,
        group: GroupId,
        node: NodeId,
        addr: String,
    ) -> Result<u64, ProposeError> {
        let (_, reply) = self
            .call_leader(group, |_| NodeRequest::AddLearner {
                group,
                node,
                addr: addr.clone(),
            })
            .await?;
        match reply {
            NodeReply::Proposed { index, .. } => Ok(index),
            other => Err(ProposeError::Unknown {
                group,
                cause: format!("unexpected reply {other:?}"),
            }),
        }
    }

    /// Marks this node as removed from the cluster (group 0 tombstoned it).
    pub(crate) fn retire(&self) {
        if !self.retired.send_replace(true) {
            tracing::warn!(
                node = self.id,
                "this node was removed from the cluster: draining and exiting"
            );
        }
    }

    /// Resolves once group 0 says this node was removed from the cluster.
    pub async fn retired(&self) {
        let mut rx = self.retired.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Stops sending broadcasts to a node that left the membership.
    pub(crate) fn forget_peer(&self, id: NodeId) {
        self.outboxes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }

    /// Number of partitions P (fixed when the cluster was made).
    pub fn partitions(&self) -> u32 {
        self.meta
            .membership()
            .map(|m| m.partitions)
            .unwrap_or(self.config.cluster.partitions)
    }

    /// The replicas of partition `group` as placement says (group 0's membership, or the
    /// bootstrap placement before it is known).
    pub(crate) fn partition_replicas(&self, group: GroupId) -> Option<Vec<NodeId>> {
        match self.meta.membership() {
            Some(m) => m.replicas(group).map(<[NodeId]>::to_vec),
            None => self
                .bootstrap_table
                .as_ref()?
                .get(group)
                .map(|a| a.replicas.clone()),
        }
    }

    /// This node's client API address.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.peer(self.id).map(|p| p.api_addr)
    }

    /// True when the metadata is bootstrapped and every hosted group has a leader that
    /// this node leads or that has reached this replica since it started (rejoined).
    pub fn ready(&self) -> bool {
        // A replica being copied here by a move is not part of readiness: it has no
        // leader's attention until the move adds it.
        let membership = self.meta.membership();
        let counts = |g: GroupId| {
            g == META_GROUP
                || membership
                    .as_ref()
                    .is_none_or(|m| m.replicas(g).is_some_and(|r| r.contains(&self.id)))
        };
        self.meta.current().is_some()
            && self
                .registry
                .groups()
                .into_iter()
                .filter(|g| counts(*g))
                .all(|g| {
                    let g = &g;
                    let has_leader = self.registry.leader(*g).is_some();
                    // A leader it knows of is not enough after a restart (its persisted vote
                    // names the old one): the leader must actually reach this replica.
                    has_leader && self.registry.rejoined(*g)
                })
    }

    /// Marks the node as draining (SIGTERM): it takes no new client sessions, is not ready
    /// any more, and never campaigns again (elections on timeout are off in every group it
    /// hosts), so a group it leads moves to another replica and stays there; it still
    /// votes. There is no way back; the process exits after the drain.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.registry.stop_elections();
    }

    /// The leader of `group`: this node's own Raft view if it hosts the group, else what
    /// its replicas say (bounded calls).
    pub(crate) async fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        if let Some(l) = self.local_leader(group) {
            return Some(l);
        }
        for r in self.replicas_of(group)? {
            if let Ok(Some(l)) = self
                .peer_group_status(r, group)
                .await
                .map(|g| g.and_then(|g| g.leader))
            {
                return Some(l);
            }
        }
        None
    }

    /// The leader of `group` in this node's own Raft view.
    pub fn local_leader(&self, group: GroupId) -> Option<NodeId> {
        self.registry.leader(group)
    }

    /// True once a drain has started.
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The groups this node hosts whose leader, in this node's own Raft view, is this node.
    pub fn led_groups(&self) -> Vec<GroupId> {
        self.registry
            .groups()
            .into_iter()
            .filter(|g| self.registry.leads(*g))
            .collect()
    }

    /// The replicas of `group` (every node for group 0); `None` for an unknown group.
    pub fn replicas_of(&self, group: GroupId) -> Option<Vec<NodeId>> {
        if group == META_GROUP {
            Some(self.peers().keys().copied().collect())
        } else {
            self.partition_replicas(group)
        }
    }

    async fn serve(&self, req: NodeRequest) -> NodeReply {
        match req {
            NodeRequest::Propose { group, command } => self.propose_here(group, command).await,
            NodeRequest::PutChunk {
                group,
                file,
                index,
                bytes,
            } => self.put_chunk(group, &file, index, &bytes).await,
            NodeRequest::GetChunk { group, file, index } => self.get_chunk(group, &file, index),
            NodeRequest::RepairFiles { group } => {
                if !self.registry.hosts(group) {
                    return NodeReply::NotLeader { leader: None };
                }
                match crate::files::repair::repair_group(self, group).await {
                    Ok(missing) => NodeReply::FilesMissing(missing),
                    Err(e) => NodeReply::Failed(format!("file records not read: {e}")),
                }
            }
            NodeRequest::Status => NodeReply::Status(self.local_status().await),
            NodeRequest::StatusPage { after, limit } => {
                NodeReply::Status(self.local_status_page(after, limit as usize).await)
            }
            NodeRequest::Query { group, query } => {
                let leads = self
                    .registry
                    .hosts(group)
                    .then(|| self.registry.leader(group));
                match leads {
                    None => NodeReply::NotLeader { leader: None },
                    Some(l) if l != Some(self.id) => NodeReply::NotLeader { leader: l },
                    Some(_) => {
                        // Believing to be the leader is not enough: a leader cut off from
                        // the others keeps believing it while a new one takes writes
                        // (chatd-jepsen found such stale reads). Confirm leadership with a
                        // quorum and wait until everything committed so far is applied.
                        if let Err(why) = self.read_index(group).await {
                            tracing::debug!(group, %why, "read refused: leadership not confirmed");
                            return NodeReply::NotLeader { leader: None };
                        }
                        // RocksDB reads run on a blocking-pool thread, never on the runtime.
                        NodeReply::QueryResult(
                            crate::queries::run_blocking(&self.store, group, query).await,
                        )
                    }
                }
            }
            NodeRequest::Deliver { events } => {
                self.gateway
                    .metrics
                    .deliveries_received
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.gateway.deliver_local(&events);
                NodeReply::Delivered
            }
            NodeRequest::Ephemeral { items } => {
                self.gateway.ephemeral_local(&items);
                NodeReply::Delivered
            }
            // A draining node never takes leadership, even when asked (it is leaving).
            NodeRequest::Elect { .. } if self.draining() => {
                NodeReply::Failed(format!("node {} is draining", self.id))
            }
            NodeRequest::Elect { group } => match self.registry.campaign(group).await {
                Ok(()) => NodeReply::Delivered,
                Err(e) => NodeReply::Failed(format!("node {}: {e}", self.id)),
            },
            NodeRequest::TransferLeadership { group, to } => {
                if self.local_leader(group) != Some(self.id) {
                    return NodeReply::NotLeader {
                        leader: self.registry.leader(group),
                    };
                }
                // Boxed: a transfer may serve requests of its own (a campaign here).
                match Box::pin(self.transfer_leadership(group, to)).await {
                    Ok(leader) => NodeReply::Proposed {
                        index: 0,
                        response: leader.to_le_bytes().to_vec(),
                    },
                    Err(e) => NodeReply::Failed(e),
                }
            }
            NodeRequest::HoldElections { group, ms } => {
                if self
                    .registry
                    .hold_elections(group, Duration::from_millis(ms))
                {
                    NodeReply::Delivered
                } else {
                    NodeReply::Failed(format!("node {} does not host group {group}", self.id))
                }
            }
            // Boxed: admitting proposes to group 0, which may come back here (serve).
            NodeRequest::Join { info } => Box::pin(crate::members::admit(self, info)).await,
            NodeRequest::AddLearner { group, node, addr } => {
                match self.registry.add_learner(group, node, addr).await {
                    Ok(index) => NodeReply::Proposed {
                        index,
                        response: Vec::new(),
                    },
                    Err(RaftProposeError::NotLeader { leader }) => NodeReply::NotLeader { leader },
                    Err(RaftProposeError::NotHosted(_)) => NodeReply::NotLeader { leader: None },
                    Err(e) => NodeReply::Failed(e.to_string()),
                }
            }
            NodeRequest::ChangeVoters {
                group,
                voters,
                drop,
                catch_up_ms,
            } => {
                let catch_up =
                    Duration::from_millis(catch_up_ms.min(crate::rebalance::MOVE_CATCH_UP_MS_MAX));
                match self
                    .registry
                    .change_voters(
                        group,
                        voters.into_iter().collect(),
                        drop.into_iter().collect(),
                        false,
                        catch_up,
                    )
                    .await
                {
                    Ok(index) => NodeReply::Proposed {
                        index,
                        response: Vec::new(),
                    },
                    Err(RaftProposeError::NotLeader { leader }) => NodeReply::NotLeader { leader },
                    Err(RaftProposeError::NotHosted(_)) => NodeReply::NotLeader { leader: None },
                    Err(e) => NodeReply::Failed(e.to_string()),
                }
            }
            NodeRequest::Presence { users } => NodeReply::Presence(
                self.gateway
                    .presence_of(&users)
                    .into_iter()
                    .map(|p| (p.user, p.online, p.last_seen))
                    .collect(),
            ),
        }
    }

    pub(crate) async fn call(
        &self,
        addr: SocketAddr,
        req: &NodeRequest,
        timeout: Duration,
    ) -> Result<NodeReply, CallError> {
        let frame = Self::call_frame(req)?;
        self.call_frame_to(addr, frame, timeout).await
    }

    /// The frame of a node-to-node call of `req` (the service tag, then the request):
    /// encoded once, it can go to several peers ([`Self::call_frame_to`]).
    pub(crate) fn call_frame(req: &NodeRequest) -> Result<Bytes, CallError> {
        let mut frame = vec![NODE_SERVICE_TAG];
        chatd_codec::encode_into(req, &mut frame).map_err(|e| CallError::Failed(e.to_string()))?;
        Ok(Bytes::from(frame))
    }

    /// [`Self::call`] with a frame from [`Self::call_frame`].
    pub(crate) async fn call_frame_to(
        &self,
        addr: SocketAddr,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<NodeReply, CallError> {
        let reply = self
            .endpoint
            .call_with_timeout(addr, frame, timeout)
            .await
            .map_err(|e| match e {
                TransportError::Connect { .. } | TransportError::ConnectTimeout { .. } => {
                    CallError::NotSent(e.to_string())
                }
                other => CallError::Failed(other.to_string()),
            })?;
        chatd_codec::decode(&reply).map_err(|e| CallError::Failed(e.to_string()))
    }

    /// A weak reference to this node (empty before construction finished).
    fn weak_self(&self) -> Weak<Node> {
        self.me.get().cloned().unwrap_or_default()
    }

    /// The user owning `token_sha256`. A user created moments ago through another node may
    /// not be applied here yet: a miss waits (bounded) for this replica of group 0 to catch
    /// up before it counts.
    pub async fn user_by_token_caught_up(&self, token_sha256: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_millis(USER_CATCH_UP_MS);
        loop {
            if let Some(u) = self.meta.user_by_token(token_sha256) {
                return Some(u);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(USER_CATCH_UP_POLL_MS)).await;
        }
    }

    /// True if `user` exists and is enabled, waiting (bounded) for group 0 to catch up.
    pub async fn user_enabled_caught_up(&self, user: &str) -> bool {
        let deadline = Instant::now() + Duration::from_millis(USER_CATCH_UP_MS);
        loop {
            if self.meta.user_enabled(user) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(USER_CATCH_UP_POLL_MS)).await;
        }
    }

    /// True if `user` has a session on any node, as this node knows it.
    pub fn is_online(&self, user: &str) -> bool {
        self.gateway
            .presence_of(&[user.to_string()])
            .first()
            .is_some_and(|p| p.online)
    }

    /// Stops the Raft groups and the QUIC endpoint; data is synced.
    pub async fn shutdown(&self) {
        self.registry.shutdown().await;
        self.endpoint.close().await;
        if let Err(e) = self.store.sync_wal() {
            tracing::warn!(error = %e, "final sync failed");
        }
        tracing::info!(node = self.id, "node stopped");
    }

    /// The cluster metadata this node would bootstrap group 0 with (a founding node).
    fn initial_meta(&self, table: &PartitionTable) -> ClusterMeta {
        ClusterMeta {
            cluster_id: self.config.cluster_id.clone(),
            nodes: self
                .peers()
                .values()
                .map(|p| {
                    (
                        p.id,
                        NodeInfo {
                            id: p.id,
                            cluster_addr: p.cluster_addr.to_string(),
                            api_addr: p.api_addr.to_string(),
                        },
                    )
                })
                .collect(),
            table: table.clone(),
        }
    }
}

/// The live nodes of `m` with addresses this build can parse (group 0 stores them as
/// text; a node whose address does not parse is logged and left out).
pub(crate) fn peers_of(m: &chatd_membership::Membership) -> BTreeMap<NodeId, Peer> {
    m.live_nodes()
        .filter_map(|n| {
            match (
                n.info.cluster_addr.parse::<SocketAddr>(),
                n.info.api_addr.parse::<SocketAddr>(),
            ) {
                (Ok(cluster_addr), Ok(api_addr)) => Some((
                    n.info.id,
                    Peer {
                        id: n.info.id,
                        cluster_addr,
                        api_addr,
                    },
                )),
                _ => {
                    tracing::error!(node = n.info.id, "group 0 holds an unreadable address");
                    None
                }
            }
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The request never reached the peer.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The request may have reached the peer.
    #[error("{0}")]
    Failed(String),
}

/// Writes the cluster metadata into group 0 once; every node tries until it is there.
async fn bootstrap_meta(node: Weak<Node>) {
    loop {
        let Some(n) = node.upgrade() else { return };
        let Some(table) = n.bootstrap_table.clone() else {
            return;
        };
        if let Some(meta) = n.meta.current() {
            if meta.table != table {
                tracing::error!(
                    "the partition table in group 0 differs from the one this node's config \
                     describes; this node serves the stored table's groups it hosts"
                );
            }
            return;
        }
        let cmd = match chatd_codec::encode(&MetaCommand::Bootstrap(n.initial_meta(&table))) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the bootstrap command");
                return;
            }
        };
        match n.propose(META_GROUP, cmd).await {
            Ok(_) => tracing::info!("cluster metadata bootstrapped"),
            Err(e) => tracing::debug!(error = %e, "metadata bootstrap not yet possible"),
        }
        drop(n);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
