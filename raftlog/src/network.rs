//! Raft RPCs between nodes: every group's messages to a peer ride the peer's one QUIC
//! connection, kept by `chatd_transport::Endpoint`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use chatd_transport::{Endpoint, TransportError};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};

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
}

/// Encodes a request frame: `[RAFT_SERVICE_TAG][codec(envelope)]`.
pub(crate) fn encode_request(envelope: &RaftEnvelope) -> Result<Bytes, chatd_codec::CodecError> {
    let mut out = Vec::with_capacity(256);
    out.push(RAFT_SERVICE_TAG);
    chatd_codec::encode_into(envelope, &mut out)?;
    Ok(Bytes::from(out))
}

/// Creates the per-peer clients of one group.
#[derive(Clone)]
pub struct NetworkFactory {
    group: GroupId,
    endpoint: Endpoint,
}

impl NetworkFactory {
    /// Clients of `group` that send through `endpoint`.
    pub fn new(group: GroupId, endpoint: Endpoint) -> Self {
        Self { group, endpoint }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        Network {
            group: self.group,
            target,
            node: node.clone(),
            addr: node.addr.parse(),
            endpoint: self.endpoint.clone(),
        }
    }
}

/// A group's client for one peer.
pub struct Network {
    group: GroupId,
    target: NodeId,
    node: BasicNode,
    addr: Result<SocketAddr, std::net::AddrParseError>,
    endpoint: Endpoint,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl Network {
    async fn send<E: std::error::Error>(
        &self,
        request: RaftRequest,
        ttl: Duration,
    ) -> Result<RaftReply, RpcErr<E>> {
        let addr = match &self.addr {
            Ok(a) => *a,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(e))),
        };
        let frame = encode_request(&RaftEnvelope {
            group: self.group,
            request,
        })
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = self
            .endpoint
            .call_with_timeout(addr, frame, ttl)
            .await
            .map_err(|e| match e {
                TransportError::Connect { .. }
                | TransportError::ConnectTimeout { .. }
                | TransportError::Timeout { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                other => RPCError::Network(NetworkError::new(&other)),
            })?;
        let reply: RaftReply =
            chatd_codec::decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
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
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self
            .send(RaftRequest::Append(rpc), option.hard_ttl())
            .await?
        {
            RaftReply::Append(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self
            .send(RaftRequest::Snapshot(rpc), option.hard_ttl())
            .await?
        {
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
