//! Images (seeds 000 and 001): the registry of tar.gz blobs, pushing an image to a pool on
//! a schedule, cancelling a scheduled push, removing a pool's images, and the provisioning
//! status that operators watch.
//!
//! A push is three ordinary tasks driven by one `pool_images` row per pool:
//! - a stage task (`image_stage`), dispatched at once: every targeted agent downloads and
//!   unpacks the image as its pending image (`PENDING_PUBLISH` -> `PUBLISHING` -> `READY`);
//! - an apply task (`image_apply`, the `task_id` the operator gets), held until the start
//!   time has come and the pending image is `READY`; each agent then logs users off under
//!   the policy, switches the image in, reboots and runs the health check (the agent's
//!   state machine and the reboot protocol do the work). With `stop_on_first_error` and
//!   more than one machine, one machine goes first and a failure there skips the rest;
//! - a remove task (`image_remove`), for a cancel (drop the pending image) or
//!   `FINAL_UNPUBLISH` (drop every image).
//!
//! [`reconcile`] moves the pool's operation and image states from those tasks' states. It
//! runs in the same transaction as every event that could change them, and on a timer for
//! the start time.

use super::engine;
use super::errors::ApiError;
use super::rollout::{MachineState, TaskState};
use super::store::{ImageRow, MachineImageRow, PoolImageRow, StoreError, TaskRow, Tx};
use super::Controller;
use crate::proto::agent::{
    AssignmentKind, ComponentProgress, EventBody, ImageAssignment, PayloadManifest, PayloadRef,
    PayloadSignature, PowerSpec,
};
use crate::proto::api;
use crate::sys::clock;

pub use super::kinds::{APPLY_KIND, REBUILD_KIND, REMOVE_KIND, STAGE_KIND};

pub const NONE: &str = "NONE";
pub const INITIAL_PUBLISH: &str = "INITIAL_PUBLISH";
pub const SCHEDULE_PUSH_IMAGE: &str = "SCHEDULE_PUSH_IMAGE";
pub const CANCEL_SCHEDULED_PUSH_IMAGE: &str = "CANCEL_SCHEDULED_PUSH_IMAGE";
pub const FINAL_UNPUBLISH: &str = "FINAL_UNPUBLISH";

const PENDING_PUBLISH: &str = "PENDING_PUBLISH";
const PUBLISHING: &str = "PUBLISHING";
const READY: &str = "READY";
const FAILED: &str = "FAILED";
const PENDING_UNPUBLISH: &str = "PENDING_UNPUBLISH";
const UNPUBLISHING: &str = "UNPUBLISHING";

const DEFAULT_TIMEOUT_SECONDS: i64 = 3600;
const MAX_TIMEOUT_SECONDS: i64 = 172_800;
/// Removing an image is quick; a machine that does not answer in time is left to prune
/// the image itself when it next stages one.
const REMOVE_TIMEOUT_SECONDS: u64 = 300;
/// Signatures outlive the staging deadline by this much.
const SIGNATURE_SLACK_SECONDS: i64 = 86_400;

/// The agent's assignment kind for an image task kind.
pub fn assignment_kind(task_kind: &str) -> Option<AssignmentKind> {
    match task_kind {
        STAGE_KIND => Some(AssignmentKind::ImageStage),
        APPLY_KIND | REBUILD_KIND => Some(AssignmentKind::ImageApply),
        REMOVE_KIND => Some(AssignmentKind::ImageRemove),
        _ => None,
    }
}

fn check_pool(pool_id: &str) -> Result<(), ApiError> {
    crate::pki::validate_name("pool_id", pool_id).map_err(|e| invalid(e.to_string()))
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::invalid(msg)
}

fn text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field} {value:?} must be 1-{max} printable characters"
        )));
    }
    Ok(())
}

pub async fn create_image(
    ctl: &Controller,
    req: api::CreateImage,
) -> Result<api::ImageCreated, ApiError> {
    text("name", &req.name, 128)?;
    text("version", &req.version, 128)?;
    text("os_type", &req.os_type, 64)?;
    if !super::blobs::valid_sha256(&req.sha256) {
        return Err(invalid(format!(
            "sha256 {:?} must be 64 lowercase hex digits",
            req.sha256
        )));
    }
    let size = ctl.blobs.size(&req.sha256).ok_or_else(|| {
        invalid(format!(
            "sha256 {}: no such blob; upload the image with POST /v1/blobs first",
            req.sha256
        ))
    })?;
    let row = ImageRow {
        image_id: uuid::Uuid::new_v4().to_string(),
        name: req.name,
        version: req.version,
        os_type: req.os_type,
        gpu: req.gpu,
        sha256: req.sha256,
        size,
        created_ms: clock::unix_ms(clock::now()),
    };
    let image_id = row.image_id.clone();
    ctl.store.tx(move |tx| tx.insert_image(&row)).await?;
    Ok(api::ImageCreated { image_id })
}

pub async fn list_images(ctl: &Controller) -> Result<Vec<api::Image>, ApiError> {
    let rows = ctl.store.tx(|tx| tx.images()).await?;
    Ok(rows
        .into_iter()
        .map(|r| api::Image {
            image_id: r.image_id,
            name: r.name,
            version: r.version,
            os_type: r.os_type,
            gpu: r.gpu,
            sha256: r.sha256,
            size: r.size,
            created_at: clock::from_unix_ms(r.created_ms)
                .map(clock::rfc3339)
                .unwrap_or_default(),
        })
        .collect())
}

