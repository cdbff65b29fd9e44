//! Which cluster and node a data directory belongs to.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Cf, StorageError};

pub(crate) const IDENTITY_KEY: &[u8] = b"identity";

/// The owner of a data directory: recorded when the directory is created, checked at every
/// open, so a node never starts on another node's or another cluster's data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// The cluster's id, generated once by `chatd cluster init`.
    pub cluster_id: String,
    /// The node's id within the cluster.
    pub node_id: u64,
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {} of cluster {}", self.node_id, self.cluster_id)
    }
}

pub(crate) fn check_or_claim(
    db: &rocksdb::DB,
    path: &Path,
    expected: &NodeIdentity,
    fresh: bool,
) -> Result<(), StorageError> {
    let cf = db
        .cf_handle(Cf::NodeMeta.name())
        .ok_or_else(|| StorageError::Open {
            path: path.to_path_buf(),
            cause: "column family node_meta is missing".into(),
        })?;
    let stored = db
        .get_cf(cf, IDENTITY_KEY)
        .map_err(|e| StorageError::Rocks {
            op: "read identity",
            cause: e.into_string(),
        })?;
    match stored {
        Some(bytes) => {
            let found: NodeIdentity =
                chatd_codec::decode(&bytes).map_err(|e| StorageError::Corrupt {
                    cf: Cf::NodeMeta.name(),
                    cause: e.to_string(),
                })?;
            if &found != expected {
                return Err(StorageError::IdentityMismatch {
                    path: path.to_path_buf(),
                    found,
                    expected: expected.clone(),
                });
            }
            Ok(())
        }
        None if fresh => {
            let bytes = chatd_codec::encode(expected).map_err(|e| StorageError::Corrupt {
                cf: Cf::NodeMeta.name(),
                cause: e.to_string(),
            })?;
            let mut wo = rocksdb::WriteOptions::default();
            wo.set_sync(true);
            db.put_cf_opt(cf, IDENTITY_KEY, bytes, &wo)
                .map_err(|e| StorageError::Rocks {
                    op: "write identity",
                    cause: e.into_string(),
                })?;
            db.flush_wal(true).map_err(|e| StorageError::Rocks {
                op: "sync identity",
                cause: e.into_string(),
            })
        }
        None => Err(StorageError::Open {
            path: path.to_path_buf(),
            cause: "the database has no node identity (not a chatd data directory?)".into(),
        }),
    }
}
