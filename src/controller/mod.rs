//! The controller: an HTTPS server (mutual TLS only) with the operator API and the agent
//! protocol, a SQLite store, and a reaper that declares silent machines unreachable.
//!
//! `serve` validates and binds; `run` takes a bound listener and a shutdown future (mini-redis
//! style), so tests and the quickstart drive the same code as the daemon.

pub mod agent_api;
pub mod api;
pub mod blobs;
pub mod engine;
pub mod errors;
pub mod identity;
pub mod images;
pub mod kinds;
pub mod progress;
pub mod quickstart;
pub mod rebuild;
pub mod rollout;
pub mod settings;
pub mod software;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::config::controller::ControllerConfig;
use crate::net::server::{error_response, json_response, read_body, Handler, Peer};
use crate::net::Body;
use crate::pki::{Identity, Role};

use crate::sys::clock;
use errors::ApiError;
use store::Store;

/// Largest request body accepted (scripts are capped at 1 MiB; JSON escaping can double that).
const BODY_LIMIT: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot create data_dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    TlsFile(#[from] crate::tls::KeyedTlsError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Signing(#[from] crate::payload::sign::SignError),
    #[error("[enrollment] issuing CA: {0}")]
    Issuer(#[from] crate::pki::PkiError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    ListenAddr {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
}

/// Shared state of a running controller.
pub struct Controller {
    store: Store,
    blobs: blobs::BlobStore,
    signer: Option<crate::payload::sign::Signer>,
    cfg: ControllerConfig,
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    shutdown: watch::Receiver<bool>,
    /// The CA enrollments and renewals are signed with, if configured.
    issuer: Option<Arc<crate::pki::Issuer>>,
    revoked: identity::Revoked,
    enroll_limit: identity::RateLimit,
}

/// `403 CERT_REVOKED`.
pub fn revoked_error() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        identity::CERT_REVOKED,
        "this certificate has been revoked",
    )
}