/// A push request with the seed's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushSpec {
    pub image_id: String,
    /// Epoch ms; `None`: now.
    pub start_time: Option<i64>,
    pub logoff_policy: String,
    pub stop_on_first_error: bool,
    /// `Some` only for a selective push.
    pub machine_ids: Option<Vec<String>>,
    pub compute_profile: ComputeProfile,
    pub add_virtual_tpm: bool,
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComputeProfile {
    pub num_cpus: Option<u32>,
    pub num_cores_per_socket: Option<u32>,
    pub ram_mb: Option<u64>,
}

/// Checks a push-image request against seed 000's rules; errors name the field and value.
pub fn validate_push(req: &api::PushImage) -> Result<PushSpec, ApiError> {
    let image_id = match req.image_id.as_deref() {
        Some(id) if !id.trim().is_empty() => id.to_string(),
        _ => return Err(invalid("image_id is required")),
    };
    if let Some(t) = req.start_time {
        if t < 0 {
            return Err(invalid(format!(
                "start_time {t} must be epoch milliseconds (>= 0)"
            )));
        }
    }
    let logoff_policy = req
        .logoff_policy
        .clone()
        .unwrap_or_else(|| "WAIT_FOR_LOGOFF".into());
    if logoff_policy != "WAIT_FOR_LOGOFF" && logoff_policy != "FORCE_LOGOFF" {
        return Err(invalid(format!(
            "logoff_policy {logoff_policy:?} must be WAIT_FOR_LOGOFF or FORCE_LOGOFF"
        )));
    }
    let selective = req.selective_push_image.unwrap_or(false);
    let machine_ids = match (&req.machine_ids, selective) {
        (Some(ids), false) => {
            return Err(invalid(format!(
                "machine_ids {ids:?} may only be set with selective_push_image: true"
            )))
        }
        (None, true) => {
            return Err(invalid(
                "selective_push_image: true needs machine_ids (the machines to push to)",
            ))
        }
        (Some(ids), true) => {
            if ids.is_empty() {
                return Err(invalid("machine_ids must not be empty"));
            }
            for (i, id) in ids.iter().enumerate() {
                crate::pki::validate_name("machine_ids", id).map_err(|e| invalid(e.to_string()))?;
                if ids[..i].contains(id) {
                    return Err(invalid(format!("machine_ids lists {id:?} twice")));
                }
            }
            Some(ids.clone())
        }
        (None, false) => None,
    };
    let positive = |field: &str, v: Option<i64>, max: i64| -> Result<Option<i64>, ApiError> {
        match v {
            Some(n) if !(1..=max).contains(&n) => {
                Err(invalid(format!("{field} {n} must be 1..={max}")))
            }
            v => Ok(v),
        }
    };
    let cpus = positive(
        "compute_profile_num_cpus",
        req.compute_profile_num_cpus,
        1024,
    )?;
    let cores = positive(
        "compute_profile_num_cores_per_socket",
        req.compute_profile_num_cores_per_socket,
        1024,
    )?;
    let ram = positive(
        "compute_profile_ram_mb",
        req.compute_profile_ram_mb,
        16 << 20,
    )?;
    if let Some(c) = cores {
        // Seed 000: "If set, both compute_profile_num_cpus and compute_profile_ram_mb need
        // to be set", and CPUs "must be a multiple of compute_profile_num_cores_per_socket".
        let (Some(n), Some(_)) = (cpus, ram) else {
            return Err(invalid(format!(
                "compute_profile_num_cores_per_socket {c} needs both compute_profile_num_cpus and compute_profile_ram_mb"
            )));
        };
        if n % c != 0 {
            return Err(invalid(format!(
                "compute_profile_num_cpus {n} must be a multiple of compute_profile_num_cores_per_socket {c}"
            )));
        }
    }
    Ok(PushSpec {
        image_id,
        start_time: req.start_time,
        logoff_policy,
        stop_on_first_error: req.stop_on_first_error.unwrap_or(true),
        machine_ids,
        compute_profile: ComputeProfile {
            num_cpus: cpus.map(|v| v as u32),
            num_cores_per_socket: cores.map(|v| v as u32),
            ram_mb: ram.map(|v| v as u64),
        },
        add_virtual_tpm: req.add_virtual_tpm.unwrap_or(false),
        timeout_seconds: {
            let t = req.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
            if !(1..=MAX_TIMEOUT_SECONDS).contains(&t) {
                return Err(invalid(format!(
                    "timeout_seconds {t} must be 1..={MAX_TIMEOUT_SECONDS}"
                )));
            }
            t as u64
        },
    })
}

/// For a reschedule: the first field, other than `start_time`, where two requests differ
/// (after defaults, so leaving out a default and spelling it out are the same request).
pub fn differing_field(a: &PushSpec, b: &PushSpec) -> Option<&'static str> {
    let (ca, cb) = (&a.compute_profile, &b.compute_profile);
    let fields: [(&'static str, bool); 10] = [
        ("image_id", a.image_id == b.image_id),
        ("logoff_policy", a.logoff_policy == b.logoff_policy),
        (
            "stop_on_first_error",
            a.stop_on_first_error == b.stop_on_first_error,
        ),
        (
            "selective_push_image",
            a.machine_ids.is_some() == b.machine_ids.is_some(),
        ),
        ("machine_ids", a.machine_ids == b.machine_ids),
        ("compute_profile_num_cpus", ca.num_cpus == cb.num_cpus),
        (
            "compute_profile_num_cores_per_socket",
            ca.num_cores_per_socket == cb.num_cores_per_socket,
        ),
        ("compute_profile_ram_mb", ca.ram_mb == cb.ram_mb),
        ("add_virtual_tpm", a.add_virtual_tpm == b.add_virtual_tpm),
        ("timeout_seconds", a.timeout_seconds == b.timeout_seconds),
    ];
    fields.iter().find(|(_, same)| !same).map(|(f, _)| *f)
}

