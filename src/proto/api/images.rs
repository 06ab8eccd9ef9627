//! Images (seed 000/001: register, push to a pool, pending and current states), desktop
//! rebuilds (seed 003), blobs and hosts' desired software by commit (seed 004).

use serde::{Deserialize, Serialize};

use crate::proto::domain::{
    CurrentImageState, ErrorCode, PendingImageState, PoolOperation, RebuildCode,
};

/// `POST /v1/images`: register a tar.gz blob as an image (seed 000/001).
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    pub name: String,
    pub version: String,
    /// Free text, e.g. `linux`.
    pub os_type: String,
    pub gpu: bool,
    pub sha256: String,
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct ImageCreated {
    pub image_id: String,
}

/// One entry of `GET /v1/images`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub image_id: String,
    pub name: String,
    pub version: String,
    pub os_type: String,
    pub gpu: bool,
    pub sha256: String,
    pub size: u64,
    pub created_at: String,
}

/// `POST /v1/pools/{pool_id}/push-image`, with the field names of seed 000.
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushImage {
    pub image_id: Option<String>,
    /// Epoch milliseconds; absent or in the past means now.
    pub start_time: Option<i64>,
    pub logoff_policy: Option<String>,
    pub stop_on_first_error: Option<bool>,
    pub selective_push_image: Option<bool>,
    pub machine_ids: Option<Vec<String>>,
    pub compute_profile_num_cpus: Option<i64>,
    pub compute_profile_num_cores_per_socket: Option<i64>,
    pub compute_profile_ram_mb: Option<i64>,
    pub add_virtual_tpm: Option<bool>,
    /// fieldhand extension: the limit for staging the image and for each hook run on a
    /// machine, in seconds (default 3600).
    pub timeout_seconds: Option<i64>,
}

/// `POST /v1/desktops/rebuild` (seed 003 "RebuildDesktops").
#[derive(utoipa::ToSchema, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildDesktops {
    /// 1 to 20 machine ids.
    #[serde(default)]
    pub desktop_ids: Vec<String>,
    /// Default: each machine's current image (a fresh copy of it).
    pub image_id: Option<String>,
    /// `replace` (empty the data area), or absent.
    pub operate_type: Option<String>,
    /// `en-US`, `zh-HK`, `zh-CN` or `ja-JP`.
    pub language: Option<String>,
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct RebuildResponse {
    /// The task that follows the started rebuilds (`GET /v1/tasks/{request_id}`).
    pub request_id: String,
    pub rebuild_results: Vec<RebuildResult>,
}

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildResult {
    pub desktop_id: String,
    pub code: RebuildCode,
    /// Why, when `code` is not `Success`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `GET /v1/pools/{pool_id}/provisioning-status` (seed 001 names and values).
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisioningStatus {
    pub operation: PoolOperation,
    /// Null without a pending image.
    pub pending_image_state: Option<PendingImageState>,
    /// Null without an image.
    pub current_image_state: Option<CurrentImageState>,
    pub pending_image_id: Option<String>,
    pub current_image_id: Option<String>,
    /// Percent of the pending image's bytes staged across the targeted machines.
    pub pending_image_progress: Option<u32>,
    /// When the scheduled push applies (epoch ms).
    pub start_time: Option<i64>,
    /// The task of the current (or last) operation.
    pub task_id: Option<String>,
    pub machines: MachineCounts,
    /// Why the last operation failed (its first machine's error), when it did.
    #[serde(default)]
    pub error_code: Option<ErrorCode>,
    #[serde(default)]
    pub error_msg: Option<String>,
}

/// Machines of the current (or last) operation, by outcome.
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineCounts {
    pub total: u32,
    pub pending: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// Skipped (stop_on_first_error) or cancelled.
    pub skipped: u32,
}

/// A machine's images (seed 001 states), in `GET /v1/machines[/{machine_id}]`.
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineImage {
    pub current_image_id: Option<String>,
    pub current_image_state: Option<CurrentImageState>,
    pub pending_image_id: Option<String>,
    pub pending_image_state: Option<PendingImageState>,
    /// Percent of the pending image staged on this machine, while it is `PUBLISHING`.
    pub pending_image_progress: Option<u32>,
    /// The language of the last rebuild that set one (seed 003).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

/// `GET/PUT /v1/settings`: global settings (seed 000 "Global Settings").
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub force_logoff_grace_seconds: i64,
}

/// `POST /v1/blobs` answer, and `GET /v1/blobs/{sha256}` (with `bytes_served`).
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Blob {
    pub sha256: String,
    pub size: u64,
    /// Bytes sent to agents since the controller started (resumed downloads send less).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_served: Option<u64>,
}

/// `PUT /v1/hosts/{machine_id}/software/desired`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredSoftware {
    pub components: Vec<DesiredComponent>,
}

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredComponent {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// `file` (default) or `tar.gz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Declared unpacked size in bytes (tar.gz), used for the disk-space check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked_size: Option<u64>,
    /// Blob size in bytes; optional on input (checked if given), pinned by the commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct CommitCreated {
    pub commit: String,
}

/// `POST /v1/hosts/{machine_id}/software/stage`.
#[derive(utoipa::ToSchema, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSoftware {
    /// The minimum commit to stage; the newest commit is staged if it is newer.
    #[serde(default)]
    pub commit: Option<String>,
    #[serde(default)]
    pub timeout_seconds: Option<i64>,
}

/// `GET /v1/hosts/{machine_id}/software`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct HostSoftware {
    pub desired_commit: Option<String>,
    pub staged_commit: Option<String>,
    pub components: Vec<HostComponent>,
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct HostComponent {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub staged: bool,
}
