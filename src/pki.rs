//! The fleet's private CA: creating it, issuing agent and operator certificates, and the
//! identity (role + name) that each certificate carries as a URI SAN.
//!
//! Identity lives in the certificate and nowhere else: the controller reads it from the
//! verified peer chain (`tls::identity_of`), never from a request field, so a machine can
//! only act as the name its key was issued for.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::exit::Exit;

/// Prefix of the URI SAN that names a fieldhand identity.
pub const URI_PREFIX: &str = "urn:fieldhand:";
/// Prefix of the URI SAN that binds a hand-issued agent certificate to a pool at issue time
/// (`pki issue --agent ID --pool P`). A separate prefix, so controllers that only know
/// identity URIs still find exactly one of those.
pub const POOL_URI_PREFIX: &str = "urn:fieldhand-pool:";

/// CA lifetime; rotating the CA means re-issuing every machine, so it is long.
const CA_DAYS: i64 = 3650;
/// Leaf lifetime for the controller, agents and operators.
const LEAF_DAYS: i64 = 825;

/// What a certificate holder may do: agents speak the agent protocol, operators the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Operator,
    /// Reads `GET /metrics` and nothing else (a Prometheus scraper).
    Metrics,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Metrics => "metrics",
        }
    }
}

/// A verified principal: who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    pub fn agent(name: impl Into<String>) -> Self {
        Identity {
            role: Role::Agent,
            name: name.into(),
        }
    }

    pub fn operator(name: impl Into<String>) -> Self {
        Identity {
            role: Role::Operator,
            name: name.into(),
        }
    }

    /// The URI SAN this identity is bound to, e.g. `urn:fieldhand:agent:m1`.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}:{}", self.role.as_str(), self.name)
    }

    /// Parses a URI SAN; `None` for anything that is not a well-formed fieldhand identity.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let (role, name) = rest.split_once(':')?;
        let role = match role {
            "agent" => Role::Agent,
            "operator" => Role::Operator,
            "metrics" => Role::Metrics,
            _ => return None,
        };
        validate_name("name", name).ok()?;
        Some(Identity {
            role,
            name: name.to_string(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role.as_str(), self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("invalid {field} {value:?}: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")]
    InvalidName { field: String, value: String },
    #[error("invalid --san {value:?}: {reason}")]
    InvalidSan { value: String, reason: String },
    #[error("{path} already exists; refusing to overwrite it (move it away to re-issue)")]
    Exists { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable CA certificate or key: {reason} (run `fieldhand-controller pki init` first)")]
    BadCa { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate signing request is not usable: {reason}")]
    BadCsr { reason: String },
    #[error("cannot make the PKCS#12 file {path}: {reason}")]
    P12 { path: PathBuf, reason: String },
}

impl PkiError {
    pub fn exit(&self) -> Exit {
        match self {
            PkiError::InvalidName { .. } | PkiError::InvalidSan { .. } => Exit::Usage,
            PkiError::Exists { .. } | PkiError::Write { .. } => Exit::CantCreate,
            PkiError::Read { .. } | PkiError::BadCa { .. } | PkiError::BadCsr { .. } => {
                Exit::DataErr
            }
            PkiError::Generate(_) | PkiError::P12 { .. } => Exit::Software,
        }
    }
}

/// Names (machine ids, operator names, pool ids) share one conservative alphabet so they
/// are safe in file names, URLs and URIs without escaping.
pub fn validate_name(field: &str, value: &str) -> Result<(), PkiError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidName {
            field: field.into(),
            value: value.into(),
        })
    }
}

/// The files `init` wrote.
#[derive(Debug)]
pub struct InitOutcome {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// The issuing CA the controller signs enrollments and renewals with; the root key
    /// (`ca_key`) can then be kept offline.
    pub issuing_cert: PathBuf,
    pub issuing_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = crate::sys::clock::now();
    // Tolerate small clock skew between the CA host and the fleet; a tenth of the lifetime at
    // most, so renewal at two thirds of it still lands after the issue time.
    params.not_before = now - Duration::hours(1).min(lifetime / 10);
    params.not_after = now + lifetime;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
}

fn random_serial() -> [u8; 16] {
    let mut s = [0u8; 16];
    for b in s.iter_mut() {
        *b = fastrand::u8(..);
    }
    s[0] &= 0x7f; // positive
    s[0] |= 0x01; // no leading zero octet
    s
}

