//! Cluster PKI: a self-signed cluster CA, node/client certificates it signs, and loading a
//! node's TLS identity (CA certificate + own certificate + own key) from PEM files.
//!
//! All keys are ECDSA P-256 (rcgen's default); keys are PKCS#8 `PRIVATE KEY` PEM.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::TransportError;

/// DNS name every node certificate carries; clients verify servers against it.
pub const NODE_SERVER_NAME: &str = "chatd-node";

/// Validity of the CA and of issued certificates (10 years).
const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start being valid this long before "now" to tolerate clock skew: a node
/// whose wall clock is behind (up to this much) still accepts the certificates of a
/// cluster made a moment ago. Two days: chatd-jepsen's clock nemesis jumps clocks back
/// by up to 6 hours, and an operator's broken NTP by as much.
const BACKDATE: Duration = Duration::from_secs(2 * 24 * 3600);
/// Longest accepted DNS name (RFC 1035).
const DNS_NAME_LEN_MAX: usize = 253;

/// A cluster certificate authority (self-signed CA certificate and its private key, as PEM).
#[derive(Clone)]
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
}

/// A certificate issued by a [`ClusterCa`], with its private key (both PEM).
#[derive(Clone)]
pub struct NodeCert {
    /// The certificate (PEM `CERTIFICATE`).
    pub cert_pem: String,
    /// Its private key (PEM PKCS#8 `PRIVATE KEY`).
    pub key_pem: String,
}

/// What an endpoint needs for mutual TLS: the cluster CA certificate it trusts, and its own
/// certificate chain and private key (all PEM).
#[derive(Clone)]
pub struct TlsIdentity {
    /// The cluster CA certificate(s) (PEM): the only trusted roots.
    pub ca_cert_pem: String,
    /// This endpoint's certificate chain (PEM, leaf first).
    pub cert_pem: String,
    /// This endpoint's private key (PEM).
    pub key_pem: String,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn cert_error(e: rcgen::Error) -> TransportError {
    TransportError::CertGeneration {
        reason: e.to_string(),
    }
}

/// Sets `params` to be valid from (now - [`BACKDATE`]) to (now + [`VALIDITY`]).
fn set_validity(params: &mut CertificateParams) -> Result<(), TransportError> {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| {
        TransportError::CertGeneration {
            reason: "the system clock is set before 1970".into(),
        }
    })?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE;
    params.not_after = now + VALIDITY;
    Ok(())
}

/// CA certificate parameters for the given subject name.
fn ca_params(distinguished_name: DistinguishedName) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Checks that `name` is a plain DNS name (letters, digits, '-', '.'), and converts it.
fn dns_name(name: &str) -> Result<Ia5String, TransportError> {
    let valid = !name.is_empty()
        && name.len() <= DNS_NAME_LEN_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid {
        return Err(TransportError::CertGeneration {
            reason: format!(
                "{name:?} is not a valid DNS name (1..={DNS_NAME_LEN_MAX} characters of \
                 letters, digits, '-' and '.')"
            ),
        });
    }
    Ia5String::try_from(name).map_err(|e| TransportError::CertGeneration {
        reason: format!("{name:?} is not a valid DNS name: {e}"),
    })
}

/// The subject name (raw DER) and the SubjectPublicKeyInfo (DER) of a certificate.
fn subject_and_spki(cert_der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("malformed X.509 certificate: {e}"))?;
    Ok((
        cert.subject().as_raw().to_vec(),
        cert.public_key().raw.to_vec(),
    ))
}

/// What signing with a CA needs from its certificate: rcgen's parameters (subject name, key
/// identifier, constraints), checked to describe a CA.
fn ca_cert_params(ca_der: &CertificateDer<'_>) -> Result<CertificateParams, String> {
    let params = CertificateParams::from_ca_cert_der(ca_der)
        .map_err(|e| format!("unusable X.509 CA certificate: {e}"))?;
    if !matches!(params.is_ca, IsCa::Ca(_)) {
        return Err("not a CA certificate (basicConstraints cA is not set)".into());
    }
    writable_oids(&params)?;
    Ok(params)
}

/// True if rcgen (yasna) can write `oid`: at least two arcs, the first 0, 1 or 2, the
/// second below 40 unless the first is 2. yasna panics on any other.
fn oid_writable(oid: &[u64]) -> bool {
    match oid {
        [first, second, ..] => {
            *first < 3 && (*first == 2 || *second < 40) && *second < u64::MAX - 80
        }
        _ => false,
    }
}

