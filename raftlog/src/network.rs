//! Raft RPCs between nodes: every group's messages to a peer ride the peer's one QUIC
//! connection, kept by `chatd_transport::Endpoint`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use chatd_transport::{Endpoint, TransportError};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};

use crate::peers::{Link, LinkStats, Links, PeerHealth, PEER_BATCH_BYTES_MAX};
use crate::{GroupId, NodeId, TypeConfig};

/// First byte of every QUIC request that carries a Raft RPC; the node routes on it.
pub const RAFT_SERVICE_TAG: u8 = 0x01;

/// A Raft RPC for one group.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    /// AppendEntries (and heartbeats).
    Append(AppendEntriesRequest<TypeConfig>),
    /// RequestVote.
    Vote(VoteRequest<NodeId>),
    /// One chunk of InstallSnapshot.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// The leader asks a replica to stop expecting heartbeats (the group is idle and the
    /// replica holds everything): see `quiet`.
    Quiesce(QuiesceRequest),
}

/// A leader's request to quiesce one replica of its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuiesceRequest {
    /// The leader asking.
    pub leader: NodeId,
    /// Its term.
    pub term: u64,
    /// Its last log index, committed and applied: the replica must hold and have applied
    /// exactly this much.
    pub index: u64,
}

/// The request on the wire: the group it is for and the RPC.
#[derive(Debug, Serialize, Deserialize)]
pub struct RaftEnvelope {
    /// Target group.
    pub group: GroupId,
    /// The RPC.
    pub request: RaftRequest,
}

/// The answer on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    /// Answer to `Append`.
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to `Vote`.
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to `Snapshot`.
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// The receiving node does not host this group (yet).
    UnknownGroup(GroupId),
    /// The request could not be decoded.
    Malformed(String),
    /// Answer to `Quiesce`: whether the replica quiesced.
    Quiesce(bool),
}

/// Encodes an envelope, as a batch carries it (the single-RPC path puts
/// `RAFT_SERVICE_TAG` before it).
pub(crate) fn encode_envelope(envelope: &RaftEnvelope) -> Result<Bytes, chatd_codec::CodecError> {
    let mut out = Vec::with_capacity(256);
    chatd_codec::encode_into(envelope, &mut out)?;
    Ok(Bytes::from(out))
}

/// How long a group's replication to a peer pauses after the peer could not be reached
/// (openraft retries after it). Short: a restarted peer must hear from its leaders well
/// within its election timeout.
pub const UNREACHABLE_BACKOFF_MS: u64 = 200;

/// Largest AppendEntries frame sent with more than one entry: a bigger one is cut (openraft
/// is told the payload is too large and sends fewer entries), so each RPC arrives and is
/// synced within openraft's per-RPC time (one heartbeat interval) and a far-behind replica
/// catches up at the link's pace. A single entry is sent whatever its size (≤ 1 MiB plus
/// framing: the batcher's `BATCH_BYTES_MAX`).
pub const APPEND_RPC_BYTES_MAX: usize = 1 << 20;

/// How many entries to send instead when `entries` entries make a frame of `frame_bytes`
/// above [`APPEND_RPC_BYTES_MAX`] (`None`: send it as it is; one entry always goes).
fn fewer_entries(entries: u64, frame_bytes: usize) -> Option<u64> {
    (entries > 1 && frame_bytes > APPEND_RPC_BYTES_MAX)
        .then(|| (entries * APPEND_RPC_BYTES_MAX as u64 / frame_bytes as u64).clamp(1, entries - 1))
}

/// How many entries of an AppendEntries (`(leader_commit, first, last)` indexes; entries
/// are consecutive) the leader had committed when it sent them.
fn rpc_committed_entries(frame_entries: &(Option<u64>, Option<u64>, Option<u64>)) -> u64 {
    match *frame_entries {
        (Some(commit), Some(first), Some(last)) if commit >= first => commit.min(last) - first + 1,
        _ => 0,
    }
}

/// The bytes of an AppendEntries frame of `frame_bytes` with `entries` entries, of which
/// `committed` were already committed when sent, that count as catch-up: all of them if
/// every entry was, none if none was, else that share (entries are about equal in size in
/// a catch-up stream). New entries are sent before they commit (their replication is what
/// commits them), so only a replica behind the others (a learner being filled, a follower
/// that was away or slow) is sent committed entries.
fn catch_up_bytes(frame_bytes: usize, entries: u64, committed: u64) -> u64 {
    match (entries, committed.min(entries)) {
        (0, _) | (_, 0) => 0,
        (e, c) if c == e => frame_bytes as u64,
        (e, c) => (frame_bytes as u128 * u128::from(c) / u128::from(e)) as u64,
    }
}

