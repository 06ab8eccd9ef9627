//! The agent's identity: its certificate and key. A machine with only an enrollment token
//! makes its own key (it never leaves the machine), asks the controller to sign it, and
//! carries on without a restart; a certificate is renewed once two thirds of its life have
//! passed; a cloned identity re-enrolls under the machine's own id. Certificate and key are
//! swapped as a pair that survives a crash at any point (both written as `.new` files
//! first, then renamed key first; a start finishes a swap it finds half done).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use tokio::sync::{mpsc, watch, Notify};

use super::backoff::Backoff;
use super::failover::Controllers;
use super::Input;
use crate::config::agent::TokenSource;
use crate::net::NetError;
use crate::proto::agent::{EnrollRequest, Enrolled, RenewRequest};
use crate::proto::status::{IdentityPhase, IdentityStatus};
use crate::sys::clock;
use crate::tls::CertInfo;

/// The `[tls]` files of the agent.
#[derive(Debug, Clone)]
pub struct Files {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl Files {
    fn next(&self) -> (PathBuf, PathBuf) {
        (
            with_suffix(&self.key, ".new"),
            with_suffix(&self.cert, ".new"),
        )
    }

    /// Finishes a swap a crash interrupted: `cert.new` exists only once both new files are
    /// complete, so it is the commit mark. A lone `key.new` is an unfinished write.
    pub fn recover(&self) -> std::io::Result<()> {
        let (key_new, cert_new) = self.next();
        if cert_new.exists() {
            if key_new.exists() {
                std::fs::rename(&key_new, &self.key)?;
            }
            std::fs::rename(&cert_new, &self.cert)?;
            tracing::warn!(cert = %self.cert.display(), "finished a certificate swap interrupted by a crash");
        } else if key_new.exists() {
            std::fs::remove_file(&key_new)?;
        }
        Ok(())
    }

    /// Puts a new key and certificate (chain) in place, atomically as a pair.
    pub fn install(&self, key_pem: &str, cert_pem: &str) -> std::io::Result<()> {
        use crate::sys::fsutil::{atomic_write, ensure_dir, fsync_dir};
        for p in [&self.key, &self.cert] {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                ensure_dir(dir, 0o700)?;
            }
        }
        let (key_new, cert_new) = self.next();
        atomic_write(&key_new, key_pem.as_bytes(), 0o600)?;
        atomic_write(&cert_new, cert_pem.as_bytes(), 0o644)?;
        std::fs::rename(&key_new, &self.key)?;
        std::fs::rename(&cert_new, &self.cert)?;
        for p in [&self.key, &self.cert] {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                fsync_dir(dir)?;
            }
        }
        Ok(())
    }

    /// The certificate in place, if any.
    pub fn current(&self) -> Option<Result<CertInfo, crate::tls::TlsError>> {
        self.cert
            .exists()
            .then(|| crate::tls::cert_info_of_file(&self.cert))
    }

    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, crate::tls::TlsError> {
        crate::tls::client_config(&self.ca, &self.cert, &self.key)
    }
}

#[derive(Debug)]
struct Inner {
    machine_id: String,
    phase: IdentityPhase,
    serial: Option<String>,
    not_after_ms: Option<i64>,
    problem: Option<String>,
}

/// What the agent knows about its identity, shared by the identity task, the link loops and
/// the status socket.
#[derive(Debug)]
pub struct IdentityState {
    inner: Mutex<Inner>,
    /// Asked by the poll loop when the controller reports a cloned identity.
    reenroll: Notify,
    /// Bumped whenever the certificate changes (the poll loop stops waiting out a conflict).
    changed: watch::Sender<u64>,
}