/// What the `fieldhand/activate` hook receives besides the base script environment.
pub fn hook_env(
    spec: &PushSpec,
    previous_image_id: Option<&str>,
) -> std::collections::BTreeMap<String, String> {
    let mut env = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            env.insert(format!("FIELDHAND_{k}"), v);
        }
    };
    let cp = &spec.compute_profile;
    put(
        "COMPUTE_PROFILE_NUM_CPUS",
        cp.num_cpus.map(|v| v.to_string()),
    );
    put(
        "COMPUTE_PROFILE_NUM_CORES_PER_SOCKET",
        cp.num_cores_per_socket.map(|v| v.to_string()),
    );
    put("COMPUTE_PROFILE_RAM_MB", cp.ram_mb.map(|v| v.to_string()));
    put("ADD_VIRTUAL_TPM", Some(spec.add_virtual_tpm.to_string()));
    put("LOGOFF_POLICY", Some(spec.logoff_policy.clone()));
    put(
        "POOL_PREVIOUS_IMAGE_ID",
        previous_image_id.map(str::to_string),
    );
    env
}

pub(super) fn image_payload(
    ctl: &Controller,
    image: &ImageRow,
    timeout: u64,
) -> Result<PayloadRef, ApiError> {
    let size = ctl.blobs.size(&image.sha256).ok_or_else(|| {
        ApiError::conflict(format!(
            "image {}: its blob {} is no longer stored",
            image.image_id, image.sha256
        ))
    })?;
    let expires_at = clock::rfc3339(
        clock::now() + time::Duration::seconds(timeout as i64 + SIGNATURE_SLACK_SECONDS),
    );
    let signature = ctl.signer.as_ref().map(|s| PayloadSignature {
        expires_at: expires_at.clone(),
        ed25519: s.sign(&PayloadManifest {
            sha256: image.sha256.clone(),
            size,
            name: image.image_id.clone(),
            expires_at: expires_at.clone(),
        }),
    });
    Ok(PayloadRef {
        name: image.image_id.clone(),
        version: image.version.clone(),
        sha256: image.sha256.clone(),
        size,
        format: "tar.gz".into(),
        unpacked_size: None,
        signature,
    })
}

pub(super) fn new_task(
    kind: &str,
    pool_id: &str,
    now_ms: i64,
    timeout: u64,
    img: &ImageAssignment,
    power: Option<&PowerSpec>,
    threshold: Option<u32>,
) -> Result<TaskRow, ApiError> {
    Ok(TaskRow {
        task_id: uuid::Uuid::new_v4().to_string(),
        kind: kind.into(),
        pool_id: pool_id.into(),
        state: TaskState::Pending,
        created_ms: now_ms,
        finished_ms: None,
        gray_fail_threshold: threshold,
        timeout_seconds: timeout,
        scripts_json: serde_json::to_string(img).map_err(ApiError::internal)?,
        power_json: power
            .map(serde_json::to_string)
            .transpose()
            .map_err(ApiError::internal)?,
    })
}

fn machines_of(batches: &[Vec<String>]) -> Vec<(String, String, u32)> {
    batches
        .iter()
        .enumerate()
        .flat_map(|(b, ids)| {
            ids.iter()
                .map(move |m| (m.clone(), uuid::Uuid::new_v4().to_string(), b as u32))
        })
        .collect()
}

fn pool_row(tx: &mut Tx<'_>, pool_id: &str) -> Result<PoolImageRow, StoreError> {
    Ok(tx.pool_image(pool_id)?.unwrap_or_else(|| PoolImageRow {
        pool_id: pool_id.to_string(),
        operation: NONE.into(),
        ..PoolImageRow::default()
    }))
}

fn is_push(op: &str) -> bool {
    op == INITIAL_PUBLISH || op == SCHEDULE_PUSH_IMAGE
}

