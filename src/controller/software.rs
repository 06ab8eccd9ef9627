//! Desired software per host, staged by commit (seed 004, "Stage Hosts Software Task"):
//! operators commit desired documents, and a stage task has the host's agent download,
//! verify and unpack the newest commit at or above the requested minimum.

use super::errors::ApiError;
use super::rollout::TaskState;
use super::store::{TaskMachineRow, TaskRow};
use super::Controller;
use super::{audit, engine};
use crate::pki::Identity;
use crate::proto::agent::{
    ComponentProgress, PayloadManifest, PayloadRef, PayloadSignature, StagePayload,
};
use crate::proto::api;
use crate::proto::domain::{AuditAction, ComponentPhase, ErrorCode, MachineState, TaskKind};
use crate::sys::clock;

const DEFAULT_TIMEOUT_SECONDS: i64 = 3600;
const MAX_TIMEOUT_SECONDS: i64 = 172_800;
/// Signatures outlive the task deadline by this much, so a slow but valid stage still verifies.
const SIGNATURE_SLACK_SECONDS: i64 = 86_400;

fn check_host(machine_id: &str) -> Result<(), ApiError> {
    crate::pki::validate_name("machine_id", machine_id)
        .map_err(|e| ApiError::invalid(e.to_string()))
}

fn unknown_host(machine_id: &str) -> ApiError {
    ApiError::not_found(
        ErrorCode::NotFound,
        format!("machine_id {machine_id:?}: no such host has ever connected"),
    )
}

/// Validates a desired document; errors name the component and field.
pub fn validate_desired(doc: &api::DesiredSoftware) -> Result<(), ApiError> {
    if doc.components.is_empty() {
        return Err(ApiError::invalid("components must not be empty"));
    }
    let mut names = std::collections::HashSet::new();
    for (i, c) in doc.components.iter().enumerate() {
        let at = format!("components[{i}]");
        crate::pki::validate_name(&format!("{at}.name"), &c.name)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        if !names.insert(c.name.as_str()) {
            return Err(ApiError::invalid(format!(
                "{at}.name {:?} appears more than once",
                c.name
            )));
        }
        if c.version.trim().is_empty() || c.version.len() > 128 {
            return Err(ApiError::invalid(format!(
                "{at}.version {:?} (component {:?}) must be 1-128 characters",
                c.version, c.name
            )));
        }
        if !super::blobs::valid_sha256(&c.sha256) {
            return Err(ApiError::invalid(format!(
                "{at}.sha256 {:?} (component {:?}) must be 64 lowercase hex digits",
                c.sha256, c.name
            )));
        }
        match c.format.as_deref() {
            None | Some("file") | Some("tar.gz") => {}
            Some(f) => {
                return Err(ApiError::invalid(format!(
                    "{at}.format {f:?} (component {:?}) must be \"file\" or \"tar.gz\"",
                    c.name
                )))
            }
        }
    }
    Ok(())
}

pub async fn put_desired(
    ctl: &Controller,
    by: &Identity,
    machine_id: String,
    doc: api::DesiredSoftware,
) -> Result<api::CommitCreated, ApiError> {
    check_host(&machine_id)?;
    validate_desired(&doc)?;
    let (by, request) = (by.clone(), doc.clone());
    let mut doc = doc;
    for c in &mut doc.components {
        let Some(size) = ctl.blobs.size(&c.sha256) else {
            return Err(ApiError::invalid(format!(
                "component {:?}: blob sha256 {} has not been uploaded (POST /v1/blobs)",
                c.name, c.sha256
            )));
        };
        if c.size.is_some_and(|s| s != size) {
            return Err(ApiError::invalid(format!(
                "component {:?}: size {} does not match the stored blob ({size} bytes)",
                c.name,
                c.size.unwrap_or(0)
            )));
        }
        // The commit pins the size: a stored blob that changes later is caught by the agent.
        c.size = Some(size);
    }
    let json = serde_json::to_string(&doc).map_err(ApiError::internal)?;
    let now = clock::unix_ms(clock::now());
    let commit = ctl
        .store
        .tx(move |tx| {
            if tx.machine_last_seen(&machine_id)?.is_none() {
                return Err(unknown_host(&machine_id));
            }
            let commit = tx.insert_commit(&machine_id, &json, now)?;
            audit::record(
                tx,
                &by,
                AuditAction::SoftwareDesiredSet,
                &machine_id,
                &request,
            )?;
            Ok::<_, ApiError>(commit)
        })
        .await?;
    Ok(api::CommitCreated {
        commit: commit.to_string(),
    })
}