impl IdentityState {
    /// `enrolled`: a certificate is in place at start (its checks follow at once).
    pub fn new(machine_id: String, enrolled: bool) -> Self {
        IdentityState {
            inner: Mutex::new(Inner {
                machine_id,
                phase: if enrolled {
                    IdentityPhase::Enrolled
                } else {
                    IdentityPhase::Enrolling
                },
                serial: None,
                not_after_ms: None,
                problem: None,
            }),
            reenroll: Notify::new(),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn machine_id(&self) -> String {
        self.lock().machine_id.clone()
    }

    pub fn snapshot(&self) -> IdentityStatus {
        let i = self.lock();
        IdentityStatus {
            phase: i.phase,
            certificate_serial: i.serial.clone(),
            certificate_not_after: i
                .not_after_ms
                .and_then(clock::from_unix_ms)
                .map(clock::rfc3339),
            problem: i.problem.clone(),
        }
    }

    /// Records a phase and its reason; logs it when either changed (once, not per retry).
    fn set(&self, phase: IdentityPhase, problem: Option<String>) {
        let mut i = self.lock();
        if i.phase != phase || i.problem != problem {
            match (&problem, phase) {
                (Some(p), _) => tracing::warn!(phase = ?phase, "{p}"),
                (None, IdentityPhase::Enrolled) if i.phase != IdentityPhase::Enrolled => {
                    tracing::info!(machine_id = %i.machine_id, "certificate in place")
                }
                _ => {}
            }
        }
        i.phase = phase;
        i.problem = problem;
    }

    fn enrolled(&self, machine_id: &str, info: &CertInfo) {
        {
            let mut i = self.lock();
            i.machine_id = machine_id.to_string();
            i.serial = Some(info.serial.clone());
            i.not_after_ms = Some(info.not_after_ms);
        }
        self.set(IdentityPhase::Enrolled, None);
    }

    /// The controller refused this identity for work (`IDENTITY_CONFLICT`, revoked).
    pub fn refused(&self, phase: IdentityPhase, why: String) {
        self.set(phase, Some(why));
    }

    /// The controller took this identity again: a conflict that cleared.
    pub fn accepted(&self) {
        let phase = self.lock().phase;
        if matches!(phase, IdentityPhase::Conflict | IdentityPhase::Revoked) {
            self.set(IdentityPhase::Enrolled, None);
        }
    }

    pub fn request_reenroll(&self) {
        self.reenroll.notify_one();
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// What the identity task needs.
pub struct Enroller {
    pub files: Files,
    pub token: Option<TokenSource>,
    /// The id this machine enrolls as (config `machine_id`, else the host name).
    pub own_machine_id: String,
    /// The agent's client: its TLS is swapped when the certificate changes.
    pub client: Controllers,
    /// A client without a certificate, for enrollment (the same replicas and choice).
    pub anon: Controllers,
    pub state: Arc<IdentityState>,
    pub ready: watch::Sender<bool>,
    pub inputs: mpsc::Sender<Input>,
    /// `true` while an assignment runs or waits, from the core.
    pub busy: watch::Receiver<bool>,
    pub outbox: Arc<Mutex<super::store::Outbox>>,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

/// Why the agent has no usable certificate yet, or could not get a fresh one: shown in
/// `fieldhand status` and the journal, retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no certificate at {path} and no enrollment token configured (enrollment_token_file)")]
    NoToken { path: PathBuf },
    #[error("cannot read enrollment_token_file {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a key and its CSR: {0}")]
    Key(#[from] crate::pki::PkiError),
    /// The controller answered with an error (`INVALID_TOKEN`, `MACHINE_ID_TAKEN`, ...).
    #[error("{what} refused: {code}: {msg}")]
    Refused {
        what: &'static str,
        code: String,
        msg: String,
    },
    #[error("{what} failed: {source}")]
    Net {
        what: &'static str,
        source: NetError,
    },
    #[error("cannot write {path}: {source}")]
    Install {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate {path} {reason}")]
    Certificate { path: PathBuf, reason: String },
}

fn read_token(src: &TokenSource) -> Result<String, IdentityError> {
    match src {
        TokenSource::Inline(t) => Ok(t.clone()),
        TokenSource::File(p) => std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .map_err(|source| IdentityError::Token {
                path: p.clone(),
                source,
            }),
    }
}

fn refused(what: &'static str, e: NetError) -> IdentityError {
    match e {
        NetError::Status {
            error_code,
            error_msg,
            ..
        } => IdentityError::Refused {
            what,
            code: error_code,
            msg: error_msg,
        },
        source @ (NetError::BadUrl { .. }
        | NetError::Connect { .. }
        | NetError::Tls { .. }
        | NetError::Http { .. }
        | NetError::Timeout { .. }
        | NetError::Busy { .. }
        | NetError::Decode { .. }
        | NetError::Encode { .. }) => IdentityError::Net { what, source },
    }
}

/// Renewal is due once two thirds of the certificate's life have passed.
pub fn renew_at_ms(info: &CertInfo) -> i64 {
    info.not_before_ms + (info.not_after_ms - info.not_before_ms) * 2 / 3
}

impl Enroller {
    /// Runs until `stop`: keeps a valid certificate in place.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        let mut installed: Option<String> = None;
        loop {
            let wait = match self.files.current() {
                None => match self.enroll(&self.own_machine_id).await {
                    Ok(()) => {
                        backoff.reset();
                        continue;
                    }
                    Err(why) => {
                        self.state
                            .set(IdentityPhase::Enrolling, Some(why.to_string()));
                        // An unreachable replica: the next one is tried soon, not after
                        // this loop's backoff.
                        if let IdentityError::Net { source, .. } = &why {
                            self.anon.retry_wait(source, &mut backoff)
                        } else {
                            backoff.next_delay()
                        }
                    }
                },
                Some(Err(e)) => {
                    self.state
                        .set(IdentityPhase::CertificateInvalid, Some(e.to_string()));
                    backoff.next_delay()
                }
                Some(Ok(info)) => match self.check(&info) {
                    Err(why) => {
                        self.state
                            .set(IdentityPhase::CertificateInvalid, Some(why.to_string()));
                        // An expired certificate cannot renew itself; a token re-enrolls it.
                        let name = info.identity.as_ref().map(|i| i.name.clone());
                        if let (Some(_), Some(name)) = (&self.token, name) {
                            if let Err(e) = self.enroll(&name).await {
                                self.state.set(
                                    IdentityPhase::CertificateInvalid,
                                    Some(format!("{why}; {e}")),
                                );
                            }
                        }
                        backoff.next_delay()
                    }
                    Ok(name) => {
                        if installed.as_deref() != Some(info.serial.as_str()) {
                            match self.files.client_config() {
                                Ok(tls) => self.client.set_tls(tls),
                                Err(e) => {
                                    self.state.set(
                                        IdentityPhase::CertificateInvalid,
                                        Some(e.to_string()),
                                    );
                                    if sleep_or_stop(backoff.next_delay(), &mut stop).await {
                                        return;
                                    }
                                    continue;
                                }
                            }
                            installed = Some(info.serial.clone());
                            self.state.enrolled(&name, &info);
                            self.state.changed.send_modify(|g| *g += 1);
                            let _ = self.inputs.send(Input::Identity(name.clone())).await;
                            let _ = self.ready.send(true);
                        }
                        backoff.reset();
                        match self.wait_for_renewal(&info, &name, &mut stop).await {
                            Wake::Stop => return,
                            Wake::Again => continue,
                            Wake::Retry(d) => d,
                        }
                    }
                },
            };
            if sleep_or_stop(wait, &mut stop).await {
                return;
            }
        }
    }

    /// The identity name if the certificate is usable now, else why not.
    fn check(&self, info: &CertInfo) -> Result<String, IdentityError> {
        let now = clock::unix_ms(clock::now());
        let at = |ms: i64| {
            clock::from_unix_ms(ms)
                .map(clock::rfc3339)
                .unwrap_or_default()
        };
        let bad = |reason: String| IdentityError::Certificate {
            path: self.files.cert.clone(),
            reason,
        };
        let Some(id) = info
            .identity
            .as_ref()
            .filter(|i| i.role == crate::pki::Role::Agent)
        else {
            return Err(bad("names no agent identity".into()));
        };
        if now >= info.not_after_ms {
            return Err(bad(format!(
                "expired at {}; renew or re-enroll it",
                at(info.not_after_ms)
            )));
        }
        if now < info.not_before_ms {
            return Err(bad(format!(
                "is not valid before {} (check this machine's clock)",
                at(info.not_before_ms)
            )));
        }
        Ok(id.name.clone())
    }

    /// Sleeps until renewal is due (then renews), or until a re-enrollment is asked for.
    async fn wait_for_renewal(
        &self,
        info: &CertInfo,
        name: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Wake {
        let now = clock::unix_ms(clock::now());
        let due = Duration::from_millis((renew_at_ms(info) - now).max(0) as u64);
        tokio::select! {
            _ = stop.changed() => return Wake::Stop,
            _ = self.state.reenroll.notified() => {
                if self.token.is_none() || self.own_machine_id == name {
                    // Nothing this machine can do by itself: the poll loop keeps waiting.
                    return Wake::Retry(self.retry_max);
                }
                // What this agent holds under the old identity finishes and reports once
                // (the controller still takes its results) before the identity changes.
                if self.drain(stop).await {
                    return Wake::Stop;
                }
                tracing::warn!(from = %name, to = %self.own_machine_id, "re-enrolling under this machine's own id: the certificate in place is another machine's");
                return match self.enroll(&self.own_machine_id).await {
                    Ok(()) => Wake::Again,
                    Err(why) => {
                        self.state.set(IdentityPhase::Conflict, Some(why.to_string()));
                        Wake::Retry(self.retry_max)
                    }
                };
            }
            _ = tokio::time::sleep(due) => {}
        }
        match self.renew().await {
            Ok(()) => Wake::Again,
            Err(e) => {
                let until = clock::from_unix_ms(info.not_after_ms)
                    .map(clock::rfc3339)
                    .unwrap_or_default();
                self.state.set(
                    IdentityPhase::Enrolled,
                    Some(format!(
                        "{e}; retrying, the current certificate is valid until {until}"
                    )),
                );
                // Retry well before the old one runs out, never in a hot loop.
                let left = (info.not_after_ms - clock::unix_ms(clock::now())).max(0) as u64;
                Wake::Retry(
                    self.retry_max
                        .min(Duration::from_millis(left / 4).max(Duration::from_millis(200))),
                )
            }
        }
    }

    /// Waits until nothing runs or waits and the outbox is empty; `true` if stopped first.
    async fn drain(&self, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            let pending = super::store::Outbox::pending_events(&self.outbox);
            if !*self.busy.borrow() && pending == 0 {
                return false;
            }
            if sleep_or_stop(Duration::from_millis(200), stop).await {
                return true;
            }
        }
    }

    async fn enroll(&self, machine_id: &str) -> Result<(), IdentityError> {
        let Some(src) = &self.token else {
            return Err(IdentityError::NoToken {
                path: self.files.cert.clone(),
            });
        };
        let token = read_token(src)?;
        let (key, csr) = crate::pki::new_key_and_csr()?;
        let req = EnrollRequest {
            token,
            machine_id: machine_id.to_string(),
            csr_pem: csr,
        };
        let got: Enrolled = self
            .anon
            .json(
                Method::POST,
                "/agent/v1/enroll",
                Some(&req),
                Duration::from_secs(30),
            )
            .await
            .map_err(|e| refused("enrollment", e))?;
        self.files
            .install(&key, &got.certificate_pem)
            .map_err(|source| IdentityError::Install {
                path: self.files.cert.clone(),
                source,
            })?;
        tracing::info!(machine_id = %got.machine_id, pool_id = ?got.pool_id, serial = %got.serial, not_after = %got.not_after, "enrolled");
        Ok(())
    }

    async fn renew(&self) -> Result<(), IdentityError> {
        let (key, csr) = crate::pki::new_key_and_csr()?;
        let got: Enrolled = self
            .client
            .json(
                Method::POST,
                "/agent/v1/renew",
                Some(&RenewRequest { csr_pem: csr }),
                Duration::from_secs(30),
            )
            .await
            .map_err(|e| refused("certificate renewal", e))?;
        self.files
            .install(&key, &got.certificate_pem)
            .map_err(|source| IdentityError::Install {
                path: self.files.cert.clone(),
                source,
            })?;
        tracing::info!(serial = %got.serial, not_after = %got.not_after, "certificate renewed");
        Ok(())
    }
}

enum Wake {
    Stop,
    /// Look at the certificate again now (it changed).
    Again,
    Retry(Duration),
}

async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_swap_is_finished_and_a_half_written_one_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("agent.pem"),
            key: dir.path().join("agent-key.pem"),
        };
        std::fs::write(&files.cert, "old cert").unwrap();
        std::fs::write(&files.key, "old key").unwrap();
        let (key_new, cert_new) = files.next();
        // Crash after the key was renamed, before the certificate was.
        std::fs::write(&cert_new, "new cert").unwrap();
        std::fs::write(&files.key, "new key").unwrap();
        files.recover().unwrap();
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), "new cert");
        assert_eq!(std::fs::read_to_string(&files.key).unwrap(), "new key");
        // Crash while the new pair was being written: the old pair stays.
        std::fs::write(&key_new, "partial").unwrap();
        files.recover().unwrap();
        assert!(!key_new.exists());
        assert_eq!(std::fs::read_to_string(&files.key).unwrap(), "new key");
        files.install("k2", "c2").unwrap();
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), "c2");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn renewal_is_due_at_two_thirds() {
        let info = CertInfo {
            identity: None,
            pool: None,
            serial: "1".into(),
            not_before_ms: 1_000,
            not_after_ms: 4_000,
        };
        assert_eq!(renew_at_ms(&info), 3_000);
    }
}
