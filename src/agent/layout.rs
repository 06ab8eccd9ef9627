//! The image layout under `image_root`: `<image_id>/` (or a rebuild's `<image_id>.<tag>/`)
//! per staged image, and the `current` and `previous` links boot tooling reads, switched
//! atomically (temp link + rename); pruning and start-up housekeeping. Below staging and the
//! image steps.

use std::io;
use std::path::{Path, PathBuf};

use crate::sys::fsutil;

pub const CURRENT: &str = "current";
pub const PREVIOUS: &str = "previous";

fn link_target(root: &Path, name: &str) -> Option<String> {
    let t = std::fs::read_link(root.join(name)).ok()?;
    Some(t.to_string_lossy().into_owned())
}

/// The image `current` points at.
pub fn current(root: &Path) -> Option<String> {
    link_target(root, CURRENT)
}

/// The image kept for a rollback, if a switch is not committed yet.
pub fn previous(root: &Path) -> Option<String> {
    link_target(root, PREVIOUS)
}

pub fn image_dir(root: &Path, image_id: &str) -> PathBuf {
    root.join(image_id)
}

/// Points `name` at `target` atomically: a temporary symlink renamed over the old one, so
/// a reader (or a crash) sees either the old or the new link, never none.
fn set_link(root: &Path, name: &str, target: &str) -> io::Result<()> {
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, root.join(name))?;
    fsutil::fsync_dir(root)
}

pub fn remove_link(root: &Path, name: &str) -> io::Result<()> {
    match std::fs::remove_file(root.join(name)) {
        Ok(()) => fsutil::fsync_dir(root),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn check_id(image_id: &str) -> io::Result<()> {
    crate::pki::validate_name("image_id", image_id)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

/// Makes `image_id` current; the image it replaces becomes `previous`. Returns that one.
/// Idempotent: switching to the image that is already current changes nothing.
pub fn switch_to(root: &Path, image_id: &str) -> io::Result<Option<String>> {
    check_id(image_id)?;
    if !image_dir(root, image_id).is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("image {image_id} is not staged under {}", root.display()),
        ));
    }
    let old = current(root);
    if old.as_deref() == Some(image_id) {
        return Ok(previous(root));
    }
    if let Some(o) = &old {
        set_link(root, PREVIOUS, o)?;
    }
    set_link(root, CURRENT, image_id)?;
    Ok(old)
}

/// Switches back to `previous` and forgets it. Returns the image that is current again.
pub fn rollback(root: &Path) -> io::Result<String> {
    let prev = previous(root).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "there is no previous image to roll back to",
        )
    })?;
    set_link(root, CURRENT, &prev)?;
    remove_link(root, PREVIOUS)?;
    Ok(prev)
}

/// The new image stays: forget `previous` and delete its directory.
pub fn commit(root: &Path) -> io::Result<()> {
    let Some(prev) = previous(root) else {
        return Ok(());
    };
    remove_link(root, PREVIOUS)?;
    if current(root).as_deref() != Some(prev.as_str()) {
        match std::fs::remove_dir_all(image_dir(root, &prev)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A hook shipped inside an image (`fieldhand/activate`, `fieldhand/health-check`), if
/// present as a regular file.
pub fn hook(root: &Path, image_id: &str, name: &str) -> Option<PathBuf> {
    let p = image_dir(root, image_id).join("fieldhand").join(name);
    std::fs::symlink_metadata(&p)
        .ok()
        .filter(|m| m.is_file())
        .map(|_| p)
}

/// Removes image directories (and half-extracted leftovers) that are neither current,
/// previous nor in `keep`.
pub fn prune(root: &Path, keep: &[&str]) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    let (cur, prev) = (current(root), previous(root));
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        let wanted = keep.contains(&name.as_str())
            || cur.as_deref() == Some(name.as_str())
            || prev.as_deref() == Some(name.as_str());
        if is_dir && !wanted {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove an unused image");
            }
        }
    }
}

/// Start-up housekeeping: half-extracted images and temporary links left by a crash go.
pub fn cleanup(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.contains(".partial-") || name.contains(".tmp-")) {
            let p = e.path();
            let res = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            if let Err(err) = res {
                tracing::warn!(path = %p.display(), error = %err, "cannot remove a leftover");
            }
        }
    }
}

/// The image id a directory under `image_root` holds: a push stages into `<image_id>`, a
/// rebuild into a fresh slot `<image_id>.<tag>`.
pub fn image_of(dir: &str) -> String {
    dir.split('.').next().unwrap_or(dir).to_string()
}
