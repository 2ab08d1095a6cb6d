//! TLS material (ISOLATE.md §9): the TCP listener's certificate, key and
//! client CA, the client side of an `https://` flow endpoint (and of
//! `isolatectl --addr`), and the subject of a verified client certificate
//! for the log. Reads and checks PEM files so that a bad one is a one-line
//! start-up error naming the file; the handshakes are rustls's, through
//! tonic, with the `ring` provider (README "Crates").

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A TLS handshake that has not finished after this is dropped: a client
/// that connects and says nothing must not hold a connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TlsError {
    /// cannot read {what} {path}: {reason}
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// {what} {path} holds no PEM {expected}
    NoPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
}

/// Makes `ring` the process's rustls provider. Call first in `main`: the
/// registry client (reqwest, built without a provider of its own so that
/// aws-lc-rs stays out of the tree) takes the process default, and
/// panics when there is none.
pub fn install_crypto_provider() {
    // Err only when one is installed already, which is what is wanted.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A PEM file that was checked to hold what it should.
fn read_pem(what: &'static str, path: &Path, key: bool) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let ok = if key {
        PrivateKeyDer::from_pem_slice(&bytes).is_ok()
    } else {
        CertificateDer::pem_slice_iter(&bytes)
            .next()
            .is_some_and(|c| c.is_ok())
    };
    if !ok {
        return Err(TlsError::NoPem {
            what,
            path: path.to_owned(),
            expected: if key {
                "private key (PKCS#8, PKCS#1 or SEC1)"
            } else {
                "certificate"
            },
        });
    }
    Ok(bytes)
}

/// The TCP listener's TLS: its identity, and with a client CA, client
/// certificates requested and verified. They stay optional in the
/// handshake: a client without one may connect, and then only gRPC health
/// (and, with tokens, a bearer token) gets it anywhere (`auth`). A
/// certificate that does not verify fails the handshake.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, TlsError> {
    let identity = Identity::from_pem(
        read_pem("tls_cert", cert, false)?,
        read_pem("tls_key", key, true)?,
    );
    let mut config = ServerTlsConfig::new()
        .identity(identity)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(read_pem("tls_client_ca", ca, false)?))
            .client_auth_optional(true);
    }
    Ok(config)
}

/// A client's TLS: the server verified against `ca` (else the system's
/// roots), presenting `identity` (cert, key) when given.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
    names: [&'static str; 3],
) -> Result<ClientTlsConfig, TlsError> {
    let [ca_name, cert_name, key_name] = names;
    let mut config = ClientTlsConfig::new();
    config = match ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read_pem(ca_name, ca, false)?)),
        None => config.with_native_roots(),
    };
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(
            read_pem(cert_name, cert, false)?,
            read_pem(key_name, key, true)?,
        ));
    }
    Ok(config)
}

/// The subject of a (verified) certificate, as a one-line distinguished
/// name for the log; its SHA-256 prefix when it cannot be parsed.
pub fn subject(der: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    match x509_parser::parse_x509_certificate(der.as_ref()) {
        Ok((_, cert)) => {
            let s = cert.subject().to_string();
            if s.is_empty() {
                format!("(empty subject, serial {})", cert.raw_serial_as_string())
            } else {
                crate::text::one_line(&s).into_owned()
            }
        }
        Err(_) => {
            let d = sha2::Sha256::digest(der.as_ref());
            let hex: String = d.iter().take(8).map(|b| format!("{b:02x}")).collect();
            format!("(certificate sha256 {hex}…)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_one_line_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = server_config(&junk, &junk, None).unwrap_err().to_string();
        assert!(e.contains("junk.pem") && e.contains("certificate"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = client_config(Some(&missing), None, ["flow_ca", "c", "k"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("flow_ca") && e.contains("missing.pem"), "{e}");
        assert!(!e.contains('\n'));
    }
}
