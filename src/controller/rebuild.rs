//! Rebuilding desktops onto an image (seed 003, "RebuildDesktops"): the request is checked as
//! a whole (a 4xx touches no machine), then each desktop gets its own result code, and the
//! desktops that can start get one `image_rebuild` task. On each machine a rebuild is an
//! `ImageApply` that first extracts the image into a fresh slot, so it reuses the image
//! lifecycle (logoff, switch-in, reboot, health check, rollback) of `images`.

use super::errors::ApiError;
use super::images;
use super::rollout::TaskState;
use super::store::{ImageRow, MachineRow, StoreError, Tx};
use super::Controller;
use super::{audit, engine};
use crate::pki::Identity;
use crate::proto::agent::{HostFacts, ImageAssignment, PowerSpec};
use crate::proto::api;
use crate::proto::domain::{
    AuditAction, LogoffPolicy, PoolOperation, PostFinish, PreStart, RebuildCode, TaskKind,
};
use crate::sys::clock;

/// Seed 003: "You can specify 1 to 20 IDs".
pub const MAX_DESKTOPS: usize = 20;
pub const LANGUAGES: [&str; 4] = ["en-US", "zh-HK", "zh-CN", "ja-JP"];
const TIMEOUT_SECONDS: u64 = 3600;

/// A valid request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildSpec {
    pub desktop_ids: Vec<String>,
    pub image_id: Option<String>,
    pub replace: bool,
    pub language: Option<String>,
}

/// The request-wide rules; a broken one is a 400 naming the field and value.
pub fn validate(req: &api::RebuildDesktops) -> Result<RebuildSpec, ApiError> {
    let ids = &req.desktop_ids;
    if ids.is_empty() || ids.len() > MAX_DESKTOPS {
        return Err(ApiError::invalid(format!(
            "desktop_ids has {} ids; give 1 to {MAX_DESKTOPS}",
            ids.len()
        )));
    }
    for (i, id) in ids.iter().enumerate() {
        crate::pki::validate_name("desktop_ids", id)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        if ids[..i].contains(id) {
            return Err(ApiError::invalid(format!("desktop_ids lists {id:?} twice")));
        }
    }
    let replace = match req.operate_type.as_deref() {
        None => false,
        Some("replace") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "operate_type {other:?} must be \"replace\" or absent"
            )))
        }
    };
    if let Some(l) = &req.language {
        if !LANGUAGES.contains(&l.as_str()) {
            return Err(ApiError::invalid(format!(
                "language {l:?} must be one of {}",
                LANGUAGES.join(", ")
            )));
        }
    }
    if let Some(id) = &req.image_id {
        crate::pki::validate_name("image_id", id).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    Ok(RebuildSpec {
        desktop_ids: ids.clone(),
        image_id: req.image_id.clone(),
        replace,
        language: req.language.clone(),
    })
}

/// Whether the data area is emptied (seed 003, `OperateType`): always for `replace`; without
/// it, when the operating system changes. With no known current image there is no OS change
/// to speak of, and the data area is kept.
pub fn empties_data(replace: bool, old_os: Option<&str>, new_os: &str) -> bool {
    replace || old_os.is_some_and(|o| o != new_os)
}

fn result(desktop_id: &str, code: RebuildCode, message: Option<String>) -> api::RebuildResult {
    api::RebuildResult {
        desktop_id: desktop_id.to_string(),
        code,
        message,
    }
}

/// Why a known, online desktop cannot start now, if it cannot.
fn busy(tx: &mut Tx<'_>, id: &str, pool_id: &str) -> Result<Option<String>, StoreError> {
    let pool_op = tx
        .pool_image(pool_id)?
        .map(|p| p.operation)
        .filter(|o| *o != PoolOperation::None);
    if let Some(op) = pool_op {
        return Ok(Some(format!(
            "desktop {id:?}: its pool {pool_id:?} has image operation {op} in progress"
        )));
    }
    Ok(tx
        .machine_busy(id)?
        .then(|| format!("desktop {id:?} has another operation in progress")))
}

/// A desktop that can start: its pool, the image, and whether its data area is emptied.
struct Start {
    machine_id: String,
    pool_id: String,
    image: ImageRow,
    empty_data: bool,
    /// Why the data area is emptied, for the desktop's result message.
    data_note: Option<String>,
}

