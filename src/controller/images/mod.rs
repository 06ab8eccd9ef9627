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

mod pool_op;
mod push;
mod registry;
mod views;

use crate::proto::domain::PoolOperation;
pub use pool_op::{observe, reconcile, tick};
pub use push::{
    cancel_push, differing_field, hook_env, image_payload, new_task, push, unpublish,
    validate_push, ComputeProfile, PushSpec,
};
pub use registry::{create_image, list_images};
#[cfg(test)]
use views::percent;
pub use views::{machine_view, provisioning_in, provisioning_status};

use super::errors::ApiError;
use super::store::{PoolImageRow, StoreError, Tx};

const DEFAULT_TIMEOUT_SECONDS: i64 = 3600;
const MAX_TIMEOUT_SECONDS: i64 = 172_800;
/// Removing an image is quick; a machine that does not answer in time is left to prune
/// the image itself when it next stages one.
const REMOVE_TIMEOUT_SECONDS: u64 = 300;
/// Signatures outlive the staging deadline by this much.
const SIGNATURE_SLACK_SECONDS: i64 = 86_400;

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

/// The pool's image operation, or a fresh one (`NONE`) for a pool that never had one.
pub(super) fn pool_row(tx: &mut Tx<'_>, pool_id: &str) -> Result<PoolImageRow, StoreError> {
    Ok(tx.pool_image(pool_id)?.unwrap_or_else(|| PoolImageRow {
        pool_id: pool_id.to_string(),
        operation: PoolOperation::None,
        ..PoolImageRow::default()
    }))
}

pub(super) fn is_push(op: PoolOperation) -> bool {
    match op {
        PoolOperation::InitialPublish | PoolOperation::SchedulePushImage => true,
        PoolOperation::None
        | PoolOperation::CancelScheduledPushImage
        | PoolOperation::FinalUnpublish => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::rollout::MachineState;
    use crate::proto::agent::ComponentProgress;
    use crate::proto::api;

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
        assert_eq!(
            s.logoff_policy,
            crate::proto::domain::LogoffPolicy::WaitForLogoff
        );
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
            |state: MachineState, done: u64, total: u64| crate::controller::store::TaskMachineRow {
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
                        phase: crate::proto::domain::ComponentPhase::Downloading,
                        bytes_done: done,
                        bytes_total: total,
                    }])
                    .unwrap(),
                ),
                power_state: None,
                power_ms: None,
                power_pool: None,
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