/// Creates the per-peer clients of one group.
#[derive(Clone)]
pub struct NetworkFactory {
    group: GroupId,
    links: std::sync::Arc<Links>,
}

impl NetworkFactory {
    /// Clients of `group` that send through the node's per-peer links.
    pub(crate) fn new(group: GroupId, links: std::sync::Arc<Links>) -> Self {
        Self { group, links }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let addr: Result<SocketAddr, _> = node.addr.parse();
        let ctx = self.links.ctx();
        Network {
            group: self.group,
            target,
            node: node.clone(),
            link: addr.as_ref().ok().map(|a| self.links.link(target, *a)),
            addr,
            endpoint: ctx.endpoint.clone(),
            health: ctx.health.clone(),
            stats: ctx.stats.clone(),
        }
    }
}

/// A group's client for one peer.
pub struct Network {
    group: GroupId,
    target: NodeId,
    node: BasicNode,
    addr: Result<SocketAddr, std::net::AddrParseError>,
    /// The peer's link, which batches this group's RPCs with every other group's.
    link: Option<std::sync::Arc<Link>>,
    endpoint: Endpoint,
    health: std::sync::Arc<PeerHealth>,
    stats: std::sync::Arc<LinkStats>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl Network {
    fn encode<E: std::error::Error>(&self, request: RaftRequest) -> Result<Bytes, RpcErr<E>> {
        encode_envelope(&RaftEnvelope {
            group: self.group,
            request,
        })
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    async fn send<E: std::error::Error>(
        &self,
        request: RaftRequest,
        ttl: Duration,
    ) -> Result<RaftReply, RpcErr<E>> {
        let frame = self.encode(request)?;
        self.send_frame(frame, ttl).await
    }

    /// Sends an encoded envelope: in the peer's next batch, or on its own (its own QUIC
    /// stream) if it is too large for a batch.
    async fn send_frame<E: std::error::Error>(
        &self,
        frame: Bytes,
        ttl: Duration,
    ) -> Result<RaftReply, RpcErr<E>> {
        let reply = match &self.link {
            Some(link) if frame.len() <= PEER_BATCH_BYTES_MAX => link
                .call(frame, ttl)
                .await
                .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?,
            _ => self.send_alone(frame, ttl).await?,
        };
        self.decode_reply(&reply)
    }

    /// The single-RPC path: `[RAFT_SERVICE_TAG][envelope]` on a stream of its own.
    async fn send_alone<E: std::error::Error>(
        &self,
        frame: Bytes,
        ttl: Duration,
    ) -> Result<Bytes, RpcErr<E>> {
        let addr = match &self.addr {
            Ok(a) => *a,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(e))),
        };
        let mut tagged = Vec::with_capacity(frame.len() + 1);
        tagged.push(RAFT_SERVICE_TAG);
        tagged.extend_from_slice(&frame);
        let started = std::time::Instant::now();
        let reply = self
            .endpoint
            .call_with_timeout(addr, Bytes::from(tagged), ttl)
            .await;
        self.health.record(
            self.target,
            started,
            reply
                .as_ref()
                .map(|_| ())
                .map_err(|e| e as &dyn std::fmt::Display),
        );
        // Any failure to exchange bytes with the peer (refused, timed out, connection lost
        // or reset) is "unreachable": openraft backs off for `UNREACHABLE_BACKOFF_MS`
        // instead of retrying at once. Only our own oversized frames are a network error.
        reply.map_err(|e| match e {
            TransportError::FrameTooLarge { .. } => RPCError::Network(NetworkError::new(&e)),
            other => RPCError::Unreachable(Unreachable::new(&other)),
        })
    }

