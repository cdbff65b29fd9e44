//! Key layout in the shared database. Every key starts with the group id (big endian), so
//! one group's data is one contiguous range in each column family.

use crate::GroupId;

/// `group | index`: a log entry.
pub(crate) fn log_key(group: GroupId, index: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// `group | tag`: a metadata record of the group.
pub(crate) fn meta_key(group: GroupId, tag: u8) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8] = tag;
    k
}

/// `group | user key`: a state machine record.
pub(crate) fn sm_key(group: GroupId, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The key range `[start, end)` holding all of `group`'s records.
pub(crate) fn group_range(group: GroupId) -> (Vec<u8>, Vec<u8>) {
    let start = group.to_be_bytes().to_vec();
    let end = match group.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 9],
    };
    (start, end)
}

pub(crate) const META_VOTE: u8 = 1;
pub(crate) const META_PURGED: u8 = 2;
pub(crate) const META_COMMITTED: u8 = 3;
pub(crate) const META_LAST_APPLIED: u8 = 10;
pub(crate) const META_MEMBERSHIP: u8 = 11;
pub(crate) const META_SNAPSHOT: u8 = 12;
pub(crate) const META_PENDING_INSTALL: u8 = 13;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn golden_key_layout() {
        assert_eq!(
            log_key(3, 258),
            [0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        assert_eq!(meta_key(1, META_VOTE), [0, 0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(sm_key(2, b"ab"), vec![0, 0, 0, 0, 0, 0, 0, 2, b'a', b'b']);
        let (s, e) = group_range(2);
        assert!(s.as_slice() <= sm_key(2, b"").as_slice());
        assert!(sm_key(2, &[0xff; 40]).as_slice() < e.as_slice());
        assert!(log_key(2, u64::MAX).as_slice() < e.as_slice());
    }
}
