//! Group 0, the metadata group: the cluster's nodes, the partition table and placement, and
//! the routing table from partition to leader.
//!
//! `membership` knows Raft only through `raftlog`'s [`Applier`]; it knows nothing of chats,
//! storage layout or the network.

#[cfg(test)]
mod golden;
mod hash;
mod members;
mod placement;
mod routing;

use std::collections::BTreeMap;
use std::sync::Arc;

use chatd_raftlog::{Applier, ApplyTxn, GroupId, NodeId};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

pub use hash::{partition_of, stable_hash};
pub use members::{
    plan, Changed, MemberCommand, MemberReply, Membership, NodeRecord, NodeState, PartitionRecord,
    ReplicaMove, Step,
};
pub use placement::{
    default_replication, place, PartitionAssignment, PartitionTable, PlacementError, PARTITIONS_MAX,
};
pub use routing::RoutingTable;

/// The metadata group's id.
pub const META_GROUP: GroupId = 0;

/// Where a node can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id.
    pub id: NodeId,
    /// QUIC address for node-to-node traffic.
    pub cluster_addr: String,
    /// Address of the client API (HTTP and WebSocket).
    pub api_addr: String,
}

/// Everything group 0 holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    /// The cluster's id.
    pub cluster_id: String,
    /// The nodes, by id.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// Partition placement.
    pub table: PartitionTable,
}

/// Commands of the metadata group.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Sets the cluster metadata if it was never set; a second bootstrap is a no-op that
    /// answers with the metadata already there (so every node may try it safely).
    Bootstrap(ClusterMeta),
    /// Creates a user with the SHA-256 (hex) of its bearer token; refused if the id exists.
    CreateUser { user: String, token_sha256: String },
    /// Disables a user: its token stops working and its sessions end on every node.
    DisableUser { user: String },
    /// Replaces an enabled user's token (by its SHA-256, hex): the old one stops working and
    /// the sessions opened with it end on every node.
    RotateToken { user: String, token_sha256: String },
    /// A change of the cluster's membership (nodes, replica sets); answered with a
    /// [`MemberReply`].
    Member(MemberCommand),
}

/// A user as group 0 stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub user: String,
    pub token_sha256: String,
    pub disabled: bool,
}

/// Answers of user commands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserReply {
    Created,
    Disabled,
    Exists,
    Unknown,
    /// The token was replaced.
    Rotated,
    /// The user is disabled: its token is not rotated (it would not open anything).
    IsDisabled,
}

/// Called with a user whose token stopped working (disabled or rotated), on the apply path.
type RevokeHook = Box<dyn Fn(&str) + Send + Sync>;

fn user_key(user: &str) -> Vec<u8> {
    [b"user\0".as_slice(), user.as_bytes()].concat()
}

const CLUSTER_KEY: &[u8] = b"cluster";

/// The metadata group's state machine, with the latest applied metadata cached in memory.
#[derive(Default)]
pub struct MetaApplier {
    current: RwLock<Option<Arc<ClusterMeta>>>,
    /// The live membership (bootstrap record overlaid with node and partition records);
    /// watchers hear every change.
    membership: tokio::sync::watch::Sender<Option<Arc<Membership>>>,
    users: RwLock<Users>,
    on_revoke: std::sync::OnceLock<RevokeHook>,
}

#[derive(Default)]
struct Users {
    by_id: std::collections::HashMap<String, UserRecord>,
    by_token: std::collections::HashMap<String, String>,
}

impl Users {
    fn set(&mut self, u: UserRecord) {
        if let Some(old) = self.by_id.get(&u.user) {
            self.by_token.remove(&old.token_sha256);
        }
        if !u.disabled {
            self.by_token.insert(u.token_sha256.clone(), u.user.clone());
        }
        self.by_id.insert(u.user.clone(), u);
    }
}

