//! The store's image tables: registered images, each pool's image operation (seed 001),
//! each machine's images, and the per-assignment payloads of a rebuild.

use super::sql::{params, Optional, Row, SqlResult};

use super::{Ctx, StoreError, Tx};
use crate::proto::domain::{CurrentImageState, PendingImageState, PoolOperation};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub image_id: String,
    pub name: String,
    pub version: String,
    pub os_type: String,
    pub gpu: bool,
    pub sha256: String,
    pub size: u64,
    pub created_ms: i64,
}

/// A pool's image operation and images (seed 001), one row per pool that ever had one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolImageRow {
    pub pool_id: String,
    /// `NONE`, `INITIAL_PUBLISH`, `SCHEDULE_PUSH_IMAGE`, `CANCEL_SCHEDULED_PUSH_IMAGE`,
    /// `FINAL_UNPUBLISH`.
    pub operation: PoolOperation,
    /// The operator's task of the last operation (a push's apply task, or a removal).
    pub task_id: Option<String>,
    pub stage_task_id: Option<String>,
    pub apply_task_id: Option<String>,
    pub remove_task_id: Option<String>,
    /// Whether the apply task may run (its start time came and the image is `READY`).
    pub released: bool,
    /// The push request (`proto::api::PushImage` JSON), for reschedule comparisons.
    pub request_json: Option<String>,
    pub start_ms: Option<i64>,
    pub selective: bool,
    pub pending_image_id: Option<String>,
    pub pending_state: Option<PendingImageState>,
    pub current_image_id: Option<String>,
    pub current_state: Option<CurrentImageState>,
}

/// One machine's images as the controller last heard of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineImageRow {
    pub machine_id: String,
    pub current_image_id: Option<String>,
    pub current_state: Option<CurrentImageState>,
    pub pending_image_id: Option<String>,
    pub pending_state: Option<PendingImageState>,
    /// The language of the last rebuild that set one.
    pub language: Option<String>,
}

const POOL_IMAGE_COLS: &str = "pool_id, operation, task_id, stage_task_id, apply_task_id, \
    remove_task_id, released, request_json, start_ms, selective, pending_image_id, \
    pending_state, current_image_id, current_state";

fn pool_image_row(r: &Row) -> SqlResult<PoolImageRow> {
    Ok(PoolImageRow {
        pool_id: r.get(0)?,
        operation: r.get(1)?,
        task_id: r.get(2)?,
        stage_task_id: r.get(3)?,
        apply_task_id: r.get(4)?,
        remove_task_id: r.get(5)?,
        released: r.get::<_, i64>(6)? != 0,
        request_json: r.get(7)?,
        start_ms: r.get(8)?,
        selective: r.get::<_, i64>(9)? != 0,
        pending_image_id: r.get(10)?,
        pending_state: r.get(11)?,
        current_image_id: r.get(12)?,
        current_state: r.get(13)?,
    })
}