/// Refuses parameters with an object identifier rcgen cannot write back (found by fuzzing
/// `ClusterCa::from_pem`: a subject attribute type `3.29…` made re-signing the CA panic).
fn writable_oids(params: &CertificateParams) -> Result<(), String> {
    fn names(dn: &DistinguishedName) -> Result<(), String> {
        for (ty, value) in dn.iter() {
            if let DnType::CustomDnType(oid) = ty {
                if !oid_writable(oid) {
                    return Err(format!("unsupported attribute type {oid:?} in a name"));
                }
            }
            // rcgen accepts '?' in a PrintableString, yasna (which writes it) panics on it
            // (found by fuzzing `ClusterCa::from_pem`).
            if let rcgen::DnValue::PrintableString(p) = value {
                if !p.as_str().bytes().all(printable_writable) {
                    return Err(format!(
                        "unsupported character in a PrintableString of a name: {:?}",
                        p.as_str()
                    ));
                }
            }
        }
        Ok(())
    }
    names(&params.distinguished_name)?;
    for usage in &params.extended_key_usages {
        if let ExtendedKeyUsagePurpose::Other(oid) = usage {
            if !oid_writable(oid) {
                return Err(format!("unsupported extended key usage {oid:?}"));
            }
        }
    }
    for san in &params.subject_alt_names {
        if let SanType::OtherName((oid, _)) = san {
            if !oid_writable(oid) {
                return Err(format!("unsupported otherName type {oid:?}"));
            }
        }
    }
    if let Some(constraints) = &params.name_constraints {
        for subtree in constraints
            .permitted_subtrees
            .iter()
            .chain(&constraints.excluded_subtrees)
        {
            if let rcgen::GeneralSubtree::DirectoryName(dn) = subtree {
                names(dn)?;
            }
        }
    }
    Ok(())
}

/// A byte yasna writes in a PrintableString (its writer asserts exactly this set).
fn printable_writable(b: u8) -> bool {
    b == b' ' || ((b'\''..=b':').contains(&b) && b != b'*') || b == b'=' || b.is_ascii_alphabetic()
}

/// For the fuzzers: what the CA loader reads of a CA certificate (DER).
#[cfg(feature = "fuzzing")]
pub(crate) fn parse_ca_cert(cert_der: &[u8]) -> Result<(), String> {
    subject_and_spki(cert_der)?;
    ca_cert_params(&CertificateDer::from(cert_der)).map(|_| ())
}

/// All certificates in a PEM text (empty if none).
fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