impl MetaApplier {
    /// An applier with nothing applied yet; [`Self::load`] fills it from the store.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Reads the applied metadata from the store (after a restart).
    pub fn load(&self, store: &chatd_storage::Storage) -> Result<(), MembershipError> {
        if let Some(bytes) = chatd_raftlog::read_record(store, META_GROUP, CLUSTER_KEY)? {
            let meta: ClusterMeta = chatd_codec::decode(&bytes)?;
            let mut membership = Membership::from_bootstrap(&meta);
            for (_, v) in scan_prefix(store, b"node\0")? {
                let n: NodeRecord = chatd_codec::decode(&v)?;
                membership.nodes.insert(n.info.id, n);
            }
            for (_, v) in scan_prefix(store, b"part\0")? {
                let p: PartitionRecord = chatd_codec::decode(&v)?;
                let at = usize::try_from(p.group.saturating_sub(1)).unwrap_or(usize::MAX);
                if let Some(slot) = membership.parts.get_mut(at) {
                    *slot = p;
                }
            }
            if let Some(v) = chatd_raftlog::read_record(store, META_GROUP, members::REBALANCE_KEY)?
            {
                membership.rebalance_paused = chatd_codec::decode(&v)?;
            }
            self.set(meta);
            self.membership.send_replace(Some(Arc::new(membership)));
        }
        let mut users = Users::default();
        for (_, v) in scan_prefix(store, &user_key(""))? {
            let u: UserRecord = chatd_codec::decode(&v)?;
            users.set(u);
        }
        *self.users_mut() = users;
        Ok(())
    }

    /// Sets what happens when a user's token stops working: called on the apply path, after
    /// the in-memory view changed (so a lookup racing with it already misses). Must not
    /// block. Set once; later calls are ignored.
    pub fn on_revoke(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.on_revoke.set(Box::new(hook));
    }

    fn revoked(&self, user: &str) {
        if let Some(hook) = self.on_revoke.get() {
            hook(user);
        }
    }

    /// True if `token_sha256` is `user`'s current token and the user is enabled.
    pub fn token_valid(&self, user: &str, token_sha256: &str) -> bool {
        self.users()
            .by_id
            .get(user)
            .is_some_and(|u| !u.disabled && u.token_sha256 == token_sha256)
    }

    fn users_mut(&self) -> parking_lot::RwLockWriteGuard<'_, Users> {
        self.users.write()
    }

    fn users(&self) -> parking_lot::RwLockReadGuard<'_, Users> {
        self.users.read()
    }

    /// The enabled user whose token hashes to `token_sha256`.
    pub fn user_by_token(&self, token_sha256: &str) -> Option<String> {
        self.users().by_token.get(token_sha256).cloned()
    }

    /// True if `user` exists and is enabled.
    pub fn user_enabled(&self, user: &str) -> bool {
        self.users().by_id.get(user).is_some_and(|u| !u.disabled)
    }

    /// Every user, sorted by id.
    pub fn list_users(&self) -> Vec<UserRecord> {
        let mut v: Vec<UserRecord> = self.users().by_id.values().cloned().collect();
        v.sort_by(|a, b| a.user.cmp(&b.user));
        v
    }

    /// The live membership, if the cluster was bootstrapped.
    pub fn membership(&self) -> Option<Arc<Membership>> {
        self.membership.borrow().clone()
    }

    /// Hears every change of the live membership.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<Arc<Membership>>> {
        self.membership.subscribe()
    }

    /// The metadata applied so far, if the cluster was bootstrapped.
    pub fn current(&self) -> Option<Arc<ClusterMeta>> {
        self.current.read().clone()
    }

    fn set(&self, meta: ClusterMeta) {
        *self.current.write() = Some(Arc::new(meta));
    }
}

