//! Pushing an image to a pool (seed 000): the request's rules, a new push or a reschedule,
//! cancelling a scheduled push, and `FINAL_UNPUBLISH`; each makes ordinary tasks that
//! `pool_op` then follows.

use super::*;
use crate::controller::errors::logoff_policy;
use crate::controller::errors::ApiError;
use crate::controller::store::{ImageRow, PoolImageRow, TaskRow, Tx};
use crate::controller::Controller;
use crate::controller::{audit, engine};
use crate::pki::Identity;
use crate::proto::agent::{
    ImageAssignment, PayloadManifest, PayloadRef, PayloadSignature, PowerSpec,
};
use crate::proto::api;
use crate::proto::domain::{
    AuditAction, CurrentImageState, LogoffPolicy, PendingImageState, PoolOperation, PostFinish,
    PreStart, TaskKind, TaskState,
};
use crate::sys::clock;

/// A push request with the seed's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushSpec {
    pub image_id: String,
    /// Epoch ms; `None`: now.
    pub start_time: Option<i64>,
    pub logoff_policy: LogoffPolicy,
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
    let logoff_policy = logoff_policy(req.logoff_policy.as_deref())?;
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
    put("LOGOFF_POLICY", Some(spec.logoff_policy.to_string()));
    put(
        "POOL_PREVIOUS_IMAGE_ID",
        previous_image_id.map(str::to_string),
    );
    env
}

