//! Task kinds as the store keeps them: a leaf both the generic engine and the operations
//! that make tasks (scripts, software, images, rebuilds) name, so neither imports the other.

pub const SCRIPT_EXECUTION: &str = "script_execution";
pub const SOFTWARE_STAGE: &str = "software_stage";
pub const STAGE_KIND: &str = "image_stage";
pub const APPLY_KIND: &str = "image_apply";
pub const REMOVE_KIND: &str = "image_remove";
/// A rebuild (seed 003, `controller::rebuild`): an `ImageApply` that stages a fresh slot.
pub const REBUILD_KIND: &str = "image_rebuild";