impl Applier for MetaApplier {
    fn apply(
        &self,
        _group: GroupId,
        _index: u64,
        command: &[u8],
        txn: &mut ApplyTxn<'_>,
    ) -> Result<Vec<u8>, chatd_storage::StorageError> {
        let corrupt = |e: chatd_codec::CodecError| chatd_storage::StorageError::Corrupt {
            cf: "sm",
            cause: e.to_string(),
        };
        let cmd: MetaCommand = match chatd_codec::decode(command) {
            Ok(c) => c,
            // A command this build cannot read changes nothing; the proposer hears why.
            Err(e) => return Ok(format!("malformed metadata command: {e}").into_bytes()),
        };
        match cmd {
            MetaCommand::Bootstrap(meta) => {
                let stored = match txn.get(CLUSTER_KEY)? {
                    Some(existing) => existing,
                    None => {
                        let bytes = chatd_codec::encode(&meta).map_err(corrupt)?;
                        txn.put(CLUSTER_KEY, bytes.clone());
                        bytes
                    }
                };
                let applied: ClusterMeta = chatd_codec::decode(&stored).map_err(corrupt)?;
                if self.membership().is_none() {
                    self.membership
                        .send_replace(Some(Arc::new(Membership::from_bootstrap(&applied))));
                }
                self.set(applied);
                Ok(stored)
            }
            MetaCommand::Member(cmd) => {
                let Some(current) = self.membership() else {
                    return chatd_codec::encode(&MemberReply::NotBootstrapped).map_err(corrupt);
                };
                let mut next = (*current).clone();
                let (reply, changed) = next.apply(&cmd);
                for id in &changed.nodes {
                    if let Some(n) = next.nodes.get(id) {
                        txn.put(
                            &members::node_key(*id),
                            chatd_codec::encode(n).map_err(corrupt)?,
                        );
                    }
                }
                for g in &changed.parts {
                    if let Some(p) = next.part(*g) {
                        txn.put(
                            &members::part_key(*g),
                            chatd_codec::encode(p).map_err(corrupt)?,
                        );
                    }
                }
                if changed.rebalance {
                    txn.put(
                        members::REBALANCE_KEY,
                        chatd_codec::encode(&next.rebalance_paused).map_err(corrupt)?,
                    );
                }
                if !changed.is_empty() {
                    self.membership.send_replace(Some(Arc::new(next)));
                }
                chatd_codec::encode(&reply).map_err(corrupt)
            }
            MetaCommand::CreateUser { user, token_sha256 } => {
                let key = user_key(&user);
                let reply = if txn.get(&key)?.is_some() {
                    UserReply::Exists
                } else {
                    let record = UserRecord {
                        user,
                        token_sha256,
                        disabled: false,
                    };
                    txn.put(&key, chatd_codec::encode(&record).map_err(corrupt)?);
                    self.users_mut().set(record);
                    UserReply::Created
                };
                chatd_codec::encode(&reply).map_err(corrupt)
            }
            MetaCommand::DisableUser { user } => {
                let key = user_key(&user);
                let reply = match txn.get(&key)? {
                    None => UserReply::Unknown,
                    Some(bytes) => {
                        let mut record: UserRecord =
                            chatd_codec::decode(&bytes).map_err(corrupt)?;
                        record.disabled = true;
                        txn.put(&key, chatd_codec::encode(&record).map_err(corrupt)?);
                        self.users_mut().set(record);
                        self.revoked(&user);
                        UserReply::Disabled
                    }
                };
                chatd_codec::encode(&reply).map_err(corrupt)
            }
            MetaCommand::RotateToken { user, token_sha256 } => {
                let key = user_key(&user);
                let reply = match txn.get(&key)? {
                    None => UserReply::Unknown,
                    Some(bytes) => {
                        let mut record: UserRecord =
                            chatd_codec::decode(&bytes).map_err(corrupt)?;
                        if record.disabled {
                            UserReply::IsDisabled
                        } else {
                            record.token_sha256 = token_sha256;
                            txn.put(&key, chatd_codec::encode(&record).map_err(corrupt)?);
                            self.users_mut().set(record);
                            self.revoked(&user);
                            UserReply::Rotated
                        }
                    }
                };
                chatd_codec::encode(&reply).map_err(corrupt)
            }
        }
    }

    fn installed(&self, _group: GroupId, store: &chatd_storage::Storage) {
        let before = self.users().by_id.clone();
        if let Err(e) = self.load(store) {
            tracing::error!(error = %e, "cannot reload group 0 after a snapshot install");
            return;
        }
        // Tokens the snapshot revoked end their sessions here too.
        let revoked: Vec<String> = {
            let after = self.users();
            before
                .values()
                .filter(|old| {
                    !old.disabled
                        && after
                            .by_id
                            .get(&old.user)
                            .is_none_or(|new| new.disabled || new.token_sha256 != old.token_sha256)
                })
                .map(|old| old.user.clone())
                .collect()
        };
        for user in revoked {
            self.revoked(&user);
        }
    }
}

/// Every group 0 record under `prefix`.
fn scan_prefix(
    store: &chatd_storage::Storage,
    prefix: &[u8],
) -> Result<Vec<chatd_storage::KeyValue>, MembershipError> {
    let mut end = prefix.to_vec();
    end.push(0xff);
    Ok(chatd_raftlog::scan_records(
        store,
        META_GROUP,
        prefix,
        &end,
        usize::MAX,
    )?)
}

