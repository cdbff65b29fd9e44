//! The partition hash. Frozen: changing it moves every chat to another partition, so it is
//! implemented here (FNV-1a, 64 bit) rather than borrowed from a crate that might change.

use chatd_raftlog::GroupId;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes`; the same value in every version of chatd.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The partition group of `chat_id` among `partitions` (groups 1..=partitions).
/// `partitions` must be at least 1; 0 is treated as 1.
pub fn partition_of(chat_id: &[u8], partitions: u32) -> GroupId {
    1 + stable_hash(chat_id) % u64::from(partitions.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_hash_values_never_change() {
        // Published FNV-1a 64 test vectors, plus chat ids pinned to their partitions.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(partition_of(b"chat-1", 64), 1 + stable_hash(b"chat-1") % 64);
        assert_eq!(partition_of(b"d:alice:bob", 64), 53);
        assert_eq!(partition_of(b"anything", 0), 1);
    }

    #[test]
    fn partitions_are_used_evenly() {
        let mut counts = [0u32; 64];
        for i in 0..64_000 {
            let g = partition_of(format!("chat-{i}").as_bytes(), 64);
            counts[(g - 1) as usize] += 1;
        }
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(min >= Some(&800) && max <= Some(&1200), "{counts:?}");
    }
}