/// `POST /v1/pools/{pool_id}/push-image` (seed 000): a new push, or a reschedule of the
/// scheduled one (same `task_id`).
pub async fn push(
    ctl: &Controller,
    pool_id: String,
    req: api::PushImage,
) -> Result<api::TaskCreated, ApiError> {
    check_pool(&pool_id)?;
    let spec = validate_push(&req)?;
    let iid = spec.image_id.clone();
    let image = ctl
        .store
        .tx(move |tx| tx.image(&iid))
        .await?
        .ok_or_else(|| {
            invalid(format!(
                "image_id {:?}: no such image (see GET /v1/images)",
                spec.image_id
            ))
        })?;
    let payload = image_payload(ctl, &image, spec.timeout_seconds)?;
    let request_json = serde_json::to_string(&req).map_err(ApiError::internal)?;
    let now_ms = clock::unix_ms(clock::now());
    let (task_id, wake) = ctl
        .store
        .tx(move |tx| {
            let mut wake = Vec::new();
            let mut op = pool_row(tx, &pool_id)?;
            let start_ms = spec.start_time.unwrap_or(now_ms).max(now_ms);
            let not_started = !op.released && op.start_ms.is_some_and(|t| now_ms < t);
            if is_push(&op.operation) && !not_started {
                return Err(ApiError::conflict(format!(
                    "pool {pool_id:?}: the push of task {} reached its start_time; it can no longer be rescheduled",
                    op.task_id.as_deref().unwrap_or("?")
                )));
            }
            if is_push(&op.operation) {
                let prev: api::PushImage = serde_json::from_str(op.request_json.as_deref().unwrap_or("{}"))
                    .map_err(ApiError::internal)?;
                let prev = validate_push(&prev)?;
                if let Some(field) = differing_field(&prev, &spec) {
                    return Err(ApiError::conflict(format!(
                        "pool {pool_id:?} has a scheduled push (task {}); a reschedule may only change start_time, but {field} differs",
                        op.task_id.as_deref().unwrap_or("?")
                    )));
                }
                op.start_ms = Some(start_ms);
                op.request_json = Some(request_json);
                tx.put_pool_image(&op)?;
                reconcile(tx, &pool_id, now_ms, &mut wake)?;
                tracing::info!(pool_id, task_id = ?op.task_id, start_ms, "push rescheduled");
                return Ok((op.task_id.unwrap_or_default(), wake));
            }
            if op.operation != NONE {
                return Err(ApiError::conflict(format!(
                    "pool {pool_id:?} has operation {} in progress (task {}); wait for it to end",
                    op.operation,
                    op.task_id.as_deref().unwrap_or("?")
                )));
            }
            let mut machines = tx.machines()?;
            machines.retain(|m| m.pool_id.as_deref() == Some(pool_id.as_str()));
            if let Some(ids) = &spec.machine_ids {
                if let Some(bad) = ids.iter().find(|id| !machines.iter().any(|m| &m.machine_id == *id)) {
                    return Err(invalid(format!(
                        "machine_ids: {bad:?} is not a machine of pool {pool_id:?}"
                    )));
                }
                machines.retain(|m| ids.contains(&m.machine_id));
            }
            if machines.is_empty() {
                return Err(super::errors::no_machines(&pool_id));
            }
            // The machine heard from last goes first: it is the likeliest to be online.
            machines.sort_by(|a, b| b.last_seen_ms.cmp(&a.last_seen_ms).then(a.machine_id.cmp(&b.machine_id)));
            let ids: Vec<String> = machines.iter().map(|m| m.machine_id.clone()).collect();
            let canary = spec.stop_on_first_error && ids.len() > 1;
            let apply_batches = if canary {
                vec![ids[..1].to_vec(), ids[1..].to_vec()]
            } else {
                vec![ids.clone()]
            };
            let stage_img = ImageAssignment {
                image_id: spec.image_id.clone(),
                payload: Some(payload),
                ..Default::default()
            };
            let apply_img = ImageAssignment {
                image_id: spec.image_id.clone(),
                env: hook_env(&spec, op.current_image_id.as_deref()),
                ..Default::default()
            };
            let grace = super::settings::force_logoff_grace(tx)? as u64;
            let power = PowerSpec {
                pre_start: Some("logoff".into()),
                post_finish: Some("reboot".into()),
                logoff_policy: spec.logoff_policy.clone(),
                logoff_timeout_seconds: super::settings::DEFAULT_LOGOFF_TIMEOUT_SECONDS as u64,
                force_logoff_grace_seconds: grace,
            };
            let stage = new_task(STAGE_KIND, &pool_id, now_ms, spec.timeout_seconds, &stage_img, None, None)?;
            let apply = new_task(
                APPLY_KIND,
                &pool_id,
                now_ms,
                spec.timeout_seconds,
                &apply_img,
                Some(&power),
                canary.then_some(1),
            )?;
            tx.insert_task(&stage, &machines_of(std::slice::from_ref(&ids)))?;
            tx.insert_task(&apply, &machines_of(&apply_batches))?;
            op = PoolImageRow {
                operation: if op.current_image_id.is_none() { INITIAL_PUBLISH } else { SCHEDULE_PUSH_IMAGE }.into(),
                task_id: Some(apply.task_id.clone()),
                stage_task_id: Some(stage.task_id.clone()),
                apply_task_id: Some(apply.task_id.clone()),
                remove_task_id: None,
                released: false,
                request_json: Some(request_json),
                start_ms: Some(start_ms),
                selective: spec.machine_ids.is_some(),
                pending_image_id: Some(spec.image_id.clone()),
                pending_state: Some(PENDING_PUBLISH.into()),
                ..op
            };
            // Saved before the stage task moves, so the apply task is held from the start.
            tx.put_pool_image(&op)?;
            for id in &ids {
                let mut m = tx.machine_image(id)?;
                m.pending_image_id = Some(spec.image_id.clone());
                m.pending_state = Some(PENDING_PUBLISH.into());
                tx.put_machine_image(&m)?;
            }
            engine::advance(tx, &stage.task_id, now_ms, &mut wake)?;
            reconcile(tx, &pool_id, now_ms, &mut wake)?;
            tracing::info!(pool_id, task_id = %apply.task_id, image_id = %spec.image_id, machines = ids.len(), start_ms, "push scheduled");
            Ok::<_, ApiError>((apply.task_id, wake))
        })
        .await?;
    ctl.wake(&wake);
    Ok(api::TaskCreated { task_id })
}

/// Starts a remove task for `machines` (`image_id` while pending, or every image); returns
/// its id.
fn start_removal(
    tx: &mut Tx<'_>,
    pool_id: &str,
    machines: &[String],
    image_id: String,
    remove_all: bool,
    now_ms: i64,
    wake: &mut engine::Wake,
) -> Result<String, ApiError> {
    let img = ImageAssignment {
        image_id,
        remove_all,
        ..Default::default()
    };
    let task = new_task(
        REMOVE_KIND,
        pool_id,
        now_ms,
        REMOVE_TIMEOUT_SECONDS,
        &img,
        None,
        None,
    )?;
    tx.insert_task(&task, &machines_of(&[machines.to_vec()]))?;
    engine::advance(tx, &task.task_id, now_ms, wake)?;
    Ok(task.task_id)
}