fn parse_commit(s: &str) -> Result<i64, ApiError> {
    s.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| ApiError::invalid(format!("commit {s:?} is not a commit identifier")))
}

fn parse_doc(json: &str) -> Result<api::DesiredSoftware, ApiError> {
    serde_json::from_str(json).map_err(ApiError::internal)
}

pub async fn stage(
    ctl: &Controller,
    by: &Identity,
    machine_id: String,
    req: api::StageSoftware,
) -> Result<api::TaskCreated, ApiError> {
    check_host(&machine_id)?;
    let by = by.clone();
    let request = req.clone();
    let min_commit = match req.commit.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(c) => Some(parse_commit(c)?),
    };
    let timeout = req.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
    if !(1..=MAX_TIMEOUT_SECONDS).contains(&timeout) {
        return Err(ApiError::invalid(format!(
            "timeout_seconds {timeout} must be 1..={MAX_TIMEOUT_SECONDS}"
        )));
    }
    let now = clock::now();
    let now_ms = clock::unix_ms(now);
    let expires_at =
        clock::rfc3339(now + time::Duration::seconds(timeout + SIGNATURE_SLACK_SECONDS));
    let task_id = uuid::Uuid::new_v4().to_string();
    let tid = task_id.clone();
    // Read the commit first, sign outside the transaction, then create the task; the second
    // transaction re-checks that nothing changed in between.
    let mid = machine_id.clone();
    let (pool_id, commit, doc_json) = ctl
        .store
        .tx(move |tx| {
            let machine = tx
                .machines()?
                .into_iter()
                .find(|m| m.machine_id == mid)
                .ok_or_else(|| unknown_host(&mid))?;
            let (latest, json) = tx.latest_commit(&mid)?.ok_or_else(|| {
                ApiError::not_found(
                    ErrorCode::NotFound,
                    format!("machine_id {mid:?} has no desired software document"),
                )
            })?;
            if let Some(m) = min_commit {
                if m > latest {
                    return Err(ApiError::invalid(format!(
                        "commit \"{m}\" does not exist for {mid:?} (latest is \"{latest}\")"
                    )));
                }
            }
            Ok::<_, ApiError>((machine.pool_id.unwrap_or_default(), latest, json))
        })
        .await?;
    let doc = parse_doc(&doc_json)?;
    let mut components = Vec::with_capacity(doc.components.len());
    for c in &doc.components {
        let stored = ctl.blobs.size(&c.sha256).ok_or_else(|| {
            ApiError::conflict(format!(
                "component {:?}: blob {} is no longer stored",
                c.name, c.sha256
            ))
        })?;
        let size = c.size.unwrap_or(stored);
        let signature = ctl.signer.as_ref().map(|s| {
            let m = PayloadManifest {
                sha256: c.sha256.clone(),
                size,
                name: c.name.clone(),
                expires_at: expires_at.clone(),
            };
            PayloadSignature {
                expires_at: expires_at.clone(),
                ed25519: s.sign(&m),
            }
        });
        components.push(PayloadRef {
            name: c.name.clone(),
            version: c.version.clone(),
            sha256: c.sha256.clone(),
            size,
            format: c.format.clone().unwrap_or_else(|| "file".into()),
            unpacked_size: c.unpacked_size,
            signature,
        });
    }
    let payload = StagePayload {
        commit: commit.to_string(),
        components,
    };
    let payload_json = serde_json::to_string(&payload).map_err(ApiError::internal)?;
    let wake = ctl
        .store
        .tx(move |tx| {
            if tx.latest_commit(&machine_id)?.map(|(c, _)| c) != Some(commit) {
                return Err(ApiError::conflict(format!(
                    "a newer commit for {machine_id:?} arrived meanwhile; retry"
                )));
            }
            if tx.machine_busy(&machine_id)? {
                return Err(ApiError::conflict(format!(
                    "machine_id {machine_id:?} has another operation in progress"
                )));
            }
            tx.insert_task(
                &TaskRow {
                    task_id: tid.clone(),
                    kind: TaskKind::SoftwareStage,
                    pool_id,
                    state: TaskState::Pending,
                    created_ms: now_ms,
                    finished_ms: None,
                    gray_fail_threshold: None,
                    timeout_seconds: timeout as u64,
                    scripts_json: payload_json,
                    power_json: None,
                    created_by: Some(by.name.clone()),
                    cancelled_by: None,
                    rollout: Default::default(),
                },
                &[(machine_id.clone(), uuid::Uuid::new_v4().to_string(), 0)],
            )?;
            audit::record(tx, &by, AuditAction::SoftwareStage, &machine_id, &request)?;
            let mut wake = Vec::new();
            engine::advance(tx, &tid, now_ms, &mut wake)?;
            Ok::<_, ApiError>(wake)
        })
        .await?;
    ctl.wake(&wake);
    Ok(api::TaskCreated { task_id })
}

