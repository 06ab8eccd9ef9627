//! Images (seeds 000 and 001): the registry of tar.gz blobs that can be pushed to a pool,
//! and the validation of push-image requests with the seed's rules.
//!
//! Status: the registry is served; the push itself (staging through the payload engine,
//! the scheduled apply with the reboot protocol, health-gated commit and rollback, and the
//! provisioning status) is not wired yet. `validate_push` is the contract it will use.

use super::api::ApiError;
use super::store::ImageRow;
use super::Controller;
use crate::proto::api;
use crate::sys::clock;

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
    })
}

/// For a reschedule: the first field, other than `start_time`, where two requests differ.
pub fn differing_field(a: &api::PushImage, b: &api::PushImage) -> Option<&'static str> {
    let fields: [(&'static str, bool); 9] = [
        ("image_id", a.image_id == b.image_id),
        ("logoff_policy", a.logoff_policy == b.logoff_policy),
        (
            "stop_on_first_error",
            a.stop_on_first_error == b.stop_on_first_error,
        ),
        (
            "selective_push_image",
            a.selective_push_image == b.selective_push_image,
        ),
        ("machine_ids", a.machine_ids == b.machine_ids),
        (
            "compute_profile_num_cpus",
            a.compute_profile_num_cpus == b.compute_profile_num_cpus,
        ),
        (
            "compute_profile_num_cores_per_socket",
            a.compute_profile_num_cores_per_socket == b.compute_profile_num_cores_per_socket,
        ),
        (
            "compute_profile_ram_mb",
            a.compute_profile_ram_mb == b.compute_profile_ram_mb,
        ),
        ("add_virtual_tpm", a.add_virtual_tpm == b.add_virtual_tpm),
    ];
    fields.iter().find(|(_, same)| !same).map(|(f, _)| *f)
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
        assert_eq!(differing_field(&a, &b), None);
        let c = api::PushImage {
            add_virtual_tpm: Some(true),
            ..b
        };
        assert_eq!(differing_field(&a, &c), Some("add_virtual_tpm"));
    }
}
