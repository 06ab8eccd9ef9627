//! What the agent checks before it accepts an assignment: every script matches its digest and
//! names a known interpreter, staging payloads are well formed, image ids and slots are safe
//! names. A refusal is an `INVALID_ASSIGNMENT` result for that assignment alone.

use sha2::{Digest, Sha256};

use crate::agent::codes::Failure;
use crate::proto::agent::{Assignment, ImageAssignment, PayloadRef, StagePayload, Work};
use crate::proto::domain::ErrorCode;

fn refuse(msg: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::InvalidAssignment, msg)
}

fn name(what: &str, value: &str) -> Result<(), Failure> {
    crate::pki::validate_name(what, value).map_err(|e| refuse(e.to_string()))
}

pub fn validate(a: &Assignment) -> Result<(), Failure> {
    match &a.work {
        Work::Scripts(scripts) => validate_scripts(scripts)?,
        Work::SoftwareStage(stage) => validate_stage(stage)?,
        Work::ImageStage { image, payload } => {
            validate_image(image)?;
            validate_image_payload(payload)?;
        }
        Work::ImageApply(image) => {
            validate_image(image)?;
            if let Some(p) = &image.payload {
                validate_image_payload(p)?;
            }
            if image.payload.is_some() && image.slot.is_none() {
                return Err(refuse(
                    "a rebuild (image apply with a payload) needs a fresh slot",
                ));
            }
        }
        Work::ImageRemove(image) => validate_image(image)?,
        Work::Invalid { kind, why } => {
            return Err(refuse(format!(
                "{why} ({kind:?}): this agent is older than the controller, or the assignment is malformed; upgrade the agent"
            )))
        }
    }
    if a.timeout_seconds == 0 {
        return Err(refuse("timeout_seconds is 0"));
    }
    Ok(())
}

fn validate_scripts(scripts: &[crate::proto::agent::ScriptPayload]) -> Result<(), Failure> {
    if scripts.is_empty() {
        return Err(refuse("assignment has no scripts"));
    }
    for s in scripts {
        let digest = hex::encode(Sha256::digest(s.content.as_bytes()));
        if digest != s.sha256 {
            return Err(refuse(format!(
                "script {:?}: sha256 {digest} does not match {}",
                s.name, s.sha256
            )));
        }
        if crate::agent::runner::interpreter(&s.command_type).is_none() {
            return Err(refuse(format!(
                "script {:?}: unknown command_type {:?}",
                s.name, s.command_type
            )));
        }
    }
    Ok(())
}

fn validate_image(img: &ImageAssignment) -> Result<(), Failure> {
    name("image_id", &img.image_id)?;
    if let Some(slot) = &img.slot {
        name("slot", slot)?;
        if !slot.starts_with(&format!("{}.", img.image_id)) {
            return Err(refuse(format!(
                "slot {slot:?} is not a slot of image {}",
                img.image_id
            )));
        }
    }
    if let Some(k) = img.env.keys().find(|k| {
        !k.starts_with("FIELDHAND_")
            || !k
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    }) {
        return Err(refuse(format!(
            "image env {k:?} must be FIELDHAND_ followed by A-Z, 0-9 or _"
        )));
    }
    Ok(())
}

fn hex_digest(sha256: &str) -> bool {
    sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())
}

fn validate_image_payload(p: &PayloadRef) -> Result<(), Failure> {
    if !hex_digest(&p.sha256) || p.format != "tar.gz" {
        return Err(refuse(format!(
            "image payload must be a tar.gz with a sha256, not {:?} {:?}",
            p.format, p.sha256
        )));
    }
    Ok(())
}

fn validate_stage(stage: &StagePayload) -> Result<(), Failure> {
    if stage.commit.is_empty() || !stage.commit.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse(format!(
            "commit {:?} is not a commit identifier",
            stage.commit
        )));
    }
    if stage.components.is_empty() {
        return Err(refuse("stage payload has no components"));
    }
    for c in &stage.components {
        name("component name", &c.name)?;
        if !hex_digest(&c.sha256) {
            return Err(refuse(format!(
                "component {:?}: bad sha256 {:?}",
                c.name, c.sha256
            )));
        }
        if c.format != "file" && c.format != "tar.gz" {
            return Err(refuse(format!(
                "component {:?}: unknown format {:?}",
                c.name, c.format
            )));
        }
    }
    Ok(())
}
