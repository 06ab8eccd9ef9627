//! The operator API's OpenAPI 3.1 document (`GET /v1/openapi.json`). The schemas come from
//! the `proto` types themselves (utoipa's `ToSchema`), so a field cannot be documented one way
//! and read another; the operations below are declarations only (utoipa reads them from
//! functions), and a test holds their set equal to the router's `ROUTES`.

#![allow(dead_code)] // The functions exist for their `#[utoipa::path]` attributes.

use utoipa::OpenApi;

use crate::proto::api;

/// The body of every error: any status the operation may answer besides its success, with
/// `error_code` naming why (`ErrorCode`).
const ERRORS: &str = "An error: `{error_code, error_msg}`";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fieldhand operator API",
        description = "Operators drive the fleet through this API over mutual TLS with an \
                       operator certificate (`pki issue --operator NAME`). Every error is \
                       `{error_code, error_msg}` with the matching status.",
        license(name = "Apache-2.0")
    ),
    paths(
        create_script,
        create_execution,
        get_task,
        task_summary,
        task_machines,
        cancel_task,
        retry_task,
        resume_task,
        get_power_limit,
        put_power_limit,
        list_tasks,
        list_machines,
        get_machine,
        list_scripts,
        get_script,
        list_pools,
        get_pool,
        list_audit,
        decommission_machine,
        move_machine,
        get_settings,
        put_settings,
        create_image,
        list_images,
        push_image,
        cancel_push,
        provisioning_status,
        unpublish_image,
        rebuild_desktops,
        put_desired_software,
        stage_software,
        host_software,
        upload_blob,
        blob_info,
        delete_blob,
        create_enrollment_token,
        list_enrollment_tokens,
        delete_enrollment_token,
        revoke,
        list_revocations,
        openapi_document,
    ),
    components(schemas(api::ErrorBody))
)]
pub struct Doc;

/// The document, as served.
pub fn document() -> utoipa::openapi::OpenApi {
    Doc::openapi()
}