impl Controller {
    fn waiter(&self, machine_id: &str) -> Arc<Notify> {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        w.entry(machine_id.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Machines with a long-poll open right now: online however long ago the poll began. A
    /// poll holds a clone of its machine's `Notify` for as long as it is open.
    pub fn polling(&self) -> std::collections::HashSet<String> {
        let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        w.iter()
            .filter(|(_, n)| Arc::strong_count(n) > 1)
            .map(|(m, _)| m.clone())
            .collect()
    }

    /// Wakes the long-polls of these machines (after the change they need to see committed).
    fn wake(&self, machine_ids: &[String]) {
        let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for m in machine_ids {
            if let Some(n) = w.get(m) {
                n.notify_waiters();
            }
        }
    }

    /// Every blob digest something still needs.
    async fn referenced_blobs(&self) -> Result<std::collections::HashSet<String>, ApiError> {
        let (images, docs) = self.store.tx(|tx| tx.blob_referrers()).await?;
        let mut set: std::collections::HashSet<String> = images.into_iter().collect();
        for d in &docs {
            blobs::digests_in(d, &mut set);
        }
        Ok(set)
    }

    /// `DELETE /v1/blobs/{sha256}`: only a blob nothing refers to.
    async fn delete_blob(
        &self,
        sha: &str,
        by: &Identity,
    ) -> Result<crate::proto::api::Blob, ApiError> {
        if !blobs::valid_sha256(sha) {
            return Err(ApiError::invalid(format!(
                "sha256 {sha:?} is not 64 lower-case hex digits"
            )));
        }
        if self.referenced_blobs().await?.contains(sha) {
            return Err(ApiError::conflict(format!(
                "blob {sha} is in use (by an image, a host's desired software, or a running task)"
            )));
        }
        match self.blobs.remove(sha)? {
            Some(size) => {
                tracing::info!(sha256 = sha, size, %by, "blob deleted");
                Ok(crate::proto::api::Blob {
                    sha256: sha.to_string(),
                    size,
                    bytes_served: None,
                })
            }
            None => Err(ApiError::not_found(
                "NOT_FOUND",
                format!("no blob with sha256 {sha}"),
            )),
        }
    }

    async fn route(&self, req: Request<Incoming>, peer: Peer) -> Result<Response<Body>, ApiError> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let Some(cert) = peer.cert.clone() else {
            // No client certificate: enrollment is the only thing such a client can do.
            if method == Method::POST && segs == ["agent", "v1", "enroll"] {
                let body = read_body(req.into_body(), 64 * 1024).await.map_err(|e| {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "REQUEST_TOO_LARGE",
                        e.to_string(),
                    )
                })?;
                let enrolled = identity::enroll(self, &body).await?;
                return Ok(json_response(StatusCode::OK, &enrolled));
            }
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "CERTIFICATE_REQUIRED",
                format!("{method} {path} needs a client certificate; without one only POST /agent/v1/enroll is served"),
            ));
        };
        if self.revoked.contains(&cert.serial) {
            return Err(revoked_error());
        }
        let Some(peer) = cert.identity.clone() else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                "the client certificate carries no urn:fieldhand identity",
            ));
        };
        let area = match segs.first() {
            Some(&"agent") => Role::Agent,
            Some(&"v1") => Role::Operator,
            _ => {
                return Err(ApiError::not_found(
                    "NOT_FOUND",
                    format!("no route for {path}"),
                ))
            }
        };
        if peer.role != area {
            let allowed = match peer.role {
                Role::Agent => "agent certificates may only use the agent protocol (/agent/v1)",
                Role::Operator => "operator certificates may only use the operator API (/v1)",
            };
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                format!("{peer} may not call {path}: {allowed}"),
            ));
        }
        let call = match area {
            Role::Agent => {
                let header = req
                    .headers()
                    .get(crate::proto::agent::SESSION_HEADER)
                    .map(|v| v.to_str().unwrap_or("\u{fffd}"));
                Some(identity::AgentCall {
                    machine_id: peer.name.clone(),
                    cert: cert.clone(),
                    session: identity::Session::from_header(header)?,
                })
            }
            Role::Operator => None,
        };
        let ok = |v: &dyn erased::Json| Ok(v.respond(StatusCode::OK));
        // Payload routes stream their bodies instead of buffering them.
        match (area, &method, &segs[1..]) {
            (Role::Operator, &Method::POST, ["blobs"]) => {
                let declared = req
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                let blob = self
                    .blobs
                    .upload(req.into_body(), declared, self.cfg.body_timeout)
                    .await?;
                tracing::info!(sha256 = %blob.sha256, size = blob.size, by = %peer, "blob stored");
                return ok(&blob);
            }
            (Role::Agent, &Method::GET, ["v1", "blobs", sha]) => {
                // An agent sees only its own work: a blob is served only while one of its
                // in-flight assignments references it.
                let (blob, quiet, now) = (
                    sha.to_string(),
                    self.cfg.identity_conflict_quiet,
                    clock::unix_ms(clock::now()),
                );
                let c = call.clone().expect("agent area has a call");
                let allowed = blobs::valid_sha256(sha)
                    && self
                        .store
                        .tx(move |tx| {
                            identity::gate(tx, &c, None, now, quiet)?;
                            Ok::<_, ApiError>(tx.assigned_blob(&c.machine_id, &blob)?)
                        })
                        .await?;
                if !allowed {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "FORBIDDEN",
                        format!("{peer} has no assignment in flight that uses blob {sha}"),
                    ));
                }
                return self.blobs.download(sha, req.headers());
            }
            (Role::Operator, &Method::GET, ["blobs", sha]) => return ok(&self.blobs.info(sha)?),
            (Role::Operator, &Method::DELETE, ["blobs", sha]) => {
                return ok(&self.delete_blob(sha, &peer).await?)
            }
            _ => {}
        }
        let body = if matches!(method, Method::POST | Method::PUT) {
            let read = read_body(req.into_body(), BODY_LIMIT);
            tokio::time::timeout(self.cfg.body_timeout, read)
                .await
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "REQUEST_TIMEOUT",
                        format!(
                            "the request body did not arrive within {} s (request_body_timeout_seconds)",
                            self.cfg.body_timeout.as_secs()
                        ),
                    )
                })?
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "REQUEST_TOO_LARGE",
                        e.to_string(),
                    )
                })?
        } else {
            bytes::Bytes::new()
        };
        if let Some(call) = call {
            return match (&method, &segs[1..]) {
                (&Method::POST, ["v1", "heartbeat"]) => {
                    agent_api::heartbeat(self, call, &body).await?;
                    Ok(empty(StatusCode::NO_CONTENT))
                }
                (&Method::POST, ["v1", "poll"]) => ok(&agent_api::poll(self, call, &body).await?),
                (&Method::POST, ["v1", "events"]) => {
                    ok(&agent_api::events(self, call, &body).await?)
                }
                (&Method::GET, ["v1", "assignments", id]) => {
                    ok(&agent_api::get_assignment(self, call, id.to_string()).await?)
                }
                (&Method::POST, ["v1", "renew"]) => ok(&identity::renew(self, call, &body).await?),
                _ => Err(no_route(&method, &path, &segs)),
            };
        }
        match (area, &method, &segs[1..]) {
            (Role::Operator, &Method::POST, ["enrollment-tokens"]) => {
                ok(&identity::create_token(self, &peer, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::GET, ["enrollment-tokens"]) => {
                ok(&identity::list_tokens(self).await?)
            }
            (Role::Operator, &Method::DELETE, ["enrollment-tokens", id]) => {
                ok(&identity::delete_token(self, &peer, id.to_string()).await?)
            }
            (Role::Operator, &Method::PUT, ["machines", id, "pool"]) => {
                identity::move_machine(self, &peer, id.to_string(), errors::parse_json(&body)?)
                    .await?;
                ok(&api::get_machine(self, id.to_string()).await?)
            }
            (Role::Operator, &Method::DELETE, ["machines", id]) => {
                ok(&identity::decommission(self, &peer, id.to_string()).await?)
            }
            (Role::Operator, &Method::POST, ["revocations"]) => {
                ok(&identity::revoke(self, &peer, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::GET, ["revocations"]) => {
                ok(&identity::list_revocations(self).await?)
            }
            (Role::Operator, &Method::POST, ["scripts"]) => {
                ok(&api::create_script(self, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::POST, ["pools", pool, "script-executions"]) => ok(
                &api::create_execution(self, pool.to_string(), errors::parse_json(&body)?).await?,
            ),
            (Role::Operator, &Method::GET, ["tasks", id]) => {
                ok(&api::get_task(self, id.to_string()).await?)
            }
            (Role::Operator, &Method::POST, ["tasks", id, "cancel"]) => {
                ok(&api::cancel_task(self, id.to_string()).await?)
            }
            (Role::Operator, &Method::GET, ["machines"]) => ok(&api::list_machines(self).await?),
            (Role::Operator, &Method::GET, ["settings"]) => {
                ok(&settings::get_settings(self).await?)
            }
            (Role::Operator, &Method::POST, ["images"]) => {
                ok(&images::create_image(self, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::GET, ["images"]) => ok(&images::list_images(self).await?),
            (Role::Operator, &Method::POST, ["pools", pool, "push-image"]) => {
                ok(&images::push(self, pool.to_string(), errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::POST, ["pools", pool, "push-image", "cancel"]) => {
                ok(&images::cancel_push(self, pool.to_string()).await?)
            }
            (Role::Operator, &Method::GET, ["pools", pool, "provisioning-status"]) => {
                ok(&images::provisioning_status(self, pool.to_string()).await?)
            }
            (Role::Operator, &Method::DELETE, ["pools", pool, "image"]) => {
                ok(&images::unpublish(self, pool.to_string()).await?)
            }
            (Role::Operator, &Method::POST, ["desktops", "rebuild"]) => {
                ok(&rebuild::rebuild(self, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::GET, ["machines", id]) => {
                ok(&api::get_machine(self, id.to_string()).await?)
            }
            (Role::Operator, &Method::PUT, ["settings"]) => {
                ok(&settings::put_settings(self, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::PUT, ["hosts", id, "software", "desired"]) => ok(
                &software::put_desired(self, id.to_string(), errors::parse_json(&body)?).await?,
            ),
            (Role::Operator, &Method::POST, ["hosts", id, "software", "stage"]) => {
                let req = if body.iter().all(u8::is_ascii_whitespace) {
                    Default::default()
                } else {
                    errors::parse_json(&body)?
                };
                ok(&software::stage(self, id.to_string(), req).await?)
            }
            (Role::Operator, &Method::GET, ["hosts", id, "software"]) => {
                ok(&software::host_software(self, id.to_string()).await?)
            }
            _ => Err(no_route(&method, &path, &segs)),
        }
    }
}

/// Every route, as `(method, path pattern)` (`*`: one segment of any value): what a known
/// path with the wrong method is told it allows. Keep it in step with `Controller::route`
/// (`tests/it/validation.rs` checks every operator route against it).
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "agent/v1/enroll"),
    ("POST", "agent/v1/heartbeat"),
    ("POST", "agent/v1/poll"),
    ("POST", "agent/v1/events"),
    ("POST", "agent/v1/renew"),
    ("GET", "agent/v1/assignments/*"),
    ("GET", "agent/v1/blobs/*"),
    ("POST", "v1/blobs"),
    ("GET", "v1/blobs/*"),
    ("DELETE", "v1/blobs/*"),
    ("POST", "v1/scripts"),
    ("POST", "v1/pools/*/script-executions"),
    ("GET", "v1/tasks/*"),
    ("POST", "v1/tasks/*/cancel"),
    ("GET", "v1/machines"),
    ("GET", "v1/machines/*"),
    ("DELETE", "v1/machines/*"),
    ("PUT", "v1/machines/*/pool"),
    ("GET", "v1/settings"),
    ("PUT", "v1/settings"),
    ("POST", "v1/images"),
    ("GET", "v1/images"),
    ("POST", "v1/pools/*/push-image"),
    ("POST", "v1/pools/*/push-image/cancel"),
    ("GET", "v1/pools/*/provisioning-status"),
    ("DELETE", "v1/pools/*/image"),
    ("POST", "v1/desktops/rebuild"),
    ("PUT", "v1/hosts/*/software/desired"),
    ("POST", "v1/hosts/*/software/stage"),
    ("GET", "v1/hosts/*/software"),
    ("POST", "v1/enrollment-tokens"),
    ("GET", "v1/enrollment-tokens"),
    ("DELETE", "v1/enrollment-tokens/*"),
    ("POST", "v1/revocations"),
    ("GET", "v1/revocations"),
];

/// 405 with the methods the path allows, or 404 for a path no route has.
fn no_route(method: &Method, path: &str, segs: &[&str]) -> ApiError {
    let allowed: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, pattern)| {
            let p: Vec<&str> = pattern.split('/').collect();
            p.len() == segs.len() && p.iter().zip(segs).all(|(a, b)| *a == "*" || a == b)
        })
        .map(|(m, _)| *m)
        .collect();
    if allowed.is_empty() {
        return ApiError::not_found("NOT_FOUND", format!("no route for {method} {path}"));
    }
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!(
            "{method} is not allowed on {path}; allowed: {}",
            allowed.join(", ")
        ),
    )
}

/// Lets `route` answer any wire type with one helper without boxing at every call site.
mod erased {
    use super::*;
    pub trait Json {
        fn respond(&self, status: StatusCode) -> Response<Body>;
    }
    impl<T: serde::Serialize> Json for T {
        fn respond(&self, status: StatusCode) -> Response<Body> {
            json_response(status, self)
        }
    }
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(crate::net::full(bytes::Bytes::new()));
    *r.status_mut() = status;
    r
}

/// The router as seen by the HTTPS server.
pub struct Router(Arc<Controller>);

impl Handler for Router {
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: Peer,
    ) -> impl Future<Output = Response<Body>> + Send {
        let ctl = self.0.clone();
        async move {
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            match ctl.route(req, peer).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(%method, %path, status = %e.status, code = e.code, msg = %e.msg, "request refused");
                    let allow = (e.status == StatusCode::METHOD_NOT_ALLOWED)
                        .then(|| e.msg.rsplit_once("allowed: ").map(|(_, a)| a.to_string()))
                        .flatten();
                    let mut r = error_response(e.status, e.code, e.msg);
                    if let Some(v) = allow.and_then(|a| http::HeaderValue::from_str(&a).ok()) {
                        r.headers_mut().insert(http::header::ALLOW, v);
                    }
                    if e.status == StatusCode::TOO_MANY_REQUESTS {
                        r.headers_mut().insert(
                            http::header::RETRY_AFTER,
                            http::HeaderValue::from_static("1"),
                        );
                    }
                    r
                }
            }
        }
    }
}

/// Validates everything that can be validated, binds `cfg.listen`, records the bound address in
/// `data_dir/listen-addr`, and runs until `shutdown` completes.
pub async fn serve(
    cfg: ControllerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ControllerError> {
    crate::sys::fsutil::ensure_dir(&cfg.data_dir, 0o700).map_err(|source| {
        ControllerError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        }
    })?;
    let tls = crate::tls::server_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)
        .map_err(|e| cfg.tls.explain(e))?;
    let signer = match &cfg.signing_key {
        Some(p) => Some(crate::payload::sign::Signer::load(p)?),
        None => None,
    };
    let issuer = match &cfg.issuing {
        Some((cert, key)) => Some(Arc::new(crate::pki::Issuer::load(cert, key)?)),
        None => None,
    };
    let blobs = blobs::BlobStore::open(&cfg.data_dir, cfg.blobs).map_err(|source| {
        ControllerError::DataDir {
            path: cfg.data_dir.join("blobs"),
            source,
        }
    })?;
    let store = Store::open(&cfg.database)?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ControllerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ControllerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr_file = cfg.data_dir.join("listen-addr");
    crate::sys::fsutil::atomic_write(&addr_file, format!("{addr}\n").as_bytes(), 0o644).map_err(
        |source| ControllerError::ListenAddr {
            path: addr_file.clone(),
            source,
        },
    )?;
    tracing::info!(%addr, database = %cfg.database.display(), "controller listening");
    let parts = Parts {
        store,
        blobs,
        signer,
        issuer,
    };
    run(cfg, parts, listener, tls, shutdown).await
}

/// What `serve` opens and checks before it binds.
pub struct Parts {
    pub store: Store,
    pub blobs: blobs::BlobStore,
    pub signer: Option<crate::payload::sign::Signer>,
    pub issuer: Option<Arc<crate::pki::Issuer>>,
}

/// Runs the controller on a bound listener until `shutdown` completes.
pub async fn run(
    cfg: ControllerConfig,
    parts: Parts,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ControllerError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let Parts {
        store,
        blobs,
        signer,
        issuer,
    } = parts;
    let ctl = Arc::new(Controller {
        store,
        blobs,
        signer,
        enroll_limit: identity::RateLimit::new(cfg.enroll_per_second),
        cfg,
        waiters: Mutex::new(HashMap::new()),
        shutdown: stop_rx,
        issuer,
        revoked: identity::Revoked::default(),
    });
    // Revocations hold before the first request is served.
    ctl.revoked.refresh(&ctl.store).await?;
    // A crash between two transactions cannot leave a task stuck, but a controller that was down
    // past deadlines must not punish agents for its own absence: the reaper starts after a grace.
    resume_tasks(&ctl).await?;
    crate::sys::notify::ready(&format!(
        "serving on {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    ));
    let reaper = tokio::spawn(reap_loop(ctl.clone()));
    let scheduler = tokio::spawn(schedule_loop(ctl.clone()));
    let revocations = tokio::spawn(revocation_loop(ctl.clone()));
    let blob_gc = tokio::spawn(blob_gc_loop(ctl.clone()));
    let dog = crate::sys::notify::watchdog_interval().map(|every| {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            // Pinged only after a store round trip, so a wedged database or runtime is
            // restarted by systemd rather than left serving errors.
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if ctl.store.tx(|tx| tx.setting("watchdog")).await.is_ok() {
                    crate::sys::notify::watchdog();
                }
            }
        })
    });
    let result = crate::net::server::serve(
        listener,
        tls,
        Arc::new(Router(ctl.clone())),
        ctl.cfg.net,
        async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        },
    )
    .await;
    crate::sys::notify::stopping();
    reaper.abort();
    scheduler.abort();
    revocations.abort();
    blob_gc.abort();
    if let Some(d) = dog {
        d.abort();
    }
    tracing::info!("controller stopped");
    Ok(result?)
}

async fn resume_tasks(ctl: &Controller) -> Result<(), store::StoreError> {
    let now = clock::unix_ms(clock::now());
    let wake = ctl
        .store
        .tx(move |tx| {
            let mut wake = Vec::new();
            for t in tx.unfinished_tasks()? {
                engine::advance(tx, &t, now, &mut wake)?;
            }
            Ok::<_, store::StoreError>(wake)
        })
        .await?;
    ctl.wake(&wake);
    Ok(())
}

/// How often scheduled pushes are checked for their start time.
const SCHEDULE_EVERY: Duration = Duration::from_millis(250);

/// Starts scheduled image pushes when their start time comes.
async fn schedule_loop(ctl: Arc<Controller>) {
    let mut tick = tokio::time::interval(SCHEDULE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = clock::unix_ms(clock::now());
        let res = ctl
            .store
            .tx(move |tx| {
                let mut wake = Vec::new();
                images::tick(tx, now, &mut wake)?;
                Ok::<_, store::StoreError>(wake)
            })
            .await;
        match res {
            Ok(wake) => ctl.wake(&wake),
            Err(e) => tracing::error!(error = %e, "image scheduler failed; retrying"),
        }
    }
}

/// Removes blobs nothing refers to once they are older than `blob_retention_seconds`.
async fn blob_gc_loop(ctl: Arc<Controller>) {
    let every =
        (ctl.cfg.blobs.retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let referenced = match ctl.referenced_blobs().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e.msg, "blob collection cannot read references; retrying");
                continue;
            }
        };
        for (sha, size) in ctl.blobs.expired(&referenced) {
            match ctl.blobs.remove(&sha) {
                Ok(_) => tracing::info!(sha256 = %sha, size, "removed a blob nothing refers to"),
                Err(e) => tracing::warn!(sha256 = %sha, error = %e.msg, "cannot remove a blob"),
            }
        }
    }
}