/// Creates the CA and the controller's server certificate in `dir`.
pub fn init(dir: &Path, extra_sans: &[String]) -> Result<InitOutcome, PkiError> {
    let out = InitOutcome {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca-key.pem"),
        issuing_cert: dir.join("issuing-ca.pem"),
        issuing_key: dir.join("issuing-ca-key.pem"),
        cert: dir.join("controller.pem"),
        key: dir.join("controller-key.pem"),
    };
    for p in [
        &out.ca_cert,
        &out.ca_key,
        &out.issuing_cert,
        &out.issuing_key,
        &out.cert,
        &out.key,
    ] {
        refuse_existing(p)?;
    }
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for s in extra_sans {
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PkiError::InvalidSan {
                value: s.clone(),
                reason: "must be a DNS name or IP address".into(),
            });
        }
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fieldhand fleet CA");
    // Path length 1: the root signs one level of issuing CA (the controller's), which
    // signs only leaves.
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    ca_params.key_usages = ca_usages();
    validity(&mut ca_params, Duration::days(CA_DAYS));
    let ca = ca_params.self_signed(&ca_key)?;

    let issuing_key = KeyPair::generate()?;
    let mut ip = CertificateParams::new(Vec::<String>::new())?;
    ip.distinguished_name = rcgen::DistinguishedName::new();
    ip.distinguished_name
        .push(DnType::CommonName, "fieldhand issuing CA");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = ca_usages();
    ip.use_authority_key_identifier_extension = true;
    validity(&mut ip, Duration::days(CA_DAYS));
    let issuing = ip.signed_by(&issuing_key, &ca, &ca_key)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans).map_err(|e| PkiError::InvalidSan {
        value: extra_sans.join(","),
        reason: e.to_string(),
    })?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "fieldhand-controller");
    leaf_usages(&mut params, ExtendedKeyUsagePurpose::ServerAuth);
    validity(&mut params, Duration::days(LEAF_DAYS));
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    // Keys first: a crash leaves a key without a cert, which `init` then refuses loudly
    // instead of silently pairing a new cert with an unknown key.
    write_new(&out.ca_key, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&out.ca_cert, ca.pem().as_bytes(), 0o644)?;
    write_new(
        &out.issuing_key,
        issuing_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&out.issuing_cert, issuing.pem().as_bytes(), 0o644)?;
    write_new(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&out.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(out)
}

fn ca_usages() -> Vec<KeyUsagePurpose> {
    vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ]
}

fn leaf_usages(params: &mut CertificateParams, eku: ExtendedKeyUsagePurpose) {
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
}