impl Tx<'_> {
    pub fn insert_image(&mut self, i: &ImageRow) -> Result<(), StoreError> {
        self.tx
            .exec(
                "INSERT INTO images (image_id, name, version, os_type, gpu, sha256, size, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    i.image_id,
                    i.name,
                    i.version,
                    i.os_type,
                    i64::from(i.gpu),
                    i.sha256,
                    i.size as i64,
                    i.created_ms
                ],
            )
            .ctx("saving an image")?;
        Ok(())
    }

    pub fn images(&mut self) -> Result<Vec<ImageRow>, StoreError> {
        let mut st = self
            .tx
            .statement(
                "SELECT image_id, name, version, os_type, gpu, sha256, size, created_ms
                 FROM images ORDER BY created_ms, image_id",
            )
            .ctx("listing images")?;
        let rows = st
            .query_map(params![], |r| {
                Ok(ImageRow {
                    image_id: r.get(0)?,
                    name: r.get(1)?,
                    version: r.get(2)?,
                    os_type: r.get(3)?,
                    gpu: r.get::<_, i64>(4)? != 0,
                    sha256: r.get(5)?,
                    size: r.get::<_, i64>(6)? as u64,
                    created_ms: r.get(7)?,
                })
            })
            .ctx("listing images")?;
        rows.collect::<Result<_, _>>().ctx("listing images")
    }

    pub fn pool_image(&mut self, pool_id: &str) -> Result<Option<PoolImageRow>, StoreError> {
        self.tx
            .one(
                &format!("SELECT {POOL_IMAGE_COLS} FROM pool_images WHERE pool_id = ?1"),
                params![pool_id],
                pool_image_row,
            )
            .optional()
            .ctx("reading a pool's images")
    }

    /// Pools with an image operation in progress.
    pub fn busy_pool_images(&mut self) -> Result<Vec<PoolImageRow>, StoreError> {
        let mut st = self
            .tx
            .statement(&format!(
                "SELECT {POOL_IMAGE_COLS} FROM pool_images WHERE operation <> 'NONE' ORDER BY pool_id"
            ))
            .ctx("listing image operations")?;
        let rows = st
            .query_map(params![], pool_image_row)
            .ctx("listing image operations")?;
        rows.collect::<Result<_, _>>()
            .ctx("listing image operations")
    }

    pub fn put_pool_image(&mut self, p: &PoolImageRow) -> Result<(), StoreError> {
        self.tx
            .exec(
                &format!(
                    "INSERT INTO pool_images ({POOL_IMAGE_COLS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                     ON CONFLICT (pool_id) DO UPDATE SET operation = excluded.operation,
                     task_id = excluded.task_id, stage_task_id = excluded.stage_task_id,
                     apply_task_id = excluded.apply_task_id,
                     remove_task_id = excluded.remove_task_id, released = excluded.released,
                     request_json = excluded.request_json, start_ms = excluded.start_ms,
                     selective = excluded.selective,
                     pending_image_id = excluded.pending_image_id,
                     pending_state = excluded.pending_state,
                     current_image_id = excluded.current_image_id,
                     current_state = excluded.current_state"
                ),
                params![
                    p.pool_id,
                    p.operation,
                    p.task_id,
                    p.stage_task_id,
                    p.apply_task_id,
                    p.remove_task_id,
                    i64::from(p.released),
                    p.request_json,
                    p.start_ms,
                    i64::from(p.selective),
                    p.pending_image_id,
                    p.pending_state,
                    p.current_image_id,
                    p.current_state
                ],
            )
            .ctx("saving a pool's images")?;
        Ok(())
    }

    /// Whether `task_id` is a push's apply task still waiting for its start time.
    pub fn task_held(&mut self, task_id: &str) -> Result<bool, StoreError> {
        self.tx
            .one(
                "SELECT EXISTS (SELECT 1 FROM pool_images WHERE apply_task_id = ?1 AND released = 0)",
                params![task_id],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v != 0)
            .ctx("checking a held task")
    }

    pub fn machine_image(&mut self, machine_id: &str) -> Result<MachineImageRow, StoreError> {
        Ok(self
            .tx
            .one(
                "SELECT current_image_id, current_state, pending_image_id, pending_state, language
                 FROM machine_images WHERE machine_id = ?1",
                params![machine_id],
                |r| {
                    Ok(MachineImageRow {
                        machine_id: machine_id.to_string(),
                        current_image_id: r.get(0)?,
                        current_state: r.get(1)?,
                        pending_image_id: r.get(2)?,
                        pending_state: r.get(3)?,
                        language: r.get(4)?,
                    })
                },
            )
            .optional()
            .ctx("reading a machine's images")?
            .unwrap_or_else(|| MachineImageRow {
                machine_id: machine_id.to_string(),
                ..MachineImageRow::default()
            }))
    }

    pub fn put_machine_image(&mut self, m: &MachineImageRow) -> Result<(), StoreError> {
        self.tx
            .exec(
                "INSERT INTO machine_images (machine_id, current_image_id, current_state,
                 pending_image_id, pending_state, language) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (machine_id) DO UPDATE SET
                 current_image_id = excluded.current_image_id,
                 current_state = excluded.current_state,
                 pending_image_id = excluded.pending_image_id,
                 pending_state = excluded.pending_state,
                 language = excluded.language",
                params![
                    m.machine_id,
                    m.current_image_id,
                    m.current_state,
                    m.pending_image_id,
                    m.pending_state,
                    m.language
                ],
            )
            .ctx("saving a machine's images")?;
        Ok(())
    }

    /// A payload for one assignment, when its task's machines get different ones (rebuild).
    pub fn put_assignment_payload(
        &mut self,
        assignment_id: &str,
        json: &str,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "INSERT INTO assignment_payloads (assignment_id, payload_json) VALUES (?1, ?2)",
                params![assignment_id, json],
            )
            .ctx("saving an assignment payload")?;
        Ok(())
    }

    pub fn assignment_payload(
        &mut self,
        assignment_id: &str,
    ) -> Result<Option<String>, StoreError> {
        self.tx
            .one(
                "SELECT payload_json FROM assignment_payloads WHERE assignment_id = ?1",
                params![assignment_id],
                |r| r.get(0),
            )
            .optional()
            .ctx("reading an assignment payload")
    }

    pub fn image(&mut self, image_id: &str) -> Result<Option<ImageRow>, StoreError> {
        Ok(self.images()?.into_iter().find(|i| i.image_id == image_id))
    }
}
