//! The on-disk image layout under `image_root` (issue 6 building block, not wired yet):
//! one directory per staged image, `current` as an atomically switched symlink, and
//! `previous` kept until the new image is committed so that it can be rolled back to.
//!
//! ```text
//! image_root/
//!   <image_id>/            an extracted image (fieldhand/activate, fieldhand/health-check)
//!   current -> <image_id>  what the machine runs (boot tooling points here)
//!   previous -> <image_id> the image to roll back to, until the new one is committed
//! ```

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

fn remove_link(root: &Path, name: &str) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(root: &Path, id: &str) {
        std::fs::create_dir_all(image_dir(root, id).join("fieldhand")).unwrap();
    }

    #[test]
    fn switch_commit_and_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        staged(root, "img-1");
        staged(root, "img-2");
        assert_eq!(switch_to(root, "img-1").unwrap(), None);
        assert_eq!(current(root).as_deref(), Some("img-1"));
        assert_eq!(previous(root), None);
        // A new image: the old one is kept for a rollback.
        assert_eq!(switch_to(root, "img-2").unwrap().as_deref(), Some("img-1"));
        assert_eq!(current(root).as_deref(), Some("img-2"));
        assert_eq!(previous(root).as_deref(), Some("img-1"));
        assert_eq!(
            switch_to(root, "img-2").unwrap().as_deref(),
            Some("img-1"),
            "idempotent"
        );
        // Roll back: img-1 is current again and img-2 is still on disk.
        assert_eq!(rollback(root).unwrap(), "img-1");
        assert_eq!(current(root).as_deref(), Some("img-1"));
        assert_eq!(previous(root), None);
        assert!(image_dir(root, "img-2").is_dir());
        assert!(rollback(root).is_err(), "nothing left to roll back to");
        // Switch again and commit: the previous image goes away.
        switch_to(root, "img-2").unwrap();
        commit(root).unwrap();
        assert_eq!(current(root).as_deref(), Some("img-2"));
        assert_eq!(previous(root), None);
        assert!(!image_dir(root, "img-1").exists());
        // The symlink is what boot tooling reads.
        let resolved = std::fs::canonicalize(root.join(CURRENT)).unwrap();
        assert_eq!(
            resolved,
            std::fs::canonicalize(image_dir(root, "img-2")).unwrap()
        );
    }

    #[test]
    fn refuses_unknown_or_unsafe_images_and_finds_hooks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(switch_to(root, "missing").is_err());
        assert!(switch_to(root, "../etc").is_err());
        staged(root, "img-1");
        assert_eq!(hook(root, "img-1", "activate"), None);
        std::fs::write(
            image_dir(root, "img-1").join("fieldhand/activate"),
            "#!/bin/sh\n",
        )
        .unwrap();
        assert_eq!(
            hook(root, "img-1", "activate"),
            Some(image_dir(root, "img-1").join("fieldhand/activate"))
        );
    }
}
