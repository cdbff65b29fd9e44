//! Regressions found by fuzzing (`fuzz/`, target `transport`): inputs that once made a
//! loader panic must be refused with a typed error.

#![allow(clippy::unwrap_used)]

use chatd_transport::{ClusterCa, TransportError};

/// A cluster CA (certificate and its matching key, a throwaway generated for the fuzz seeds)
/// whose subject has an attribute type `3.29…`: rcgen parsed it, then panicked (in yasna)
/// writing it back when rebuilding the CA to sign with.
#[test]
fn a_ca_subject_with_an_unwritable_attribute_type_is_refused_not_a_panic() {
    let pem = include_str!("fixtures/ca-subject-oid-3.pem");
    let (cert, key) = pem.split_at(pem.find("-----BEGIN PRIVATE KEY").unwrap());
    match ClusterCa::from_pem(cert, key) {
        Err(TransportError::InvalidPem { what, reason }) => {
            assert_eq!(what, "CA certificate PEM");
            assert!(reason.contains("attribute type"), "{reason}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("an unwritable subject was accepted"),
    }
}

/// A cluster CA whose subject has a PrintableString with '?': rcgen accepts it, yasna
/// panicked writing it back (found by the long `transport` fuzz run, 2M executions in).
#[test]
fn a_ca_subject_with_an_unwritable_printable_string_is_refused_not_a_panic() {
    let pem = include_str!("fixtures/ca-subject-printable-question-mark.pem");
    let (cert, key) = pem.split_at(pem.find("-----BEGIN PRIVATE KEY").unwrap());
    match ClusterCa::from_pem(cert, key) {
        Err(TransportError::InvalidPem { what, reason }) => {
            assert_eq!(what, "CA certificate PEM");
            assert!(reason.contains("PrintableString"), "{reason}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("an unwritable subject was accepted"),
    }
}