impl ClusterCa {
    /// Generates a new self-signed cluster CA (ECDSA P-256, valid for 10 years) whose subject
    /// names `cluster_name`.
    pub fn generate(cluster_name: &str) -> Result<Self, TransportError> {
        if cluster_name.trim().is_empty() {
            return Err(TransportError::CertGeneration {
                reason: "the cluster name is empty".into(),
            });
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "chatd");
        dn.push(
            DnType::CommonName,
            format!("chatd cluster CA {cluster_name}"),
        );
        let mut params = ca_params(dn);
        set_validity(&mut params)?;
        let key = KeyPair::generate().map_err(cert_error)?;
        let cert = params.self_signed(&key).map_err(cert_error)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Loads a CA from its certificate and private key PEM, checking that the key belongs to
    /// the certificate and that certificates can be issued with it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TransportError> {
        let ca = Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        };
        ca.signer()?;
        Ok(ca)
    }

    /// The CA certificate (PEM); distribute it to every node as the trust root.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM); keep it secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a node certificate: SANs DNS `chatd-node`, DNS `node-{node_id}` and `ips`;
    /// usable for both server and client authentication.
    pub fn issue_node(&self, node_id: u64, ips: &[IpAddr]) -> Result<NodeCert, TransportError> {
        let node_name = format!("node-{node_id}");
        let mut sans = vec![
            SanType::DnsName(dns_name(NODE_SERVER_NAME)?),
            SanType::DnsName(dns_name(&node_name)?),
        ];
        sans.extend(ips.iter().copied().map(SanType::IpAddress));
        self.issue(&node_name, sans)
    }

    /// Issues a certificate for a non-node client (e.g. a benchmark tool): SAN DNS `name`;
    /// usable for both server and client authentication. `name` must be a plain DNS name.
    pub fn issue_client(&self, name: &str) -> Result<NodeCert, TransportError> {
        let sans = vec![SanType::DnsName(dns_name(name)?)];
        self.issue(name, sans)
    }

    /// Bundles a certificate issued by this CA into a [`TlsIdentity`] trusting this CA.
    pub fn identity(&self, cert: NodeCert) -> TlsIdentity {
        TlsIdentity {
            ca_cert_pem: self.cert_pem.clone(),
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
        }
    }

    fn issue(&self, common_name: &str, sans: Vec<SanType>) -> Result<NodeCert, TransportError> {
        let (issuer, issuer_key) = self.signer()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params)?;
        let key = KeyPair::generate().map_err(cert_error)?;
        let cert = params
            .signed_by(&key, &issuer, &issuer_key)
            .map_err(cert_error)?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Rebuilds rcgen's view of the CA (its parameters + key) from the PEM texts.
    ///
    /// rcgen can only sign with a `Certificate` it built itself, so the CA certificate is
    /// re-created from the original's parameters (read by rcgen with x509-parser) and key;
    /// the result is checked to encode the same subject, so issued certificates chain to the
    /// original CA certificate.
    fn signer(&self) -> Result<(rcgen::Certificate, KeyPair), TransportError> {
        let invalid_cert = |reason: String| TransportError::InvalidPem {
            what: "CA certificate PEM",
            reason,
        };
        let certs = pem_certs(&self.cert_pem).map_err(invalid_cert)?;
        let ca_der = certs
            .first()
            .ok_or_else(|| invalid_cert("no CERTIFICATE section".into()))?;
        let (subject, spki) = subject_and_spki(ca_der).map_err(invalid_cert)?;
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| TransportError::InvalidPem {
            what: "CA private key PEM",
            reason: e.to_string(),
        })?;
        if key.public_key_der() != spki {
            return Err(TransportError::InvalidPem {
                what: "CA private key PEM",
                reason: "the key does not belong to the CA certificate".into(),
            });
        }
        let params = ca_cert_params(ca_der).map_err(invalid_cert)?;
        let rebuilt = params.self_signed(&key).map_err(cert_error)?;
        if subject_and_spki(rebuilt.der()).ok().map(|(s, _)| s) != Some(subject) {
            return Err(invalid_cert(
                "the subject name uses an encoding this tool cannot reproduce".into(),
            ));
        }
        Ok((rebuilt, key))
    }
}

/// The parsed, DER form of a [`TlsIdentity`].
pub(crate) struct ParsedIdentity {
    pub(crate) roots: Vec<CertificateDer<'static>>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

impl TlsIdentity {
    /// Builds an identity from PEM texts, checking that each holds what it should.
    pub fn from_pem(
        ca_cert_pem: impl Into<String>,
        cert_pem: impl Into<String>,
        key_pem: impl Into<String>,
    ) -> Result<Self, TransportError> {
        let identity = Self {
            ca_cert_pem: ca_cert_pem.into(),
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
        };
        identity.parse()?;
        Ok(identity)
    }

