//! The controller: an HTTPS server (mutual TLS only) with the operator API and the agent
//! protocol, a SQLite store, and a reaper that declares silent machines unreachable.
//!
//! `serve` validates and binds; `run` takes a bound listener and a shutdown future (mini-redis
//! style), so tests and the quickstart drive the same code as the daemon.

pub mod agent_api;
pub mod api;
pub mod audit;
pub mod blobs;
pub mod engine;
pub mod errors;
pub mod identity;
pub mod images;
pub mod lists;
mod loops;
pub mod metrics;
pub mod openapi;
pub mod progress;
pub mod quickstart;
pub mod rebuild;
pub mod reports;
pub mod rerun;
pub mod rollout;
pub mod router;
pub mod settings;
pub mod software;
pub mod store;
pub mod ui;
pub mod views;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

pub use loops::{prune as prune_finished_tasks, PRUNE_CHUNK};

use crate::config::controller::ControllerConfig;
use crate::pki::Identity;
use crate::proto::domain::ErrorCode;

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
    /// This process among the replicas sharing a database (wake-ups it sent itself are
    /// not delivered twice).
    replica: String,
    metrics: metrics::ControllerMetrics,
}

/// `403 CERT_REVOKED`.
pub fn revoked_error() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::CertRevoked,
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

    /// Wakes the long-polls of these machines (after the change they need to see committed),
    /// here and, through the database, on every other replica.
    fn wake(&self, machine_ids: &[String]) {
        self.wake_here(machine_ids);
        if self.store.shared() && !machine_ids.is_empty() {
            let (store, replica, ids) = (
                self.store.clone(),
                self.replica.clone(),
                machine_ids.to_vec(),
            );
            tokio::spawn(async move {
                if let Err(e) = store.tx(move |tx| tx.publish_wake(&replica, &ids)).await {
                    // The other replicas' polls still end at their wait and look again.
                    tracing::warn!(error = %e, "cannot publish a wake-up to the other replicas");
                }
            });
        }
    }

    fn wake_here(&self, machine_ids: &[String]) {
        let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for m in machine_ids {
            if let Some(n) = w.get(m) {
                n.notify_waiters();
            }
        }
    }

    /// Every open poll looks again (the wake-up listener reconnected and may have missed
    /// some).
    fn wake_all_here(&self) {
        let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for n in w.values() {
            n.notify_waiters();
        }
    }

    /// Every blob digest something still needs.
    async fn referenced_blobs(&self) -> Result<std::collections::HashSet<String>, ApiError> {
        let (images, docs) = self.store.read(|tx| tx.blob_referrers()).await?;
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
                // The file is gone already (no transaction covers a file): the record
                // follows it.
                audit::record_alone(
                    self,
                    by,
                    crate::proto::domain::AuditAction::BlobDelete,
                    sha.to_string(),
                    serde_json::json!({}),
                )
                .await?;
                Ok(crate::proto::api::Blob {
                    sha256: sha.to_string(),
                    size,
                    bytes_served: None,
                })
            }
            None => Err(ApiError::not_found(
                ErrorCode::NotFound,
                format!("no blob with sha256 {sha}"),
            )),
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
    let blobs = blobs::BlobStore::open(&cfg.blob_dir, cfg.blobs).map_err(|source| {
        ControllerError::DataDir {
            path: cfg.blob_dir.clone(),
            source,
        }
    })?;
    let store = Store::open(&cfg.database)?.with_power_limit(cfg.max_concurrent_power_operations);
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
    tracing::info!(%addr, database = %cfg.database, "controller listening");
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
    let store_seconds = store.transaction_seconds();
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
        replica: uuid::Uuid::new_v4().to_string(),
        metrics: metrics::ControllerMetrics::new(store_seconds),
    });
    // Wake-ups from the other replicas (PostgreSQL): until this controller is dropped.
    let weak = Arc::downgrade(&ctl);
    ctl.store
        .on_wake(&ctl.replica, move |w| match weak.upgrade() {
            Some(ctl) => {
                match w {
                    store::Wake::All => ctl.wake_all_here(),
                    store::Wake::Machines(m) => ctl.wake_here(&m),
                }
                true
            }
            None => false,
        });
    // Revocations hold before the first request is served.
    ctl.revoked.refresh(&ctl.store).await?;
    // A crash between two transactions cannot leave a task stuck, but a controller that was down
    // past deadlines must not punish agents for its own absence: the reaper starts after a grace.
    loops::resume_tasks(&ctl).await?;
    crate::sys::notify::ready(&format!(
        "serving on {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    ));
    let reaper = tokio::spawn(loops::reap_loop(ctl.clone()));
    let scheduler = tokio::spawn(loops::schedule_loop(ctl.clone()));
    let revocations = tokio::spawn(loops::revocation_loop(ctl.clone()));
    let blob_gc = tokio::spawn(loops::blob_gc_loop(ctl.clone()));
    let pruner = ctl
        .cfg
        .task_retention
        .map(|keep| tokio::spawn(loops::prune_loop(ctl.clone(), keep)));
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
    let mut net = ctl.cfg.net;
    let nofile = crate::sys::fdlimit::raise_nofile();
    let fits = crate::sys::fdlimit::connections_within(nofile, net.max_connections);
    if fits < net.max_connections {
        tracing::warn!(
            max_connections = net.max_connections,
            open_files_limit = nofile,
            serving = fits,
            "max_connections does not fit the open-files limit (LimitNOFILE); serving fewer \
             connections, so the database always has descriptors left"
        );
        net.max_connections = fits;
        net.operator_reserve = net.operator_reserve.min(fits / 2);
    }
    let result = crate::net::server::serve(
        listener,
        tls,
        Arc::new(router::Router(ctl.clone())),
        net,
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
    if let Some(p) = pruner {
        p.abort();
    }
    if let Some(d) = dog {
        d.abort();
    }
    tracing::info!("controller stopped");
    Ok(result?)
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