/// Reloads revocations every second, so one made through another controller sharing the
/// database holds here within a second too.
async fn revocation_loop(ctl: Arc<Controller>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = ctl.revoked.refresh(&ctl.store).await {
            tracing::error!(error = %e, "cannot reload revocations; retrying");
        }
    }
}

async fn reap_loop(ctl: Arc<Controller>) {
    let grace = ctl.cfg.unreachable_grace;
    tokio::time::sleep(grace.max(ctl.cfg.offline_after)).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = clock::unix_ms(clock::now());
        let (grace_ms, offline_ms, reboot_ms) = (
            grace.as_millis() as i64,
            ctl.cfg.offline_after.as_millis() as i64,
            ctl.cfg.reboot_grace.as_millis() as i64,
        );
        let res = ctl
            .store
            .tx(move |tx| {
                let mut wake = Vec::new();
                let n = progress::reap(tx, now, grace_ms, offline_ms, reboot_ms, &mut wake)?;
                Ok::<_, store::StoreError>((n, wake))
            })
            .await;
        match res {
            Ok((n, wake)) => {
                if n > 0 {
                    tracing::warn!(machines = n, "declared silent machines unreachable");
                }
                ctl.wake(&wake);
            }
            Err(e) => tracing::error!(error = %e, "reaper failed; retrying"),
        }
    }
}

impl ControllerError {
    /// The process exit code for this failure.
    pub fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        match self {
            ControllerError::Tls(_) | ControllerError::TlsFile(_) => Exit::Config,
            ControllerError::DataDir { .. } | ControllerError::ListenAddr { .. } => {
                Exit::CantCreate
            }
            ControllerError::Store(_) => Exit::IoErr,
            ControllerError::Signing(_) | ControllerError::Issuer(_) => Exit::Config,
            ControllerError::Bind { .. } => Exit::Unavailable,
            ControllerError::Net(_) => Exit::Software,
        }
    }
}