    /// Loads an identity from three PEM files: the cluster CA certificate, this endpoint's
    /// certificate (chain) and its private key. Errors name the offending file.
    pub fn load(
        ca_path: impl AsRef<Path>,
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, TransportError> {
        let ca_cert_pem = read_pem_file(ca_path.as_ref(), Want::Certificate)?;
        let cert_pem = read_pem_file(cert_path.as_ref(), Want::Certificate)?;
        let key_pem = read_pem_file(key_path.as_ref(), Want::PrivateKey)?;
        Ok(Self {
            ca_cert_pem,
            cert_pem,
            key_pem,
        })
    }

    /// Decodes the PEM texts.
    pub(crate) fn parse(&self) -> Result<ParsedIdentity, TransportError> {
        let certs = |what: &'static str, pem: &str| {
            let certs =
                pem_certs(pem).map_err(|reason| TransportError::InvalidPem { what, reason })?;
            if certs.is_empty() {
                return Err(TransportError::InvalidPem {
                    what,
                    reason: "no CERTIFICATE section".into(),
                });
            }
            Ok(certs)
        };
        let roots = certs("CA certificate PEM", &self.ca_cert_pem)?;
        let chain = certs("certificate PEM", &self.cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| {
            TransportError::InvalidPem {
                what: "private key PEM",
                reason: match e {
                    rustls_pki_types::pem::Error::NoItemsFound => {
                        "no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY section".into()
                    }
                    other => other.to_string(),
                },
            }
        })?;
        Ok(ParsedIdentity { roots, chain, key })
    }
}

/// What a PEM file must contain.
#[derive(Clone, Copy)]
enum Want {
    Certificate,
    PrivateKey,
}

/// Reads a PEM file and checks it holds a section of the wanted kind.
fn read_pem_file(path: &Path, want: Want) -> Result<String, TransportError> {
    let path_buf = || PathBuf::from(path);
    let bytes = std::fs::read(path).map_err(|source| TransportError::FileRead {
        path: path_buf(),
        source,
    })?;
    let not_pem = |reason: String| TransportError::NotPem {
        path: path_buf(),
        reason,
    };
    let text = String::from_utf8(bytes).map_err(|_| not_pem("the file is not text".into()))?;
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(e.to_string()))?;
    if sections.is_empty() {
        return Err(not_pem(
            "no recognised \"-----BEGIN ...-----\" section found".into(),
        ));
    }
    let found = sections.iter().any(|(kind, _)| match want {
        Want::Certificate => *kind == SectionKind::Certificate,
        Want::PrivateKey => matches!(
            kind,
            SectionKind::PrivateKey | SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey
        ),
    });
    match (found, want) {
        (true, _) => Ok(text),
        (false, Want::Certificate) => Err(TransportError::NoCertificate { path: path_buf() }),
        (false, Want::PrivateKey) => Err(TransportError::NoPrivateKey { path: path_buf() }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::X509Certificate;

    fn parsed(pem: &str) -> X509Certificate<'static> {
        let der = pem_certs(pem).unwrap().remove(0);
        let der: &'static [u8] = Vec::leak(der.to_vec());
        x509_parser::parse_x509_certificate(der).unwrap().1
    }

    fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(name) => Some(name.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn node_cert_names_and_ca_round_trip() {
        let ca = ClusterCa::generate("unit").unwrap();
        let ca_cert = parsed(ca.cert_pem());
        let node = parsed(
            &ca.issue_node(7, &["10.0.0.7".parse().unwrap()])
                .unwrap()
                .cert_pem,
        );
        assert_eq!(dns_names(&node), vec!["chatd-node", "node-7"]);
        node.verify_signature(Some(ca_cert.public_key())).unwrap();

        // A CA loaded back from its PEM files issues certificates that chain to it.
        let reloaded = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let client = parsed(&reloaded.issue_client("bench-1").unwrap().cert_pem);
        assert_eq!(dns_names(&client), vec!["bench-1"]);
        assert_eq!(client.issuer().as_raw(), ca_cert.subject().as_raw());
        client.verify_signature(Some(ca_cert.public_key())).unwrap();
        let ca_key_id = ca_cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
                _ => None,
            });
        let authority_key_id = client
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|id| id.0)
                }
                _ => None,
            });
        assert!(ca_key_id.is_some());
        assert_eq!(authority_key_id, ca_key_id);
    }

    #[test]
    fn certificates_are_valid_from_two_days_back() {
        // A node whose wall clock is hours behind still accepts a cluster made just now.
        let ca = ClusterCa::generate("unit").unwrap();
        let node = parsed(&ca.issue_node(1, &[]).unwrap().cert_pem);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        for cert in [node, parsed(ca.cert_pem())] {
            let from = cert.validity().not_before.timestamp();
            assert!(from <= now - 47 * 3600, "valid only from {from}, now {now}");
            assert!(from >= now - 49 * 3600, "valid from {from}, now {now}");
        }
    }

    #[test]
    fn a_certificate_that_is_not_a_ca_cannot_sign() {
        let ca = ClusterCa::generate("unit").unwrap();
        let node = ca.issue_node(1, &[]).unwrap();
        let err = ClusterCa::from_pem(&node.cert_pem, &node.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA certificate"), "{err}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let ca = ClusterCa::generate("unit").unwrap();
        let other = ClusterCa::generate("other").unwrap();
        assert!(ClusterCa::from_pem(ca.cert_pem(), other.key_pem()).is_err());
        assert!(ClusterCa::from_pem("junk", ca.key_pem()).is_err());
        assert!(ca.issue_client("not a dns name").is_err());
        assert!(ca.issue_client("").is_err());
        assert!(ClusterCa::generate(" ").is_err());
        assert!(TlsIdentity::from_pem(ca.cert_pem(), ca.key_pem(), ca.key_pem()).is_err());
    }
}
