//! The transport's parsers of bytes a peer or a file controls. The first byte picks one:
//! 0: what the CA loader reads of a CA certificate (DER): subject name, constraints, key
//!    identifier (rcgen over x509-parser);
//! 1: a stream reset/stop code from a peer (up to 8 bytes, little endian);
//! 2: a TLS identity from three PEM texts (CA, certificate, key), separated by NUL bytes —
//!    what `chatd` loads from its config's tls files;
//! 3: a cluster CA from two PEM texts (certificate, key), separated by a NUL byte — what
//!    `chatd cluster init` loads.
//! Each may fail with a typed error; none may panic.

use chatd_transport::{fuzzing, ClusterCa, TlsIdentity};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else {
            return;
        };
        match mode % 4 {
            0 => {
                let _ = fuzzing::subject_name(rest);
            }
            1 => {
                let mut code = [0u8; 8];
                let n = rest.len().min(8);
                code[..n].copy_from_slice(&rest[..n]);
                let _ = fuzzing::reset_code_error(u64::from_le_bytes(code));
            }
            2 => {
                let Ok(text) = std::str::from_utf8(rest) else {
                    return;
                };
                let mut parts = text.splitn(3, '\0');
                let (ca, cert, key) = (
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or(""),
                );
                let _ = TlsIdentity::from_pem(ca, cert, key);
            }
            _ => {
                let Ok(text) = std::str::from_utf8(rest) else {
                    return;
                };
                let (cert, key) = text.split_once('\0').unwrap_or((text, ""));
                let _ = ClusterCa::from_pem(cert, key);
            }
        }
    });
}
