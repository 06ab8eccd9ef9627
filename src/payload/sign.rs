//! ed25519 signatures over payload manifests: the controller signs `{sha256, size, name,
//! expires_at}`, and agents verify against their configured trusted keys.

use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

use crate::proto::agent::PayloadManifest;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot read signing key {path}: {reason}")]
    Load { path: PathBuf, reason: String },
}

/// The controller's signing key.
pub struct Signer {
    key: Ed25519KeyPair,
}

impl Signer {
    /// Loads a PKCS#8 PEM ed25519 key, as written by `fieldhand-controller pki signing-key`.
    pub fn load(path: &Path) -> Result<Self, SignError> {
        let err = |reason: String| SignError::Load {
            path: path.to_path_buf(),
            reason,
        };
        let der = PrivateKeyDer::from_pem_file(path).map_err(|e| err(e.to_string()))?;
        let PrivateKeyDer::Pkcs8(p8) = der else {
            return Err(err("not a PKCS#8 key".into()));
        };
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(p8.secret_pkcs8_der())
            .map_err(|e| err(format!("not an ed25519 key: {e}")))?;
        Ok(Signer { key })
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.key.public_key().as_ref())
    }

    /// Hex signature over the manifest's canonical bytes.
    pub fn sign(&self, m: &PayloadManifest) -> String {
        hex::encode(self.key.sign(&manifest_bytes(m)).as_ref())
    }
}

/// The exact bytes that are signed: the manifest as serde_json writes it (field order fixed
/// by the struct).
pub fn manifest_bytes(m: &PayloadManifest) -> Vec<u8> {
    serde_json::to_vec(m).unwrap_or_default()
}

/// Whether any trusted key verifies `sig_hex` over the manifest.
pub fn verify(trusted: &[[u8; 32]], m: &PayloadManifest, sig_hex: &str) -> bool {
    let Ok(sig) = hex::decode(sig_hex) else {
        return false;
    };
    let msg = manifest_bytes(m);
    trusted.iter().any(|k| {
        UnparsedPublicKey::new(&ED25519, k)
            .verify(&msg, &sig)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_the_same_manifest_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = crate::pki::signing_key(dir.path()).unwrap();
        let s = Signer::load(&key).unwrap();
        let pk_hex = std::fs::read_to_string(&public).unwrap();
        assert_eq!(pk_hex.trim(), s.public_hex());
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&hex::decode(pk_hex.trim()).unwrap());
        let m = PayloadManifest {
            sha256: "ab".repeat(32),
            size: 10,
            name: "tools".into(),
            expires_at: "2030-01-01T00:00:00.000Z".into(),
        };
        let sig = s.sign(&m);
        assert!(verify(&[pk], &m, &sig));
        let mut other = m.clone();
        other.size = 11;
        assert!(!verify(&[pk], &other, &sig));
        assert!(!verify(&[[7u8; 32]], &m, &sig));
        assert!(!verify(&[pk], &m, "zz"));
    }
}
