//! Safety numbers: a credential's fingerprint that people compare out of band.

use sha2::{Digest, Sha512};

/// Domain separation of the fingerprint hash.
const SAFETY_NUMBER_LABEL: &[u8] = b"chatd-e2e safety number v1";
/// Rounds of the fingerprint hash (as Signal's, to make grinding a look-alike key costly).
const SAFETY_NUMBER_ROUNDS: usize = 5200;
/// Groups of digits in a safety number.
pub const SAFETY_NUMBER_GROUPS: usize = 12;

/// The safety number of a signature public key: 12 groups of 5 digits, e.g.
/// `"05823 11986 …"`. Deterministic from the key alone; equal for the same credential
/// key wherever it is seen (own device, a group member, a KeyPackage).
///
/// Each group is 5 bytes of an iterated SHA-512 over the key, big-endian, mod 100000.
pub fn safety_number(signature_public_key: &[u8]) -> String {
    let mut h = Sha512::new();
    h.update(SAFETY_NUMBER_LABEL);
    h.update(signature_public_key);
    let mut digest = h.finalize();
    for _ in 1..SAFETY_NUMBER_ROUNDS {
        let mut h = Sha512::new();
        h.update(digest);
        h.update(signature_public_key);
        digest = h.finalize();
    }
    let mut groups = Vec::with_capacity(SAFETY_NUMBER_GROUPS);
    for chunk in digest.chunks_exact(5).take(SAFETY_NUMBER_GROUPS) {
        let v = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        groups.push(format!("{:05}", v % 100_000));
    }
    groups.join(" ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn safety_number_shape_and_determinism() {
        let a = safety_number(&[1u8; 32]);
        assert_eq!(a, safety_number(&[1u8; 32]));
        assert_ne!(a, safety_number(&[2u8; 32]));
        let groups: Vec<&str> = a.split(' ').collect();
        assert_eq!(groups.len(), 12);
        assert!(groups
            .iter()
            .all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_digit())));
        // Frozen: a change of the function changes every user's safety numbers.
        assert_eq!(safety_number(&[0u8; 32]), GOLDEN_ZERO_KEY);
    }

    const GOLDEN_ZERO_KEY: &str =
        "76600 41204 53780 93368 79172 33501 98765 67270 09406 97503 16151 09265";
}