/// Decides one desktop: a [`Start`], or its result code.
fn check(
    tx: &mut Tx<'_>,
    spec: &RebuildSpec,
    machine: Option<&MachineRow>,
    id: &str,
    online: bool,
) -> Result<Result<Start, api::RebuildResult>, StoreError> {
    let status = |msg: String| {
        Ok(Err(result(
            id,
            RebuildCode::IncorrectDesktopStatus,
            Some(msg),
        )))
    };
    let Some(m) = machine else {
        return status(format!(
            "desktop {id:?} is unknown: no such machine has ever connected"
        ));
    };
    if !online {
        return status(format!(
            "desktop {id:?} is offline (last seen {})",
            clock::from_unix_ms(m.last_seen_ms)
                .map(clock::rfc3339)
                .unwrap_or_default()
        ));
    }
    if let Some(why) = busy(tx, id, m.pool_id.as_deref().unwrap_or(""))? {
        return status(why);
    }
    let current = tx.machine_image(id)?.current_image_id;
    let Some(image_id) = spec.image_id.clone().or(current.clone()) else {
        return status(format!(
            "desktop {id:?} has no current image to re-initialize onto; give image_id"
        ));
    };
    let Some(image) = tx.image(&image_id)? else {
        return status(format!(
            "desktop {id:?}: its image {image_id} is no longer registered"
        ));
    };
    let gpu = m
        .facts_json
        .as_deref()
        .and_then(|j| serde_json::from_str::<HostFacts>(j).ok())
        .is_some_and(|f| f.gpu);
    if image.gpu != gpu {
        let img = if image.gpu {
            "a GPU image"
        } else {
            "a non-GPU image"
        };
        let mach = if gpu {
            "has a GPU (as reported by its agent)"
        } else {
            "has no GPU (as reported by its agent)"
        };
        return Ok(Err(result(
            id,
            RebuildCode::IncompatibleImage,
            Some(format!(
                "image {image_id} is {img} and desktop {id:?} {mach}; GPU and non-GPU images cannot be swapped"
            )),
        )));
    }
    let old_os = match &current {
        Some(c) => tx.image(c)?.map(|i| i.os_type),
        None => None,
    };
    let empty_data = empties_data(spec.replace, old_os.as_deref(), &image.os_type);
    let data_note = match (empty_data, spec.replace, &old_os) {
        (true, true, _) => Some("the data area is emptied (replace)".to_string()),
        (true, false, Some(old)) => Some(format!(
            "the data area is emptied: os_type changes from {old} to {} (the current image is \
             as reported by the desktop's agent)",
            image.os_type
        )),
        _ => None,
    };
    Ok(Ok(Start {
        data_note,
        machine_id: id.to_string(),
        pool_id: m.pool_id.clone().unwrap_or_default(),
        empty_data,
        image,
    }))
}