/// Issues a client certificate for `who`, signed by the CA in `dir`. Returns (cert, key).
/// An agent certificate may carry the pool its machine joins when the controller first
/// hears of it (`pool`); after that only an operator moves it.
pub fn issue(
    dir: &Path,
    who: &Identity,
    pool: Option<&str>,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let field = match who.role {
        Role::Agent => "--agent",
        Role::Operator => "--operator",
        Role::Metrics => "--metrics",
    };
    validate_name(field, &who.name)?;
    if let Some(p) = pool {
        validate_name("--pool", p)?;
    }
    let sub = dir.join(match who.role {
        Role::Agent => "agents",
        Role::Operator => "operators",
        Role::Metrics => "metrics",
    });
    let cert_path = sub.join(format!("{}.pem", who.name));
    let key_path = sub.join(format!("{}-key.pem", who.name));
    refuse_existing(&cert_path)?;
    refuse_existing(&key_path)?;

    let issuer = Issuer::load(&dir.join("ca.pem"), &dir.join("ca-key.pem"))?;
    let key = KeyPair::generate()?;
    let params = leaf_params(who, pool, Duration::days(LEAF_DAYS))?;
    let cert = params.signed_by(&key, &issuer.cert, &issuer.key)?;

    std::fs::create_dir_all(&sub).map_err(|source| PkiError::Write {
        path: sub.clone(),
        source,
    })?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Writes an operator's certificate and key, as issued into `dir`, as one PKCS#12 file
/// (`operators/NAME.p12`, mode 0600) that a browser imports, with the fleet's root CA after
/// the leaf. Encrypted with PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) under a new random
/// password, which is returned: it is shown once and stored nowhere.
pub fn export_p12(dir: &Path, operator: &str) -> Result<(PathBuf, String), PkiError> {
    validate_name("--operator", operator)?;
    let sub = dir.join("operators");
    let path = sub.join(format!("{operator}.p12"));
    refuse_existing(&path)?;
    let bad = |reason: String| PkiError::P12 {
        path: path.clone(),
        reason,
    };
    // Read here, not through `tls` (which reads identities from `pki`): PEM files this
    // module wrote.
    use rustls::pki_types::pem::PemObject;
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| PkiError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let certs = |p: PathBuf| -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, PkiError> {
        let pem = read(&p)?;
        rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::Read {
                path: p.clone(),
                source: std::io::Error::other(e.to_string()),
            })
    };
    let leaf = certs(sub.join(format!("{operator}.pem")))?;
    let ca = certs(dir.join("ca.pem"))?;
    let key_path = sub.join(format!("{operator}-key.pem"));
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|e| {
        PkiError::Read {
            path: key_path.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    #[allow(clippy::wildcard_enum_match_arm)] // rustls' key kinds: `pki issue` writes PKCS#8
    let pkcs8 = match &key {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        _ => return Err(bad(format!("{} is not a PKCS#8 key", key_path.display()))),
    };
    let chain: Vec<p12_keystore::Certificate> = leaf
        .iter()
        .chain(&ca)
        .map(|c| p12_keystore::Certificate::from_der(c.as_ref()))
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let key = p12_keystore::PrivateKey::from_der(&pkcs8).map_err(|e| bad(e.to_string()))?;
    // The local key id ties the key bag to its certificate; any stable bytes do.
    let key_id = ring::digest::digest(&ring::digest::SHA256, leaf[0].as_ref());
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry(
        &format!("fieldhand operator {operator}"),
        p12_keystore::KeyStoreEntry::PrivateKeyChain(p12_keystore::PrivateKeyChain::new(
            key_id.as_ref()[..20].to_vec(),
            key,
            chain,
        )),
    );
    let mut raw = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| bad("no randomness for the password".into()))?;
    let password = hex::encode(raw);
    let der = store
        .writer(&password)
        .encryption_algorithm(p12_keystore::EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .mac_algorithm(p12_keystore::MacAlgorithm::HmacSha256)
        .write()
        .map_err(|e| bad(e.to_string()))?;
    write_new(&path, &der, 0o600)?;
    Ok((path, password))
}

/// The parameters of a client certificate for `who`: the identity (and pool) as URI SANs,
/// client-auth only.
fn leaf_params(
    who: &Identity,
    pool: Option<&str>,
    lifetime: Duration,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, who.to_string());
    params.subject_alt_names = vec![SanType::URI(who.uri().try_into()?)];
    if let (Role::Agent, Some(p)) = (who.role, pool) {
        params
            .subject_alt_names
            .push(SanType::URI(format!("{POOL_URI_PREFIX}{p}").try_into()?));
    }
    leaf_usages(&mut params, ExtendedKeyUsagePurpose::ClientAuth);
    validity(&mut params, lifetime);
    Ok(params)
}

/// A CA that signs certificates: the root for `pki issue`, the issuing CA for the
/// controller's enrollments and renewals.
pub struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The issuer's own certificate when it is not the trust root: sent after the leaf, so
    /// peers that trust only the root can build the chain.
    intermediate_pem: Option<String>,
}

/// A certificate the controller signed.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, then the issuing CA when there is one.
    pub chain_pem: String,
    /// Lower-case hex of the serial number, as [`crate::tls::CertInfo::serial`] reads it.
    pub serial: String,
    pub not_after: OffsetDateTime,
}

impl Issuer {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Issuer, PkiError> {
        let pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let bad = |path: &Path, reason: String| PkiError::BadCa {
            path: path.to_path_buf(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(key_path, e.to_string()))?;
        let params =
            CertificateParams::from_ca_cert_pem(&pem).map_err(|e| bad(cert_path, e.to_string()))?;
        // Re-signing the parsed CA params yields an issuer with the same subject and key,
        // which is all chain building needs; the file on disk stays what peers see.
        let cert = params.self_signed(&key)?;
        let der = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| bad(cert_path, e.to_string()))?
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| bad(cert_path, e.to_string()))?;
        let self_signed = parsed.issuer() == parsed.subject();
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(bad(
                key_path,
                format!("is not the key of {}", cert_path.display()),
            ));
        }
        Ok(Issuer {
            cert,
            key,
            intermediate_pem: (!self_signed).then_some(pem),
        })
    }

    /// Signs a certificate for `who` over the public key of `csr_pem`. Only the key is taken
    /// from the request (its signature proves the requester holds it); the identity, pool
    /// and lifetime are the controller's.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        who: &Identity,
        pool: Option<&str>,
        lifetime: std::time::Duration,
    ) -> Result<Issued, PkiError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            PkiError::BadCsr {
                reason: e.to_string(),
            }
        })?;
        let lifetime = Duration::try_from(lifetime).unwrap_or(Duration::days(LEAF_DAYS));
        csr.params = leaf_params(who, pool, lifetime)?;
        let not_after = csr.params.not_after;
        let serial = csr
            .params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.as_ref()))
            .unwrap_or_default();
        let cert = csr.signed_by(&self.cert, &self.key)?;
        let mut chain_pem = cert.pem();
        if let Some(i) = &self.intermediate_pem {
            chain_pem.push_str(i);
        }
        Ok(Issued {
            chain_pem,
            serial,
            not_after,
        })
    }
}

