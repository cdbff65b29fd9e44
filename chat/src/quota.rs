//! Per-user storage quotas (docs/files.md "Quotas"): in each user's partition
//! (`1 + fnv1a64("u:" + user) % P`), the bytes of the files the user holds, charged before
//! an upload begins (its declared size) and refunded once the file is dropped or released.
//! Every file counts in full against its owner's quota, whether or not its bytes are
//! stored once for several owners: what one user may store never depends on what others
//! uploaded.

use chatd_raftlog::ApplyTxn;
use chatd_storage::StorageError;
use serde::{Deserialize, Serialize};

use crate::{get, keys, put, reject, ChatReply};

/// What a user holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUsage {
    pub bytes: u64,
    pub files: u64,
}

/// One file's charge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub bytes: u64,
    /// When it was charged (the gateway's clock, in the log).
    pub ts: u64,
}

/// `QuotaCharge`: `user` holds `file` of `bytes`; refused (`quota_exceeded`) when that
/// would take the user past `quota_bytes`. A retry of the same charge is answered again.
pub(crate) fn charge(
    txn: &mut ApplyTxn<'_>,
    user: &str,
    file: &str,
    bytes: u64,
    quota_bytes: u64,
    ts: u64,
) -> Result<ChatReply, StorageError> {
    let k = keys::quota_charge(user, file);
    if get::<Charge>(txn, &k)?.is_some() {
        return Ok(ChatReply::Done { seq: 0 });
    }
    let mut usage = get::<QuotaUsage>(txn, &keys::quota_usage(user))?.unwrap_or_default();
    let after = usage.bytes.saturating_add(bytes);
    if after > quota_bytes {
        return Ok(reject(
            "quota_exceeded",
            format!(
                "{bytes} more bytes take {user} past the quota: {} of {quota_bytes} bytes used",
                usage.bytes
            ),
        ));
    }
    usage.bytes = after;
    usage.files += 1;
    put(txn, &k, &Charge { bytes, ts })?;
    put(txn, &keys::quota_usage(user), &usage)?;
    Ok(ChatReply::Done { seq: 0 })
}

/// `QuotaRefund`: `file` no longer counts for `user` (idempotent).
pub(crate) fn refund(
    txn: &mut ApplyTxn<'_>,
    user: &str,
    file: &str,
) -> Result<ChatReply, StorageError> {
    let k = keys::quota_charge(user, file);
    let Some(c) = get::<Charge>(txn, &k)? else {
        return Ok(ChatReply::Done { seq: 0 });
    };
    txn.delete(&k);
    let mut usage = get::<QuotaUsage>(txn, &keys::quota_usage(user))?.unwrap_or_default();
    usage.bytes = usage.bytes.saturating_sub(c.bytes);
    usage.files = usage.files.saturating_sub(1);
    if usage == QuotaUsage::default() {
        txn.delete(&keys::quota_usage(user));
    } else {
        put(txn, &keys::quota_usage(user), &usage)?;
    }
    Ok(ChatReply::Done { seq: 0 })
}

/// What `user` holds, as applied on this replica.
pub fn usage(
    store: &chatd_storage::Storage,
    group: chatd_raftlog::GroupId,
    user: &str,
) -> Result<QuotaUsage, StorageError> {
    Ok(
        chatd_raftlog::read_record(store, group, &keys::quota_usage(user))?
            .map(|b| chatd_codec::decode(&b).map_err(crate::corrupt))
            .transpose()?
            .unwrap_or_default(),
    )
}

/// One charge as [`charges`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeOf {
    pub user: String,
    pub file: String,
    pub charge: Charge,
}

/// Up to `limit` charges of `group` as applied on this replica, in (user, file) order,
/// starting after the charge `after` (from the first when `None`).
pub fn charges(
    store: &chatd_storage::Storage,
    group: chatd_raftlog::GroupId,
    after: Option<(&str, &str)>,
    limit: usize,
) -> Result<Vec<ChargeOf>, StorageError> {
    let start = keys::QUOTA_CHARGES_START.to_vec();
    let end = keys::prefix_end(&start);
    let from = match after {
        Some((user, file)) => {
            let mut k = keys::quota_charge(user, file);
            k.push(0);
            k
        }
        None => start.clone(),
    };
    let mut out = Vec::new();
    for (k, v) in chatd_raftlog::scan_records(store, group, &from, &end, limit)? {
        let rest = &k[start.len()..];
        let Some(sep) = rest.iter().position(|b| *b == 0) else {
            continue; // not written by this code
        };
        out.push(ChargeOf {
            user: String::from_utf8_lossy(&rest[..sep]).into_owned(),
            file: String::from_utf8_lossy(&rest[sep + 1..]).into_owned(),
            charge: chatd_codec::decode(&v).map_err(crate::corrupt)?,
        });
    }
    Ok(out)
}