/// Errors of the membership layer.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// Reading the metadata failed.
    #[error(transparent)]
    Storage(#[from] chatd_storage::StorageError),
    /// The stored metadata is not readable.
    #[error("corrupt cluster metadata: {0}")]
    Codec(#[from] chatd_codec::CodecError),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn golden_bytes_of_cluster_meta() {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            1,
            NodeInfo {
                id: 1,
                cluster_addr: "a".into(),
                api_addr: "b".into(),
            },
        );
        let meta = ClusterMeta {
            cluster_id: "c".into(),
            nodes,
            table: place(&[1], 1, 1).unwrap(),
        };
        let bytes = chatd_codec::encode(&MetaCommand::Bootstrap(meta.clone())).unwrap();
        let golden: &[u8] = &[1, 0, 1, b'c', 1, 1, 1, 1, b'a', 1, b'b', 1, 1, 1, 1, 1, 1];
        assert_eq!(bytes, golden);
        let back: MetaCommand = chatd_codec::decode(golden).unwrap();
        assert!(matches!(back, MetaCommand::Bootstrap(m) if m == meta));
        let user = chatd_codec::encode(&MetaCommand::CreateUser {
            user: "a".into(),
            token_sha256: "b".into(),
        })
        .unwrap();
        assert_eq!(user, vec![1, 1, 1, b'a', 1, b'b']);
        let rotate = chatd_codec::encode(&MetaCommand::RotateToken {
            user: "a".into(),
            token_sha256: "c".into(),
        })
        .unwrap();
        assert_eq!(rotate, vec![1, 3, 1, b'a', 1, b'c']);
        assert_eq!(
            chatd_codec::encode(&UserReply::IsDisabled).unwrap(),
            vec![1, 5]
        );
    }

    fn apply(meta: &MetaApplier, store: &chatd_storage::Storage, cmd: MetaCommand) -> UserReply {
        let mut txn = ApplyTxn::standalone(META_GROUP, store);
        let out = meta
            .apply(META_GROUP, 1, &chatd_codec::encode(&cmd).unwrap(), &mut txn)
            .unwrap();
        txn.commit().unwrap();
        chatd_codec::decode(&out).unwrap()
    }

    #[test]
    fn rotating_or_disabling_revokes_the_token_and_tells_the_hook() {
        let dir = tempfile::tempdir().unwrap();
        let store = chatd_storage::Storage::open(
            dir.path(),
            &chatd_storage::NodeIdentity {
                cluster_id: "t".into(),
                node_id: 1,
            },
            &chatd_storage::StorageOptions::default(),
        )
        .unwrap();
        let meta = MetaApplier::new();
        let revoked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = revoked.clone();
        meta.on_revoke(move |u| seen.lock().unwrap().push(u.to_string()));
        let create = |user: &str, t: &str| MetaCommand::CreateUser {
            user: user.into(),
            token_sha256: t.into(),
        };
        assert_eq!(apply(&meta, &store, create("a", "t1")), UserReply::Created);
        assert_eq!(apply(&meta, &store, create("b", "t2")), UserReply::Created);
        let rotate = |user: &str, t: &str| MetaCommand::RotateToken {
            user: user.into(),
            token_sha256: t.into(),
        };
        assert_eq!(apply(&meta, &store, rotate("a", "t3")), UserReply::Rotated);
        assert_eq!(
            meta.user_by_token("t1"),
            None,
            "the old token opens nothing"
        );
        assert_eq!(meta.user_by_token("t3").as_deref(), Some("a"));
        assert!(meta.token_valid("a", "t3") && !meta.token_valid("a", "t1"));
        assert_eq!(apply(&meta, &store, rotate("zz", "t4")), UserReply::Unknown);
        let disable = MetaCommand::DisableUser { user: "b".into() };
        assert_eq!(apply(&meta, &store, disable), UserReply::Disabled);
        assert_eq!(meta.user_by_token("t2"), None);
        assert!(!meta.token_valid("b", "t2"));
        assert_eq!(
            apply(&meta, &store, rotate("b", "t5")),
            UserReply::IsDisabled
        );
        assert_eq!(
            meta.user_by_token("t5"),
            None,
            "a disabled user gets no token"
        );
        assert_eq!(*revoked.lock().unwrap(), vec!["a".to_string(), "b".into()]);
        // What was applied survives a restart.
        let reloaded = MetaApplier::new();
        reloaded.load(&store).unwrap();
        assert_eq!(reloaded.user_by_token("t3").as_deref(), Some("a"));
        assert_eq!(reloaded.user_by_token("t1"), None);
        assert!(!reloaded.user_enabled("b"));
    }
}