pub async fn host_software(
    ctl: &Controller,
    machine_id: String,
) -> Result<api::HostSoftware, ApiError> {
    check_host(&machine_id)?;
    let (latest, staged) = ctl
        .store
        .read(move |tx| {
            if tx.machine_last_seen(&machine_id)?.is_none() {
                return Err(unknown_host(&machine_id));
            }
            let latest = tx.latest_commit(&machine_id)?;
            let staged = match tx.staged_commit(&machine_id)? {
                Some(n) => tx.commit_doc(&machine_id, n)?.map(|d| (n, d)),
                None => None,
            };
            Ok::<_, ApiError>((latest, staged))
        })
        .await?;
    let staged_doc = match &staged {
        Some((_, d)) => Some(parse_doc(d)?),
        None => None,
    };
    let components = match &latest {
        Some((_, d)) => parse_doc(d)?
            .components
            .into_iter()
            .map(|c| api::HostComponent {
                staged: staged_doc.as_ref().is_some_and(|s| {
                    s.components
                        .iter()
                        .any(|x| x.name == c.name && x.sha256 == c.sha256)
                }),
                name: c.name,
                version: c.version,
                sha256: c.sha256,
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(api::HostSoftware {
        desired_commit: latest.map(|(n, _)| n.to_string()),
        staged_commit: staged.map(|(n, _)| n.to_string()),
        components,
    })
}

/// Per-component progress of a stage task's machine: the latest report, or the plan.
pub fn component_view(task: &TaskRow, m: &TaskMachineRow) -> Option<Vec<ComponentProgress>> {
    if task.kind != TaskKind::SoftwareStage {
        return None;
    }
    let plan: StagePayload = serde_json::from_str(&task.scripts_json).ok()?;
    let reported: Vec<ComponentProgress> = m
        .progress_json
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    let succeeded = m.state == MachineState::Succeeded;
    Some(
        plan.components
            .iter()
            .map(|c| {
                if succeeded {
                    return ComponentProgress {
                        name: c.name.clone(),
                        phase: ComponentPhase::Staged,
                        bytes_done: c.size,
                        bytes_total: c.size,
                    };
                }
                reported
                    .iter()
                    .find(|r| r.name == c.name)
                    .cloned()
                    .unwrap_or(ComponentProgress {
                        name: c.name.clone(),
                        phase: ComponentPhase::Pending,
                        bytes_done: 0,
                        bytes_total: c.size,
                    })
            })
            .collect(),
    )
}
