//! Just enough DER reading to pull names out of X.509 certificates.
//!
//! Every function returns `None` (or stops iterating) on malformed input; nothing here panics.

/// DER tag of a SEQUENCE.
pub(crate) const SEQUENCE: u8 = 0x30;
/// DER tag of a SET.
pub(crate) const SET: u8 = 0x31;
/// DER tag of an OBJECT IDENTIFIER.
pub(crate) const OID: u8 = 0x06;
/// DER tag of an OCTET STRING.
const OCTET_STRING: u8 = 0x04;
/// `[0] EXPLICIT` holding the version of a TBSCertificate.
const VERSION: u8 = 0xa0;
/// `[3] EXPLICIT` holding the extensions of a TBSCertificate.
const EXTENSIONS: u8 = 0xa3;
/// `[2] IMPLICIT IA5String`: a dNSName in a GeneralName.
const DNS_NAME: u8 = 0x82;
/// The encoded OID 2.5.29.17 (subjectAltName).
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// Splits the first TLV off `input`: `(tag, contents, rest)`.
pub(crate) fn split_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags never occur in what we read
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let len = rest
            .get(..n)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest.get(n..)?)
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

/// Iterates over consecutive TLVs, yielding `(tag, contents)`; stops at the first malformed one.
pub(crate) fn tlvs(mut input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, contents, rest) = split_tlv(input)?;
        input = rest;
        Some((tag, contents))
    })
}

/// Decodes the contents of an OBJECT IDENTIFIER into its arcs.
pub(crate) fn decode_oid(bytes: &[u8]) -> Option<Vec<u64>> {
    let mut arcs = Vec::new();
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().enumerate() {
        if value > (u64::MAX >> 7) {
            return None;
        }
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        } else if i + 1 == bytes.len() {
            return None; // truncated arc
        }
    }
    (!arcs.is_empty()).then_some(arcs)
}

/// The contents of the subject `Name` and of the `SubjectPublicKeyInfo` of a certificate.
pub(crate) fn subject_and_spki(cert_der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (SEQUENCE, cert, _) = split_tlv(cert_der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = split_tlv(cert)? else {
        return None;
    };
    let mut fields = tlvs(tbs).peekable();
    if fields.peek()?.0 == VERSION {
        fields.next();
    }
    // serialNumber, signature, issuer, validity
    let mut fields = fields.skip(4);
    match (fields.next()?, fields.next()?) {
        ((SEQUENCE, subject), (SEQUENCE, spki)) => Some((subject, spki)),
        _ => None,
    }
}

/// The dNSName entries of a certificate's subjectAltName extension (empty if none or malformed).
pub(crate) fn cert_dns_names(cert_der: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let Some((SEQUENCE, cert, _)) = split_tlv(cert_der) else {
        return names;
    };
    let Some((SEQUENCE, tbs, _)) = split_tlv(cert) else {
        return names;
    };
    for (tag, value) in tlvs(tbs) {
        if tag != EXTENSIONS {
            continue;
        }
        let Some((SEQUENCE, extensions, _)) = split_tlv(value) else {
            return names;
        };
        for (tag, extension) in tlvs(extensions) {
            if tag != SEQUENCE {
                continue;
            }
            let mut fields = tlvs(extension);
            if fields.next() != Some((OID, SUBJECT_ALT_NAME)) {
                continue;
            }
            for (tag, value) in fields {
                if tag != OCTET_STRING {
                    continue;
                }
                let Some((SEQUENCE, general_names, _)) = split_tlv(value) else {
                    continue;
                };
                names.extend(
                    tlvs(general_names)
                        .filter(|(tag, _)| *tag == DNS_NAME)
                        .filter_map(|(_, name)| std::str::from_utf8(name).ok())
                        .map(str::to_owned),
                );
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oid_round_trip() {
        assert_eq!(decode_oid(&[0x55, 0x04, 0x03]), Some(vec![2, 5, 4, 3]));
        assert_eq!(
            decode_oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            Some(vec![1, 2, 840, 113549])
        );
        assert_eq!(decode_oid(&[0x86]), None);
        assert_eq!(decode_oid(&[]), None);
    }

    #[test]
    fn malformed_input_is_rejected_without_panic() {
        assert!(split_tlv(&[]).is_none());
        assert!(split_tlv(&[0x30]).is_none());
        assert!(split_tlv(&[0x30, 0x05, 0x00]).is_none());
        assert!(split_tlv(&[0x30, 0x85, 0, 0, 0, 0, 1]).is_none());
        assert!(cert_dns_names(&[0x30, 0x82, 0xff]).is_empty());
        assert_eq!(
            split_tlv(&[0x04, 0x01, 0xaa, 0xbb]),
            Some((0x04, &[0xaa][..], &[0xbb][..]))
        );
    }
}