/// A new key pair and a certificate signing request over it, for enrollment and renewal:
/// `(key_pem, csr_pem)`. The key never leaves the machine; the request carries no identity
/// (the controller decides it).
pub fn new_key_and_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "fieldhand agent");
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Creates the payload signing key pair in `dir`: `signing-key.pem` (PKCS#8, 0600) for the
/// controller's `signing_key`, and `signing-key.pub` (hex) for the agents' `trusted_keys`.
pub fn signing_key(dir: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
    let key_path = dir.join("signing-key.pem");
    let pub_path = dir.join("signing-key.pub");
    refuse_existing(&key_path)?;
    refuse_existing(&pub_path)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    let public = format!("{}\n", hex::encode(key.public_key_raw()));
    write_new(&pub_path, public.as_bytes(), 0o644)?;
    Ok((key_path, pub_path))
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn refuse_existing(path: &Path) -> Result<(), PkiError> {
    if path.symlink_metadata().is_ok() {
        return Err(PkiError::Exists {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Creates `path` exclusively with `mode` from the start, so a key is never briefly
/// world-readable and an existing file is never replaced.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                err(e)
            }
        })?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips_and_rejects_foreign_uris() {
        let id = Identity::agent("m-1.a");
        assert_eq!(id.uri(), "urn:fieldhand:agent:m-1.a");
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        assert_eq!(
            Identity::from_uri("urn:fieldhand:operator:ops"),
            Some(Identity::operator("ops"))
        );
        for bad in [
            "urn:fieldhand:admin:x",
            "urn:fieldhand:agent:",
            "urn:fieldhand:agent:a/b",
            "https://example.com",
            "urn:fieldhand:agent",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "A9", "m1.example-host_2", &"x".repeat(64)] {
            assert!(validate_name("f", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "ä", &"x".repeat(65)] {
            let e = validate_name("machine_id", bad).unwrap_err();
            assert!(e.to_string().contains("machine_id"), "{e}");
        }
    }

    #[test]
    fn init_and_issue_write_private_keys_and_refuse_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = init(dir.path(), &["fleet.example".into()]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out.ca_key), 0o600);
        assert_eq!(mode(&out.key), 0o600);
        let (cert, key) = issue(dir.path(), &Identity::agent("m1"), None).unwrap();
        assert_eq!(cert, dir.path().join("agents/m1.pem"));
        assert_eq!(mode(&key), 0o600);
        let before = std::fs::read(&cert).unwrap();
        let e = issue(dir.path(), &Identity::agent("m1"), None).unwrap_err();
        assert!(matches!(e, PkiError::Exists { .. }), "{e}");
        assert_eq!(std::fs::read(&cert).unwrap(), before);
        let e = init(dir.path(), &[]).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
        let id = crate::tls::identity_of_file(&cert).unwrap();
        assert_eq!(id, Identity::agent("m1"));
    }

    #[test]
    fn the_issuing_ca_signs_a_csr_with_the_controllers_identity_and_pool() {
        let dir = tempfile::tempdir().unwrap();
        let out = init(dir.path(), &[]).unwrap();
        let issuer = Issuer::load(&out.issuing_cert, &out.issuing_key).unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let issued = issuer
            .sign_csr(
                &csr,
                &Identity::agent("m7"),
                Some("pool-a"),
                std::time::Duration::from_secs(60),
            )
            .unwrap();
        let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(issued.chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(certs.len(), 2, "leaf and issuing CA");
        let info = crate::tls::cert_info(&certs[0]).unwrap();
        assert_eq!(info.identity, Some(Identity::agent("m7")));
        assert_eq!(info.pool.as_deref(), Some("pool-a"));
        assert_eq!(info.serial, issued.serial);
        let left = info.not_after_ms - crate::sys::clock::unix_ms(crate::sys::clock::now());
        assert!((0..=61_000).contains(&left), "{left}");
        // A request that is not a CSR is refused with a reason.
        let e = issuer
            .sign_csr(
                "junk",
                &Identity::agent("m7"),
                None,
                std::time::Duration::from_secs(60),
            )
            .unwrap_err();
        assert!(matches!(e, PkiError::BadCsr { .. }), "{e}");
        // The issuing key does not pass for the root's.
        let e = Issuer::load(&out.ca_cert, &out.issuing_key).err().unwrap();
        assert!(e.to_string().contains("is not the key"), "{e}");
    }

    #[test]
    fn issue_without_ca_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = issue(dir.path(), &Identity::operator("ops"), None).unwrap_err();
        assert!(e.to_string().contains("ca.pem"), "{e}");
    }
}