pub fn image_payload(
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

pub fn new_task(
    kind: TaskKind,
    pool_id: &str,
    now_ms: i64,
    timeout: u64,
    img: &ImageAssignment,
    power: Option<&PowerSpec>,
    threshold: Option<u32>,
) -> Result<TaskRow, ApiError> {
    Ok(TaskRow {
        task_id: uuid::Uuid::new_v4().to_string(),
        kind,
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
        created_by: None,
        cancelled_by: None,
        rollout: Default::default(),
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

/// `POST /v1/pools/{pool_id}/push-image` (seed 000): a new push, or a reschedule of the
/// scheduled one (same `task_id`).
pub async fn push(
    ctl: &Controller,
    by: &Identity,
    pool_id: String,
    req: api::PushImage,
) -> Result<api::TaskCreated, ApiError> {
    let by = by.clone();
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
            if is_push(op.operation) && !not_started {
                return Err(ApiError::conflict(format!(
                    "pool {pool_id:?}: the push of task {} reached its start_time; it can no longer be rescheduled",
                    op.task_id.as_deref().unwrap_or("?")
                )));
            }
            if is_push(op.operation) {
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
                audit::record(tx, &by, AuditAction::PushReschedule, &pool_id, &req)?;
                tracing::info!(pool_id, task_id = ?op.task_id, start_ms, "push rescheduled");
                return Ok((op.task_id.unwrap_or_default(), wake));
            }
            if op.operation != PoolOperation::None {
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
                return Err(crate::controller::errors::no_machines(&pool_id));
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
            let grace = crate::controller::settings::force_logoff_grace(tx)? as u64;
            let power = PowerSpec {
                pre_start: Some(PreStart::Logoff),
                post_finish: Some(PostFinish::Reboot),
                logoff_policy: spec.logoff_policy,
                logoff_timeout_seconds: crate::controller::settings::DEFAULT_LOGOFF_TIMEOUT_SECONDS as u64,
                force_logoff_grace_seconds: grace,
            };
            let mut stage = new_task(TaskKind::ImageStage, &pool_id, now_ms, spec.timeout_seconds, &stage_img, None, None)?;
            let mut apply = new_task(
                TaskKind::ImageApply,
                &pool_id,
                now_ms,
                spec.timeout_seconds,
                &apply_img,
                Some(&power),
                canary.then_some(1),
            )?;
            stage.created_by = Some(by.name.clone());
            apply.created_by = Some(by.name.clone());
            tx.insert_task(&stage, &machines_of(std::slice::from_ref(&ids)))?;
            tx.insert_task(&apply, &machines_of(&apply_batches))?;
            op = PoolImageRow {
                operation: if op.current_image_id.is_none() { PoolOperation::InitialPublish } else { PoolOperation::SchedulePushImage },
                task_id: Some(apply.task_id.clone()),
                stage_task_id: Some(stage.task_id.clone()),
                apply_task_id: Some(apply.task_id.clone()),
                remove_task_id: None,
                released: false,
                request_json: Some(request_json),
                start_ms: Some(start_ms),
                selective: spec.machine_ids.is_some(),
                pending_image_id: Some(spec.image_id.clone()),
                pending_state: Some(PendingImageState::PendingPublish),
                ..op
            };
            // Saved before the stage task moves, so the apply task is held from the start.
            tx.put_pool_image(&op)?;
            for id in &ids {
                let mut m = tx.machine_image(id)?;
                m.pending_image_id = Some(spec.image_id.clone());
                m.pending_state = Some(PendingImageState::PendingPublish);
                tx.put_machine_image(&m)?;
            }
            engine::advance(tx, &stage.task_id, now_ms, &mut wake)?;
            reconcile(tx, &pool_id, now_ms, &mut wake)?;
            audit::record(tx, &by, AuditAction::PushImage, &pool_id, &req)?;
            tracing::info!(pool_id, task_id = %apply.task_id, image_id = %spec.image_id, machines = ids.len(), start_ms, "push scheduled");
            Ok::<_, ApiError>((apply.task_id, wake))
        })
        .await?;
    ctl.wake(&wake);
    Ok(api::TaskCreated { task_id })
}

/// Starts a remove task for `machines` (`image_id` while pending, or every image); returns
/// its id.
/// Started for the operator `by`.
fn start_removal(
    tx: &mut Tx<'_>,
    by: &Identity,
    pool_id: &str,
    machines: &[String],
    (image_id, remove_all): (String, bool),
    now_ms: i64,
    wake: &mut engine::Wake,
) -> Result<String, ApiError> {
    let img = ImageAssignment {
        image_id,
        remove_all,
        ..Default::default()
    };
    let mut task = new_task(
        TaskKind::ImageRemove,
        pool_id,
        now_ms,
        REMOVE_TIMEOUT_SECONDS,
        &img,
        None,
        None,
    )?;
    task.created_by = Some(by.name.clone());
    tx.insert_task(&task, &machines_of(&[machines.to_vec()]))?;
    engine::advance(tx, &task.task_id, now_ms, wake)?;
    Ok(task.task_id)
}

/// `POST /v1/pools/{pool_id}/push-image/cancel`: before the start time only.
pub async fn cancel_push(
    ctl: &Controller,
    by: &Identity,
    pool_id: String,
) -> Result<api::ProvisioningStatus, ApiError> {
    check_pool(&pool_id)?;
    let by = by.clone();
    let now_ms = clock::unix_ms(clock::now());
    let pid = pool_id.clone();
    let wake = ctl
        .store
        .tx(move |tx| {
            let mut wake = Vec::new();
            let mut op = pool_row(tx, &pid)?;
            if !is_push(op.operation) {
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
            op.operation = PoolOperation::CancelScheduledPushImage;
            tx.put_pool_image(&op)?;
            for id in [&stage_id, &apply_id] {
                match engine::cancel(tx, id, now_ms, &mut wake) {
                    Ok(_) => tx.set_task_cancelled_by(id, &by.name)?,
                    Err(engine::EngineError::NotCancellable { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let machines: Vec<String> = tx.task_machines(&stage_id)?.into_iter().map(|m| m.machine_id).collect();
            op.remove_task_id = Some(start_removal(
                tx, &by, &pid, &machines, (image_id, false), now_ms, &mut wake,
            )?);
            tx.put_pool_image(&op)?;
            reconcile(tx, &pid, now_ms, &mut wake)?;
            audit::record(tx, &by, AuditAction::PushCancel, &pid, &serde_json::json!({}))?;
            tracing::info!(pool_id = %pid, task_id = ?op.task_id, "scheduled push cancelled");
            Ok::<_, ApiError>(wake)
        })
        .await?;
    ctl.wake(&wake);
    provisioning_status(ctl, pool_id).await
}

/// `DELETE /v1/pools/{pool_id}/image`: `FINAL_UNPUBLISH`, every image leaves the pool's
/// machines.
pub async fn unpublish(
    ctl: &Controller,
    by: &Identity,
    pool_id: String,
) -> Result<api::TaskCreated, ApiError> {
    check_pool(&pool_id)?;
    let by = by.clone();
    let now_ms = clock::unix_ms(clock::now());
    let (task_id, wake) = ctl
        .store
        .tx(move |tx| {
            let mut wake = Vec::new();
            let mut op = pool_row(tx, &pool_id)?;
            if op.operation != PoolOperation::None {
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
                return Err(crate::controller::errors::no_machines(&pool_id));
            }
            let task_id = start_removal(
                tx,
                &by,
                &pool_id,
                &machines,
                (image_id, true),
                now_ms,
                &mut wake,
            )?;
            op.operation = PoolOperation::FinalUnpublish;
            op.current_state = Some(CurrentImageState::PendingUnpublish);
            op.task_id = Some(task_id.clone());
            op.remove_task_id = Some(task_id.clone());
            tx.put_pool_image(&op)?;
            reconcile(tx, &pool_id, now_ms, &mut wake)?;
            audit::record(
                tx,
                &by,
                AuditAction::UnpublishImage,
                &pool_id,
                &serde_json::json!({}),
            )?;
            Ok::<_, ApiError>((task_id, wake))
        })
        .await?;
    ctl.wake(&wake);
    Ok(api::TaskCreated { task_id })
}