    fn decode_reply<E: std::error::Error>(&self, reply: &[u8]) -> Result<RaftReply, RpcErr<E>> {
        let reply: RaftReply =
            chatd_codec::decode(reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        match reply {
            RaftReply::UnknownGroup(g) => Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other(format!("node {} does not host group {g}", self.target)),
            ))),
            RaftReply::Malformed(cause) => Err(RPCError::Network(NetworkError::new(
                &std::io::Error::other(format!("peer could not decode our request: {cause}")),
            ))),
            other => Ok(other),
        }
    }

    fn remote<E: std::error::Error>(&self, e: RaftError<NodeId, E>) -> RpcErr<E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }

    fn unexpected<E: std::error::Error>(&self) -> RpcErr<E> {
        RPCError::Network(NetworkError::new(&std::io::Error::other(
            "peer answered with the wrong reply type",
        )))
    }
}

impl RaftNetwork<TypeConfig> for Network {
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(
            UNREACHABLE_BACKOFF_MS,
        )))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let entries = rpc.entries.len() as u64;
        // Entries the leader had already committed when it sent them: catch-up.
        let frame_entries = (
            rpc.leader_commit.map(|c| c.index),
            rpc.entries.first().map(|e| e.log_id.index),
            rpc.entries.last().map(|e| e.log_id.index),
        );
        let frame = self.encode(RaftRequest::Append(rpc))?;
        // openraft sends up to `append_entries_max` entries per RPC and gives it one
        // heartbeat interval; batched entries can make that many megabytes, which never
        // arrive and sync in time (a far-behind follower, or a new replica, would not
        // catch up) or exceed the frame bound. Ask for fewer entries instead: openraft
        // retries at once with the hint.
        if let Some(hint) = fewer_entries(entries, frame.len()) {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        if entries > 0 {
            let committed = rpc_committed_entries(&frame_entries);
            self.stats
                .entry_bytes_total
                .fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.stats.catch_up_entry_bytes_total.fetch_add(
                catch_up_bytes(frame.len(), entries, committed),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        match self.send_frame(frame, option.hard_ttl()).await? {
            RaftReply::Append(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        // Snapshot chunks (up to a MiB, installed with a sync) go on their own stream:
        // in a batch they would hold back every other group's answers.
        let frame = self.encode(RaftRequest::Snapshot(rpc))?;
        self.stats
            .snapshot_bytes_total
            .fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let reply = self.send_alone(frame, option.hard_ttl()).await?;
        match self.decode_reply(&reply)? {
            RaftReply::Snapshot(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.send(RaftRequest::Vote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.unexpected()),
        }
    }
}

#[cfg(test)]
mod append_bound_tests {
    use super::*;

    #[test]
    fn entries_committed_before_they_are_sent_count_as_catch_up() {
        // New entries 11..=12 beyond commit 10: replication.
        assert_eq!(rpc_committed_entries(&(Some(10), Some(11), Some(12))), 0);
        // A learner filled with 1..=512 while the others committed up to 900: catch-up.
        assert_eq!(rpc_committed_entries(&(Some(900), Some(1), Some(512))), 512);
        // Straddling the commit index: 8..=10 of 8..=12.
        assert_eq!(rpc_committed_entries(&(Some(10), Some(8), Some(12))), 3);
        assert_eq!(rpc_committed_entries(&(None, Some(1), Some(3))), 0);
        assert_eq!(rpc_committed_entries(&(Some(5), None, None)), 0);
        assert_eq!(catch_up_bytes(1000, 0, 0), 0);
        assert_eq!(catch_up_bytes(1000, 4, 0), 0);
        assert_eq!(catch_up_bytes(1000, 4, 4), 1000);
        assert_eq!(
            catch_up_bytes(1000, 4, 9),
            1000,
            "never more than the frame"
        );
        assert_eq!(catch_up_bytes(1000, 4, 1), 250);
        assert_eq!(
            catch_up_bytes(usize::MAX, 3, 2),
            (usize::MAX as u128 * 2 / 3) as u64
        );
    }

    #[test]
    fn append_frames_above_the_bound_ask_for_fewer_entries() {
        const MAX: usize = APPEND_RPC_BYTES_MAX;
        assert_eq!(fewer_entries(512, MAX), None, "at the bound: sent");
        assert_eq!(fewer_entries(512, MAX + 1), Some(511));
        assert_eq!(fewer_entries(512, 4 * MAX), Some(128));
        assert_eq!(
            fewer_entries(512, 1000 * MAX),
            Some(1),
            "at least one entry"
        );
        assert_eq!(fewer_entries(2, 64 * MAX), Some(1));
        assert_eq!(
            fewer_entries(1, 64 * MAX),
            None,
            "a single entry always goes"
        );
        assert_eq!(fewer_entries(0, 0), None);
    }
}