#[utoipa::path(post, path = "/v1/scripts", request_body(content = api::CreateScript, example = json!({"name": "restart-agentd", "command_type": "sh", "content": "systemctl restart agentd\n"})),
    responses((status = 200, body = api::ScriptCreated), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn create_script() {}

/// A script execution over a pool in gray batches (seed 002).
#[utoipa::path(post, path = "/v1/pools/{pool_id}/script-executions",
    params(("pool_id" = String, Path)), request_body(content = api::CreateScriptExecution, example = json!({"command_content": "systemctl restart foo", "command_type": "sh", "gray_count": 1, "gray_fail_threshold": 1, "max_concurrency": "10%", "max_errors": 5, "post_finish": "reboot", "execution_timeout_seconds": 600})),
    responses((status = 200, body = api::TaskCreated, example = json!({"task_id": "6d0e0fb0-1b71-4502-973a-24b0543a5d5d"})), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn create_execution() {}

#[utoipa::path(get, path = "/v1/tasks/{task_id}", params(("task_id" = String, Path)),
    responses((status = 200, body = api::Task), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn get_task() {}

/// The task with its machines counted by state, per batch and in all: no per-machine row,
/// so polling it costs the same at any task size.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/summary", params(("task_id" = String, Path)),
    responses((status = 200, body = api::TaskProgress), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn task_summary() {}

/// One page of the task's machines (ordered by batch, then machine id), optionally only
/// those in one state, with the counts a pager needs.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/machines",
    params(("task_id" = String, Path),
           ("state" = Option<crate::proto::domain::MachineState>, Query, description = "only machines in this state"),
           ("limit" = Option<u32>, Query, description = "rows per page, 1..=1000 (default 100)"),
           ("offset" = Option<u32>, Query, description = "rows to skip (default 0)")),
    responses((status = 200, body = api::TaskMachinePage), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn task_machines() {}

#[utoipa::path(post, path = "/v1/tasks/{task_id}/cancel", params(("task_id" = String, Path)),
    responses((status = 200, body = api::Task), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn cancel_task() {}

/// Tasks, newest first.
#[utoipa::path(get, path = "/v1/tasks",
    params(
        ("pool_id" = Option<String>, Query),
        ("state" = Option<crate::proto::domain::TaskState>, Query),
        ("kind" = Option<crate::proto::domain::TaskKind>, Query),
        ("created_after" = Option<String>, Query, description = "RFC 3339"),
        ("limit" = Option<u32>, Query, description = "1..=1000, default 100"),
        ("cursor" = Option<String>, Query, description = "From `Fieldhand-Next-Cursor`"),
    ),
    responses((status = 200, body = Vec<api::TaskSummary>,
               headers(("fieldhand-next-cursor" = String, description = "The cursor of the next page (absent on the last page)"))),
              (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn list_tasks() {}

/// Machines by id; every machine unless `limit` or `cursor` asks for a page.
#[utoipa::path(get, path = "/v1/machines",
    params(
        ("pool_id" = Option<String>, Query),
        ("online" = Option<bool>, Query),
        ("limit" = Option<u32>, Query, description = "1..=1000"),
        ("cursor" = Option<String>, Query, description = "From `Fieldhand-Next-Cursor`"),
    ),
    responses((status = 200, body = Vec<api::Machine>,
               headers(("fieldhand-next-cursor" = String, description = "The cursor of the next page (absent on the last page)"))),
              (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn list_machines() {}

/// Scripts, newest first.
#[utoipa::path(get, path = "/v1/scripts",
    params(
        ("limit" = Option<u32>, Query, description = "1..=1000, default 100"),
        ("cursor" = Option<String>, Query, description = "From `Fieldhand-Next-Cursor`"),
    ),
    responses((status = 200, body = Vec<api::ScriptSummary>,
               headers(("fieldhand-next-cursor" = String, description = "The cursor of the next page (absent on the last page)"))),
              (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn list_scripts() {}

#[utoipa::path(get, path = "/v1/scripts/{script_id}", params(("script_id" = String, Path)),
    responses((status = 200, body = api::Script), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn get_script() {}

/// Every pool with machines or an image operation, with its provisioning status (seed 001).
#[utoipa::path(get, path = "/v1/pools",
    responses((status = 200, body = Vec<api::PoolSummary>), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn list_pools() {}

#[utoipa::path(get, path = "/v1/pools/{pool_id}", params(("pool_id" = String, Path)),
    responses((status = 200, body = api::Pool), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn get_pool() {}

/// Operator actions, newest first.
#[utoipa::path(get, path = "/v1/audit",
    params(
        ("limit" = Option<u32>, Query, description = "1..=1000, default 100"),
        ("cursor" = Option<String>, Query, description = "From `Fieldhand-Next-Cursor`"),
    ),
    responses((status = 200, body = Vec<api::AuditRecord>,
               headers(("fieldhand-next-cursor" = String, description = "The cursor of the next page (absent on the last page)"))),
              (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn list_audit() {}

/// A new task over the failed, timed-out and unreachable machines of a finished script
/// execution, linked to it (`retry_of`).
#[utoipa::path(post, path = "/v1/tasks/{task_id}/retry", params(("task_id" = String, Path)),
    responses((status = 200, body = api::TaskCreated, example = json!({"task_id": "6d0e0fb0-1b71-4502-973a-24b0543a5d5d"})), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn retry_task() {}

/// Continue a `HALTED` script execution with its next batch.
#[utoipa::path(post, path = "/v1/tasks/{task_id}/resume", params(("task_id" = String, Path)),
    responses((status = 200, body = api::Task), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn resume_task() {}

#[utoipa::path(get, path = "/v1/pools/{pool_id}/power-limit", params(("pool_id" = String, Path)),
    responses((status = 200, body = api::PoolPowerLimit), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn get_power_limit() {}

/// How many of the pool's machines may be at work on an assignment with a reboot or
/// shutdown at once (`null` clears it; the controller-wide limit still holds).
#[utoipa::path(put, path = "/v1/pools/{pool_id}/power-limit", params(("pool_id" = String, Path)),
    request_body(content = api::PowerLimit, example = json!({"max_concurrent_power_operations": 20})),
    responses((status = 200, body = api::PoolPowerLimit), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn put_power_limit() {}

#[utoipa::path(get, path = "/v1/machines/{machine_id}", params(("machine_id" = String, Path)),
    responses((status = 200, body = api::Machine), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn get_machine() {}

#[utoipa::path(delete, path = "/v1/machines/{machine_id}", params(("machine_id" = String, Path)),
    responses((status = 200, body = api::Decommissioned), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn decommission_machine() {}

#[utoipa::path(put, path = "/v1/machines/{machine_id}/pool", params(("machine_id" = String, Path)),
    request_body(content = api::MoveMachine, example = json!({"pool_id": "lab"})),
    responses((status = 200, body = api::Machine), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn move_machine() {}

#[utoipa::path(get, path = "/v1/settings",
    responses((status = 200, body = api::Settings), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn get_settings() {}

#[utoipa::path(put, path = "/v1/settings", request_body(content = api::Settings, example = json!({"force_logoff_grace_seconds": 300})),
    responses((status = 200, body = api::Settings), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn put_settings() {}

#[utoipa::path(post, path = "/v1/images", request_body(content = api::CreateImage, example = json!({"name": "win11-vdi", "version": "2026.12", "os_type": "Windows 11", "gpu": false, "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"})),
    responses((status = 200, body = api::ImageCreated), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn create_image() {}

#[utoipa::path(get, path = "/v1/images",
    responses((status = 200, body = Vec<api::Image>), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn list_images() {}

/// Push an image to a pool now or at `start_time` (seed 000).
#[utoipa::path(post, path = "/v1/pools/{pool_id}/push-image", params(("pool_id" = String, Path)),
    request_body(content = api::PushImage, example = json!({"image_id": "6d0e0fb0-1b71-4502-973a-24b0543a5d5d", "start_time": 1796000000000_i64, "logoff_policy": "WAIT_FOR_LOGOFF"})),
    responses((status = 200, body = api::TaskCreated, example = json!({"task_id": "6d0e0fb0-1b71-4502-973a-24b0543a5d5d"})), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn push_image() {}

#[utoipa::path(post, path = "/v1/pools/{pool_id}/push-image/cancel", params(("pool_id" = String, Path)),
    responses((status = 200, body = api::ProvisioningStatus), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn cancel_push() {}

/// The pool's pending and current image (seed 001).
#[utoipa::path(get, path = "/v1/pools/{pool_id}/provisioning-status", params(("pool_id" = String, Path)),
    responses((status = 200, body = api::ProvisioningStatus), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn provisioning_status() {}

#[utoipa::path(delete, path = "/v1/pools/{pool_id}/image", params(("pool_id" = String, Path)),
    responses((status = 200, body = api::TaskCreated, example = json!({"task_id": "6d0e0fb0-1b71-4502-973a-24b0543a5d5d"})), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn unpublish_image() {}

/// Rebuild desktops, with a code per desktop (seed 003).
#[utoipa::path(post, path = "/v1/desktops/rebuild", request_body(content = api::RebuildDesktops, example = json!({"desktop_ids": ["desk-001", "desk-002"], "operate_type": "replace"})),
    responses((status = 200, body = api::RebuildResponse), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn rebuild_desktops() {}

/// A host's desired software, as a new commit (seed 004).
#[utoipa::path(put, path = "/v1/hosts/{host_id}/software/desired", params(("host_id" = String, Path)),
    request_body(content = api::DesiredSoftware, example = json!({"components": [{"name": "agentd", "version": "4.2.0", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "format": "tar.gz", "unpacked_size": 1048576}]})),
    responses((status = 200, body = api::CommitCreated), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn put_desired_software() {}

/// Stage a host's desired software by commit (seed 004); the body may be empty.
#[utoipa::path(post, path = "/v1/hosts/{host_id}/software/stage", params(("host_id" = String, Path)),
    request_body(content = api::StageSoftware, description = "optional", example = json!({"commit": "3"})),
    responses((status = 200, body = api::TaskCreated, example = json!({"task_id": "6d0e0fb0-1b71-4502-973a-24b0543a5d5d"})), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn stage_software() {}

#[utoipa::path(get, path = "/v1/hosts/{host_id}/software", params(("host_id" = String, Path)),
    responses((status = 200, body = api::HostSoftware), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn host_software() {}

/// Upload a payload blob (the body is the blob's bytes).
#[utoipa::path(post, path = "/v1/blobs",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = api::Blob), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn upload_blob() {}

#[utoipa::path(get, path = "/v1/blobs/{sha256}", params(("sha256" = String, Path)),
    responses((status = 200, body = api::Blob), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn blob_info() {}

#[utoipa::path(delete, path = "/v1/blobs/{sha256}", params(("sha256" = String, Path)),
    responses((status = 200, body = api::Blob), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn delete_blob() {}

#[utoipa::path(post, path = "/v1/enrollment-tokens", request_body(content = api::CreateEnrollmentToken, example = json!({"pool_id": "desktops", "uses": 100, "expires_in_seconds": 86400})),
    responses((status = 200, body = api::EnrollmentTokenCreated), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn create_enrollment_token() {}

#[utoipa::path(get, path = "/v1/enrollment-tokens",
    responses((status = 200, body = Vec<api::EnrollmentToken>), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn list_enrollment_tokens() {}

#[utoipa::path(delete, path = "/v1/enrollment-tokens/{token_id}", params(("token_id" = String, Path)),
    responses((status = 200, body = api::EnrollmentToken), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn delete_enrollment_token() {}

#[utoipa::path(post, path = "/v1/revocations", request_body(content = api::Revoke, example = json!({"serial": "3a5f0c2e9b71"})),
    responses((status = 200, body = api::Revocation), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn revoke() {}

#[utoipa::path(get, path = "/v1/revocations",
    responses((status = 200, body = Vec<api::Revocation>), (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn list_revocations() {}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"),
              (status = "default", description = ERRORS, body = api::ErrorBody)))]
fn openapi_document() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// `v1/pools/*/image` for `/v1/pools/{pool_id}/image`.
    fn pattern(path: &str) -> String {
        path.trim_start_matches('/')
            .split('/')
            .map(|s| if s.starts_with('{') { "*" } else { s })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn the_document_covers_exactly_the_routers_operator_routes() {
        let doc = serde_json::to_value(document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.push((method.to_uppercase(), pattern(path)));
            }
        }
        documented.sort();
        let mut routed: Vec<(String, String)> = crate::controller::router::ROUTES
            .iter()
            .filter(|(_, p)| p.starts_with("v1/"))
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routed.sort();
        assert_eq!(documented, routed);
    }

    #[test]
    fn every_json_request_body_has_an_example() {
        let doc = serde_json::to_value(document()).unwrap();
        let mut missing = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let Some(json) = op["requestBody"]["content"].get("application/json") else {
                    continue;
                };
                if json.get("example").is_none() {
                    missing.push(format!("{method} {path}"));
                }
            }
        }
        assert!(missing.is_empty(), "no example: {missing:?}");
    }

    #[test]
    fn the_wire_enums_are_documented_with_their_texts() {
        let doc = serde_json::to_value(document()).unwrap();
        let states = &doc["components"]["schemas"]["TaskState"]["enum"];
        let texts: Vec<&str> = states
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let all: Vec<&str> = crate::proto::domain::TaskState::ALL
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(texts, all);
    }
}
