//! The image registry: `POST /v1/images` (a tar.gz blob with a name, version, os_type and
//! GPU flag) and `GET /v1/images`.

use super::*;
use crate::controller::audit;
use crate::controller::errors::ApiError;
use crate::controller::store::ImageRow;
use crate::controller::Controller;
use crate::pki::Identity;
use crate::proto::api;
use crate::proto::domain::AuditAction;
use crate::sys::clock;

pub async fn create_image(
    ctl: &Controller,
    by: &Identity,
    req: api::CreateImage,
) -> Result<api::ImageCreated, ApiError> {
    let request = req.clone();
    let by = by.clone();
    text("name", &req.name, 128)?;
    text("version", &req.version, 128)?;
    text("os_type", &req.os_type, 64)?;
    if !crate::controller::blobs::valid_sha256(&req.sha256) {
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
    ctl.store
        .tx(move |tx| {
            tx.insert_image(&row)?;
            audit::record(tx, &by, AuditAction::ImageCreate, &row.image_id, &request)
        })
        .await?;
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