/// `POST /v1/pools/{pool_id}/push-image/cancel`: before the start time only.
pub async fn cancel_push(
    ctl: &Controller,
    pool_id: String,
) -> Result<api::ProvisioningStatus, ApiError> {
    check_pool(&pool_id)?;
    let now_ms = clock::unix_ms(clock::now());
    let pid = pool_id.clone();
    let wake = ctl
        .store
        .tx(move |tx| {
            let mut wake = Vec::new();
            let mut op = pool_row(tx, &pid)?;
            if !is_push(&op.operation) {
                return Err(ApiError::conflict(format!(
                    "pool {pid:?} has no scheduled push to cancel (operation {})",
                    op.operation
                )));
            }
            if op.released {
                return Err(ApiError::conflict(format!(
                    "the push of image {} to pool {pid:?} started at {}; it can no longer be cancelled",
                    op.pending_image_id.as_deref().unwrap_or("?"),
                    op.start_ms.and_then(clock::from_unix_ms).map(clock::rfc3339).unwrap_or_default()
                )));
            }
            let (Some(stage_id), Some(apply_id), Some(image_id)) =
                (op.stage_task_id.clone(), op.apply_task_id.clone(), op.pending_image_id.clone())
            else {
                return Err(ApiError::internal(format!("pool {pid:?}: push without its tasks")));
            };
            // The apply task never ran: release it so that cancelling can end it.
            op.released = true;
            op.operation = CANCEL_SCHEDULED_PUSH_IMAGE.into();
            tx.put_pool_image(&op)?;
            for id in [&stage_id, &apply_id] {
                match engine::cancel(tx, id, now_ms, &mut wake) {
                    Ok(_) | Err(engine::EngineError::NotCancellable { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let machines: Vec<String> = tx.task_machines(&stage_id)?.into_iter().map(|m| m.machine_id).collect();
            op.remove_task_id = Some(start_removal(
                tx, &pid, &machines, image_id, false, now_ms, &mut wake,
            )?);
            tx.put_pool_image(&op)?;
            reconcile(tx, &pid, now_ms, &mut wake)?;
            tracing::info!(pool_id = %pid, task_id = ?op.task_id, "scheduled push cancelled");
            Ok::<_, ApiError>(wake)
        })
        .await?;
    ctl.wake(&wake);
    provisioning_status(ctl, pool_id).await
}

/// `DELETE /v1/pools/{pool_id}/image`: `FINAL_UNPUBLISH`, every image leaves the pool's
/// machines.
pub async fn unpublish(ctl: &Controller, pool_id: String) -> Result<api::TaskCreated, ApiError> {
    check_pool(&pool_id)?;
    let now_ms = clock::unix_ms(clock::now());
    let (task_id, wake) = ctl
        .store
        .tx(move |tx| {
            let mut wake = Vec::new();
            let mut op = pool_row(tx, &pool_id)?;
            if op.operation != NONE {
                return Err(ApiError::conflict(format!(
                    "pool {pool_id:?} has operation {} in progress (task {})",
                    op.operation,
                    op.task_id.as_deref().unwrap_or("?")
                )));
            }
            let Some(image_id) = op.current_image_id.clone().or(op.pending_image_id.clone()) else {
                return Err(ApiError::conflict(format!(
                    "pool {pool_id:?} has no image to unpublish"
                )));
            };
            let machines = tx.pool_machines(&pool_id)?;
            if machines.is_empty() {
                return Err(super::errors::no_machines(&pool_id));
            }
            let task_id =
                start_removal(tx, &pool_id, &machines, image_id, true, now_ms, &mut wake)?;
            op.operation = FINAL_UNPUBLISH.into();
            op.current_state = Some(PENDING_UNPUBLISH.into());
            op.task_id = Some(task_id.clone());
            op.remove_task_id = Some(task_id.clone());
            tx.put_pool_image(&op)?;
            reconcile(tx, &pool_id, now_ms, &mut wake)?;
            Ok::<_, ApiError>((task_id, wake))
        })
        .await?;
    ctl.wake(&wake);
    Ok(api::TaskCreated { task_id })
}

/// A push whose staging failed ends here: each machine of the apply task that never started
/// fails with the staging error (its own, or the first one), so the operator's task says why.
fn fail_unstarted(
    tx: &mut Tx<'_>,
    stage_id: &str,
    apply_id: &str,
    now_ms: i64,
    wake: &mut engine::Wake,
) -> Result<(), StoreError> {
    let failures: Vec<(String, Option<String>, Option<String>)> = tx
        .task_machines(stage_id)?
        .into_iter()
        .filter(|m| m.state != MachineState::Succeeded)
        .map(|m| (m.machine_id, m.outcome.error_code, m.outcome.error_msg))
        .collect();
    for m in tx.task_machines(apply_id)? {
        if m.state.is_final() {
            continue;
        }
        let why = failures
            .iter()
            .find(|f| f.0 == m.machine_id)
            .or(failures.first());
        let (code, msg) = match why {
            Some((id, code, msg)) => (
                code.clone().unwrap_or_else(|| "STAGING_FAILED".into()),
                format!(
                    "staging the image failed on {id}: {}",
                    msg.as_deref().unwrap_or("no message")
                ),
            ),
            None => ("STAGING_FAILED".into(), "staging the image failed".into()),
        };
        let outcome = super::store::Outcome {
            error_code: Some(code),
            error_msg: Some(msg),
            ..Default::default()
        };
        tx.set_final(&m.assignment_id, MachineState::Failed, &outcome)?;
    }
    engine::advance(tx, apply_id, now_ms, wake)
}

fn any_started(tx: &mut Tx<'_>, task_id: &str) -> Result<bool, StoreError> {
    Ok(tx
        .task_machines(task_id)?
        .iter()
        .any(|m| m.state == MachineState::Running || m.state.is_final()))
}

fn finished(tx: &mut Tx<'_>, task_id: Option<&str>) -> Result<Option<TaskState>, StoreError> {
    let Some(id) = task_id else {
        return Ok(Some(TaskState::Succeeded));
    };
    Ok(tx
        .task(id)?
        .filter(|t| t.finished_ms.is_some())
        .map(|t| t.state))
}

/// Moves a pool's image operation forward from its tasks' states. Idempotent; called in
/// the transaction of every event of an image task, and on a timer (start times).
pub fn reconcile(
    tx: &mut Tx<'_>,
    pool_id: &str,
    now_ms: i64,
    wake: &mut engine::Wake,
) -> Result<(), StoreError> {
    let Some(mut op) = tx.pool_image(pool_id)? else {
        return Ok(());
    };
    let before = op.clone();
    if is_push(&op.operation) {
        let stage_id = op.stage_task_id.clone().unwrap_or_default();
        if op.pending_state.as_deref() == Some(PENDING_PUBLISH) && any_started(tx, &stage_id)? {
            op.pending_state = Some(PUBLISHING.into());
        }
        match finished(tx, Some(&stage_id))? {
            Some(TaskState::Succeeded) if !op.released => op.pending_state = Some(READY.into()),
            Some(_) if !op.released => {
                // Staging failed somewhere: the push ends here and nothing is applied.
                op.pending_state = Some(FAILED.into());
                op.released = true;
                op.operation = NONE.into();
                tx.put_pool_image(&op)?;
                if let Some(apply) = &op.apply_task_id {
                    fail_unstarted(tx, &stage_id, apply, now_ms, wake)?;
                }
                tracing::warn!(pool_id, image_id = ?op.pending_image_id, "staging failed; push ended");
                return Ok(());
            }
            _ => {}
        }
        let due = op.start_ms.is_some_and(|t| now_ms >= t);
        if !op.released && op.pending_state.as_deref() == Some(READY) && due {
            op.released = true;
            // Saved first: `advance` refuses a held task.
            tx.put_pool_image(&op)?;
            if let Some(apply) = &op.apply_task_id {
                engine::advance(tx, apply, now_ms, wake)?;
            }
            tracing::info!(pool_id, task_id = ?op.apply_task_id, "push started");
        }
        if op.released {
            if let Some(state) = finished(tx, op.apply_task_id.as_deref())? {
                if state == TaskState::Succeeded && !op.selective {
                    op.current_image_id = op.pending_image_id.take();
                    op.current_state = Some(READY.into());
                    op.pending_state = None;
                } else if state != TaskState::Succeeded {
                    op.pending_state = Some(FAILED.into());
                }
                // A selective push keeps the image pending (seed 000: "held as a pending
                // image"); the machines it reached run it.
                op.operation = NONE.into();
                tracing::info!(pool_id, task_id = ?op.apply_task_id, %state, "push ended");
            }
        }
    } else if op.operation == CANCEL_SCHEDULED_PUSH_IMAGE {
        let stage_done = finished(tx, op.stage_task_id.as_deref())?.is_some();
        if stage_done && finished(tx, op.remove_task_id.as_deref())?.is_some() {
            op.operation = NONE.into();
            op.pending_image_id = None;
            op.pending_state = None;
        }
    } else if op.operation == FINAL_UNPUBLISH {
        let remove = op.remove_task_id.clone().unwrap_or_default();
        if op.current_state.as_deref() == Some(PENDING_UNPUBLISH) && any_started(tx, &remove)? {
            op.current_state = Some(UNPUBLISHING.into());
        }
        match finished(tx, Some(&remove))? {
            Some(TaskState::Succeeded) => {
                op.operation = NONE.into();
                op.current_image_id = None;
                op.current_state = None;
                op.pending_image_id = None;
                op.pending_state = None;
            }
            Some(_) => {
                op.operation = NONE.into();
                op.current_state = Some(FAILED.into());
            }
            None => {}
        }
    }
    if op != before {
        tx.put_pool_image(&op)?;
    }
    Ok(())
}

/// Keeps a machine's image states in step with an event of an image task, then moves the
/// pool's operation on. The agent's own record, attached to each image result, is the truth;
/// only the start of staging is known here first.
pub fn observe(
    tx: &mut Tx<'_>,
    task: &TaskRow,
    assignment_id: &str,
    machine_id: &str,
    body: Option<&EventBody>,
    now_ms: i64,
    wake: &mut engine::Wake,
) -> Result<(), StoreError> {
    let Some(kind) = assignment_kind(&task.kind) else {
        return Ok(());
    };
    if let Some(body) = body {
        let mut m = tx.machine_image(machine_id)?;
        let before = m.clone();
        match body {
            EventBody::Started if kind == AssignmentKind::ImageStage => {
                m.pending_state = Some(PUBLISHING.into());
            }
            EventBody::Result(r) => {
                if let Some(rec) = &r.image {
                    m.current_image_id = rec.current_image_id.clone();
                    m.current_state = rec.current_image_state.clone();
                    m.pending_image_id = rec.pending_image_id.clone();
                    m.pending_state = rec.pending_image_state.clone();
                }
                let own = tx.assignment_payload(assignment_id)?;
                let img: Option<ImageAssignment> =
                    serde_json::from_str(own.as_deref().unwrap_or(&task.scripts_json)).ok();
                if let Some(lang) = img
                    .and_then(|i| i.language)
                    .filter(|_| r.state == "SUCCEEDED")
                {
                    m.language = Some(lang);
                }
            }
            _ => {}
        }
        if m != before {
            tx.put_machine_image(&m)?;
        }
    }
    reconcile(tx, &task.pool_id, now_ms, wake)
}

/// Every pool with an operation in progress, for the timer.
pub fn tick(tx: &mut Tx<'_>, now_ms: i64, wake: &mut engine::Wake) -> Result<(), StoreError> {
    for op in tx.busy_pool_images()? {
        reconcile(tx, &op.pool_id, now_ms, wake)?;
    }
    Ok(())
}

/// Percent of bytes staged, from an image stage task's machine rows.
fn percent(machines: &[super::store::TaskMachineRow]) -> Option<u32> {
    let (mut done, mut total) = (0u128, 0u128);
    for m in machines {
        let comps: Vec<ComponentProgress> = m
            .progress_json
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        // Past the download (verifying, extracting: their byte counts start again from 0),
        // a component counts as fully downloaded, so the percentage never goes back.
        let (d, t) = comps.iter().fold((0u64, 0u64), |(d, t), c| {
            let done = match c.phase.as_str() {
                "PENDING" | "DOWNLOADING" => c.bytes_done,
                _ => c.bytes_total,
            };
            (d + done, t + c.bytes_total)
        });
        if m.state == MachineState::Succeeded {
            done += 100;
        } else if t > 0 {
            done += u128::from(d.min(t)) * 100 / u128::from(t);
        }
        total += 100;
    }
    (total > 0).then(|| (done * 100 / total) as u32)
}

/// `GET /v1/pools/{pool_id}/provisioning-status` (seed 001).
pub async fn provisioning_status(
    ctl: &Controller,
    pool_id: String,
) -> Result<api::ProvisioningStatus, ApiError> {
    check_pool(&pool_id)?;
    ctl.store
        .tx(move |tx| {
            let op = pool_row(tx, &pool_id)?;
            let mut counts = api::MachineCounts::default();
            let mut first_error: Option<(String, String)> = None;
            if let Some(task) = &op.task_id {
                for m in tx.task_machines(task)? {
                    counts.total += 1;
                    if first_error.is_none() && m.state.is_final() {
                        if let Some(code) = &m.outcome.error_code {
                            let msg = m.outcome.error_msg.clone().unwrap_or_default();
                            first_error = Some((code.clone(), msg));
                        }
                    }
                    match m.state {
                        MachineState::Succeeded => counts.succeeded += 1,
                        MachineState::Failed | MachineState::TimedOut => counts.failed += 1,
                        MachineState::Skipped | MachineState::Cancelled => counts.skipped += 1,
                        MachineState::Pending
                        | MachineState::Dispatched
                        | MachineState::Running => counts.pending += 1,
                    }
                }
            }
            let progress = match (&op.stage_task_id, op.pending_state.is_some()) {
                (Some(stage), true) => percent(&tx.task_machines(stage)?),
                _ => None,
            };
            Ok::<_, ApiError>(api::ProvisioningStatus {
                operation: op.operation,
                pending_image_state: op.pending_state,
                current_image_state: op.current_state,
                pending_image_id: op.pending_image_id,
                current_image_id: op.current_image_id,
                pending_image_progress: progress,
                start_time: op.start_ms,
                error_code: first_error.as_ref().map(|e| e.0.clone()),
                error_msg: first_error.map(|e| e.1),
                task_id: op.task_id,
                machines: counts,
            })
        })
        .await
}

/// A machine's images, for `GET /v1/machines[/{machine_id}]`; `None` if it never had any.
pub fn machine_view(
    tx: &mut Tx<'_>,
    machine_id: &str,
    pool_id: &str,
) -> Result<Option<api::MachineImage>, StoreError> {
    let m = tx.machine_image(machine_id)?;
    if m == (MachineImageRow {
        machine_id: machine_id.to_string(),
        ..MachineImageRow::default()
    }) {
        return Ok(None);
    }
    let mut progress = None;
    if m.pending_state.as_deref() == Some(PUBLISHING) {
        if let Some(stage) = tx.pool_image(pool_id)?.and_then(|o| o.stage_task_id) {
            let rows: Vec<_> = tx
                .task_machines(&stage)?
                .into_iter()
                .filter(|r| r.machine_id == machine_id)
                .collect();
            progress = percent(&rows);
        }
    }
    Ok(Some(api::MachineImage {
        current_image_id: m.current_image_id,
        current_image_state: m.current_state,
        pending_image_id: m.pending_image_id,
        pending_image_state: m.pending_state,
        pending_image_progress: progress,
        language: m.language,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> api::PushImage {
        api::PushImage {
            image_id: Some("img-1".into()),
            ..Default::default()
        }
    }

    fn msg(r: api::PushImage) -> String {
        validate_push(&r).unwrap_err().msg
    }

    #[test]
    fn defaults_follow_the_seed() {
        let s = validate_push(&req()).unwrap();
        assert_eq!(s.logoff_policy, "WAIT_FOR_LOGOFF");
        assert!(s.stop_on_first_error);
        assert!(!s.add_virtual_tpm);
        assert_eq!(s.machine_ids, None);
        assert_eq!(s.start_time, None);
    }

    #[test]
    fn every_rule_names_its_field() {
        assert!(msg(api::PushImage::default()).contains("image_id"));
        let m = msg(api::PushImage {
            logoff_policy: Some("LATER".into()),
            ..req()
        });
        assert!(m.contains("logoff_policy") && m.contains("LATER"), "{m}");
        let m = msg(api::PushImage {
            machine_ids: Some(vec!["m1".into()]),
            ..req()
        });
        assert!(
            m.contains("machine_ids") && m.contains("selective_push_image"),
            "{m}"
        );
        let m = msg(api::PushImage {
            selective_push_image: Some(true),
            ..req()
        });
        assert!(m.contains("machine_ids"), "{m}");
        let m = msg(api::PushImage {
            selective_push_image: Some(true),
            machine_ids: Some(vec!["m1".into(), "m1".into()]),
            ..req()
        });
        assert!(m.contains("twice"), "{m}");
        let m = msg(api::PushImage {
            compute_profile_num_cores_per_socket: Some(2),
            compute_profile_num_cpus: Some(4),
            ..req()
        });
        assert!(m.contains("compute_profile_ram_mb"), "{m}");
        let m = msg(api::PushImage {
            compute_profile_num_cores_per_socket: Some(2),
            compute_profile_ram_mb: Some(4096),
            ..req()
        });
        assert!(m.contains("compute_profile_num_cpus"), "{m}");
        let m = msg(api::PushImage {
            compute_profile_num_cores_per_socket: Some(4),
            compute_profile_num_cpus: Some(6),
            compute_profile_ram_mb: Some(4096),
            ..req()
        });
        assert!(
            m.contains("multiple") && m.contains('6') && m.contains('4'),
            "{m}"
        );
        let m = msg(api::PushImage {
            compute_profile_num_cpus: Some(0),
            ..req()
        });
        assert!(m.contains("compute_profile_num_cpus 0"), "{m}");
        let m = msg(api::PushImage {
            start_time: Some(-5),
            ..req()
        });
        assert!(m.contains("start_time -5"), "{m}");
        let ok = validate_push(&api::PushImage {
            compute_profile_num_cores_per_socket: Some(2),
            compute_profile_num_cpus: Some(4),
            compute_profile_ram_mb: Some(4096),
            selective_push_image: Some(true),
            machine_ids: Some(vec!["m1".into()]),
            ..req()
        })
        .unwrap();
        assert_eq!(ok.compute_profile.num_cpus, Some(4));
        assert_eq!(ok.machine_ids, Some(vec!["m1".to_string()]));
    }

    #[test]
    fn reschedules_differ_only_in_start_time() {
        let a = api::PushImage {
            start_time: Some(1),
            ..req()
        };
        let b = api::PushImage {
            start_time: Some(2),
            ..req()
        };
        let spec = |r: &api::PushImage| validate_push(r).unwrap();
        assert_eq!(differing_field(&spec(&a), &spec(&b)), None);
        let explicit = api::PushImage {
            logoff_policy: Some("WAIT_FOR_LOGOFF".into()),
            stop_on_first_error: Some(true),
            ..b.clone()
        };
        assert_eq!(
            differing_field(&spec(&a), &spec(&explicit)),
            None,
            "spelling out a default is the same request"
        );
        let c = api::PushImage {
            add_virtual_tpm: Some(true),
            ..b
        };
        assert_eq!(
            differing_field(&spec(&a), &spec(&c)),
            Some("add_virtual_tpm")
        );
    }

    #[test]
    fn hook_env_carries_only_what_was_given() {
        let spec = validate_push(&api::PushImage {
            compute_profile_num_cpus: Some(4),
            add_virtual_tpm: Some(true),
            ..req()
        })
        .unwrap();
        let env = hook_env(&spec, Some("img-0"));
        assert_eq!(env["FIELDHAND_COMPUTE_PROFILE_NUM_CPUS"], "4");
        assert_eq!(env["FIELDHAND_ADD_VIRTUAL_TPM"], "true");
        assert_eq!(env["FIELDHAND_POOL_PREVIOUS_IMAGE_ID"], "img-0");
        assert_eq!(env["FIELDHAND_LOGOFF_POLICY"], "WAIT_FOR_LOGOFF");
        assert!(!env.contains_key("FIELDHAND_COMPUTE_PROFILE_RAM_MB"));
        assert!(!env.contains_key("FIELDHAND_COMPUTE_PROFILE_NUM_CORES_PER_SOCKET"));
        assert!(!hook_env(&spec, None).contains_key("FIELDHAND_POOL_PREVIOUS_IMAGE_ID"));
    }

    #[test]
    fn progress_is_the_mean_over_machines() {
        let row =
            |state: MachineState, done: u64, total: u64| super::super::store::TaskMachineRow {
                task_id: "t".into(),
                machine_id: "m".into(),
                assignment_id: "a".into(),
                batch: 0,
                state,
                delivered: true,
                cancel_requested: false,
                dispatched_ms: None,
                started_received_ms: None,
                outcome: Default::default(),
                progress_json: Some(
                    serde_json::to_string(&[ComponentProgress {
                        name: "i".into(),
                        phase: "DOWNLOADING".into(),
                        bytes_done: done,
                        bytes_total: total,
                    }])
                    .unwrap(),
                ),
                power_state: None,
                power_ms: None,
            };
        assert_eq!(percent(&[]), None);
        assert_eq!(
            percent(&[
                row(MachineState::Running, 50, 200),
                row(MachineState::Running, 0, 0)
            ]),
            Some(12)
        );
        assert_eq!(
            percent(&[
                row(MachineState::Succeeded, 0, 0),
                row(MachineState::Running, 100, 100)
            ]),
            Some(100)
        );
    }
}