/// `POST /v1/desktops/rebuild`.
pub async fn rebuild(
    ctl: &Controller,
    by: &Identity,
    req: api::RebuildDesktops,
) -> Result<api::RebuildResponse, ApiError> {
    let spec = validate(&req)?;
    let by = by.clone();
    if let Some(id) = &spec.image_id {
        let iid = id.clone();
        if ctl.store.tx(move |tx| tx.image(&iid)).await?.is_none() {
            return Err(ApiError::invalid(format!(
                "image_id {id:?}: no such image (see GET /v1/images)"
            )));
        }
    }
    let now_ms = clock::unix_ms(clock::now());
    let offline_ms = ctl.cfg.offline_after.as_millis() as i64;
    let polling = ctl.polling();
    // First decide every desktop, then sign the payloads of the images that are needed
    // (outside any transaction), then start them, checking again that nothing started on
    // those machines in between.
    let ids = spec.desktop_ids.clone();
    let sp = spec.clone();
    let decisions = ctl
        .store
        .tx(move |tx| {
            let machines = tx.machines()?;
            let mut out = Vec::with_capacity(ids.len());
            for id in &ids {
                let m = machines.iter().find(|m| &m.machine_id == id);
                let online = m.is_some_and(|m| {
                    now_ms - m.last_seen_ms <= offline_ms || polling.contains(&m.machine_id)
                });
                out.push(check(tx, &sp, m, id, online)?);
            }
            Ok::<_, StoreError>(out)
        })
        .await?;
    let mut payloads = std::collections::HashMap::new();
    for d in decisions.iter().flatten() {
        if !payloads.contains_key(&d.image.image_id) {
            let p = images::image_payload(ctl, &d.image, TIMEOUT_SECONDS);
            payloads.insert(d.image.image_id.clone(), p);
        }
    }
    let (resp, wake) = ctl
        .store
        .tx(move |tx| {
            let mut results = Vec::new();
            let mut starts = Vec::new();
            for d in decisions {
                let start = match d {
                    Err(r) => {
                        results.push(r);
                        continue;
                    }
                    Ok(s) => s,
                };
                let id = start.machine_id.clone();
                if let Some(why) = busy(tx, &id, &start.pool_id)? {
                    results.push(result(&id, RebuildCode::IncorrectDesktopStatus, Some(why)));
                    continue;
                }
                match &payloads[&start.image.image_id] {
                    Ok(p) => {
                        results.push(result(&id, RebuildCode::Success, start.data_note.clone()));
                        starts.push((start, p.clone()));
                    }
                    Err(e) => results.push(result(&id, RebuildCode::IncorrectDesktopStatus, Some(e.msg.clone()))),
                }
            }
            let mut pools: Vec<&str> = starts.iter().map(|(s, _)| s.pool_id.as_str()).collect();
            pools.sort_unstable();
            pools.dedup();
            let pool = if pools.len() == 1 { pools[0] } else { "" };
            let power = PowerSpec {
                pre_start: Some(PreStart::Logoff),
                post_finish: Some(PostFinish::Reboot),
                // Seed 003: a rebuild erases the system disk, so users are logged off after
                // the global grace period (and warned), never waited for.
                logoff_policy: LogoffPolicy::ForceLogoff,
                logoff_timeout_seconds: super::settings::DEFAULT_LOGOFF_TIMEOUT_SECONDS as u64,
                force_logoff_grace_seconds: super::settings::force_logoff_grace(tx)? as u64,
            };
            let mut task = images::new_task(
                TaskKind::ImageRebuild,
                pool,
                now_ms,
                TIMEOUT_SECONDS,
                &ImageAssignment::default(),
                Some(&power),
                None,
            )?;
            task.created_by = Some(by.name.clone());
            let rows: Vec<(String, String, u32)> = starts
                .iter()
                .map(|(s, _)| (s.machine_id.clone(), uuid::Uuid::new_v4().to_string(), 0))
                .collect();
            tx.insert_task(&task, &rows)?;
            for ((start, payload), (_, assignment_id, _)) in starts.into_iter().zip(&rows) {
                let image_id = start.image.image_id;
                let img = ImageAssignment {
                    // A slot never used before: the image id and this assignment.
                    slot: Some(format!("{image_id}.{}", &assignment_id[..8])),
                    image_id,
                    payload: Some(payload),
                    empty_data: start.empty_data,
                    language: spec.language.clone(),
                    env: spec
                        .replace
                        .then(|| ("FIELDHAND_OPERATE_TYPE".to_string(), "replace".to_string()))
                        .into_iter()
                        .collect(),
                    remove_all: false,
                };
                let json = serde_json::to_string(&img).map_err(ApiError::internal)?;
                tx.put_assignment_payload(assignment_id, &json)?;
                tracing::info!(task_id = %task.task_id, machine_id = %start.machine_id, image_id = %img.image_id, empty_data = img.empty_data, "rebuild started");
            }
            let mut wake = Vec::new();
            if rows.is_empty() {
                // Nothing started: the request is over at once.
                tx.set_task_state(&task.task_id, TaskState::Failed, Some(now_ms))?;
            } else {
                engine::advance(tx, &task.task_id, now_ms, &mut wake)?;
            }
            audit::record(tx, &by, AuditAction::Rebuild, &task.task_id, &req)?;
            Ok::<_, ApiError>((
                api::RebuildResponse {
                    request_id: task.task_id,
                    rebuild_results: results,
                },
                wake,
            ))
        })
        .await?;
    ctl.wake(&wake);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ids: &[&str]) -> api::RebuildDesktops {
        api::RebuildDesktops {
            desktop_ids: ids.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn request_rules_name_the_field() {
        let msg = |r: api::RebuildDesktops| validate(&r).unwrap_err().msg;
        assert!(msg(req(&[])).contains("desktop_ids has 0"));
        let many: Vec<String> = (0..21).map(|i| format!("m{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(msg(req(&many)).contains("desktop_ids has 21"));
        assert!(validate(&req(&many[..20])).is_ok(), "20 is allowed");
        assert!(msg(req(&["m1", "m1"])).contains("twice"));
        assert!(msg(req(&["../x"])).contains("desktop_ids"));
        let m = msg(api::RebuildDesktops {
            operate_type: Some("keep".into()),
            ..req(&["m1"])
        });
        assert!(m.contains("operate_type") && m.contains("keep"), "{m}");
        let m = msg(api::RebuildDesktops {
            language: Some("fr-FR".into()),
            ..req(&["m1"])
        });
        assert!(m.contains("language") && m.contains("fr-FR"), "{m}");
        let ok = validate(&api::RebuildDesktops {
            operate_type: Some("replace".into()),
            language: Some("ja-JP".into()),
            ..req(&["m1"])
        })
        .unwrap();
        assert!(ok.replace);
    }

    #[test]
    fn data_area_rules_follow_the_seed() {
        assert!(
            !empties_data(false, Some("linux"), "linux"),
            "same OS: kept"
        );
        assert!(
            empties_data(false, Some("windows"), "linux"),
            "OS changes: erased"
        );
        assert!(
            empties_data(true, Some("linux"), "linux"),
            "replace: replaced"
        );
        assert!(empties_data(true, None, "linux"));
        assert!(!empties_data(false, None, "linux"), "no known OS: kept");
    }
}
