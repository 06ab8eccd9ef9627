//! rustls configurations for both ends of the mutual-TLS link, and reading the fieldhand
//! identity out of a verified certificate.
//!
//! One crypto stack (rustls + ring) for everything; the provider is passed explicitly so
//! no process-wide default has to be installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::pki::Identity;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {reason}")]
    Certs { path: PathBuf, reason: String },
    #[error("{path} contains no certificate")]
    NoCerts { path: PathBuf },
    #[error("cannot read private key from {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("CA file {path} is not usable as a trust anchor: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("certificate {cert} and key {key} do not form a usable pair: {reason}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{path} carries no fieldhand identity (a URI SAN urn:fieldhand:agent:<id> or urn:fieldhand:operator:<name>)")]
    NoIdentity { path: PathBuf },
}

impl TlsError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            TlsError::Certs { path, .. }
            | TlsError::NoCerts { path }
            | TlsError::Key { path, .. }
            | TlsError::Ca { path, .. }
            | TlsError::NoIdentity { path } => path,
            TlsError::Pair { key, .. } => key,
        }
    }
}

/// A TLS error named by the config key of its file (`tls.cert`, ...).
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {error}")]
pub struct KeyedTlsError {
    pub key: &'static str,
    /// Shown in this error's message, not as its source (a field named `source` would be),
    /// so an error chain prints it once.
    pub error: TlsError,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |e: rustls::pki_types::pem::Error| TlsError::Certs {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(ca)? {
        store.add(c).map_err(|e| TlsError::Ca {
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

/// Server side: a client certificate, when one is sent, must chain to `ca`. A client without
/// one completes the handshake but reaches nothing except enrollment (the router refuses it
/// everything else), so a machine with only a token can ask for its first certificate.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pair_err = |reason: String| TlsError::Pair {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason,
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Ca {
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| pair_err(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| pair_err(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resumption: a reconnecting agent (a kept connection that was closed, a restart) skips
    // the full handshake. TLS 1.3 tickets keep no state per client; the cache covers 1.2.
    // A resumed session carries the verified client certificate, and the router checks its
    // serial against the revocations on every request as for a full handshake.
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| pair_err(e.to_string()))?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(16_384);
    Ok(Arc::new(cfg))
}

/// Client side with a certificate (agents and operators).
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let pair_err = |reason: String| TlsError::Pair {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason,
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| pair_err(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| pair_err(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side without a certificate; the controller must refuse it (used by tests and
/// diagnostics).
pub fn client_config_without_cert(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Ca {
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The identity bound in a certificate: exactly one fieldhand URI SAN, else none.
/// Only meaningful for a certificate rustls has already verified against the CA.
#[allow(clippy::wildcard_enum_match_arm)] // x509 GeneralName: only URIs name an identity
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut found = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with(crate::pki::URI_PREFIX) => {
            Some(Identity::from_uri(u))
        }
        _ => None,
    });
    let first = found.next()?;
    // Two identities in one certificate is ambiguous; treat it as none.
    if found.next().is_some() {
        return None;
    }
    first
}

/// What the controller reads from a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// `None` when the certificate names no (or an ambiguous) fieldhand identity.
    pub identity: Option<Identity>,
    /// The pool bound at issue time (`urn:fieldhand-pool:P`), for hand-issued agent certs.
    pub pool: Option<String>,
    /// Lower-case hex of the serial number: what revocation lists name.
    pub serial: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// Reads identity, pool, serial and validity from a certificate (DER).
#[allow(clippy::wildcard_enum_match_arm)] // x509 GeneralName: only URIs bind a pool
pub fn cert_info(cert: &CertificateDer<'_>) -> Option<CertInfo> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let pool = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => u
                    .strip_prefix(crate::pki::POOL_URI_PREFIX)
                    .filter(|p| crate::pki::validate_name("pool_id", p).is_ok())
                    .map(str::to_string),
                _ => None,
            })
        });
    let validity = parsed.validity();
    Some(CertInfo {
        identity: identity_of(cert),
        pool,
        serial: hex::encode(parsed.raw_serial()),
        not_before_ms: validity.not_before.timestamp() * 1000,
        not_after_ms: validity.not_after.timestamp() * 1000,
    })
}

/// The first certificate of a PEM file, read as [`CertInfo`].
pub fn cert_info_of_file(path: &Path) -> Result<CertInfo, TlsError> {
    let certs = load_certs(path)?;
    cert_info(&certs[0]).ok_or_else(|| TlsError::Certs {
        path: path.to_path_buf(),
        reason: "not an X.509 certificate".into(),
    })
}

pub fn identity_of_file(path: &Path) -> Result<Identity, TlsError> {
    let certs = load_certs(path)?;
    identity_of(&certs[0]).ok_or_else(|| TlsError::NoIdentity {
        path: path.to_path_buf(),
    })
}
