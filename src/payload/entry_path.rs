//! What an archive entry's path and a symlink's target may be: plain relative paths that
//! stay inside the extraction root, resolved lexically and through the archive's other links
//! the way a reader would follow them. Pure functions on paths; `extract` applies them.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};

/// The entry's path made relative and plain, or why it is refused. `None`: the root itself.
pub fn clean(raw: &Path) -> Result<Option<PathBuf>, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Whether `target`, read relative to the directory of `link` (both inside the root),
/// stays inside the root when resolved lexically.
#[allow(clippy::wildcard_enum_match_arm)] // std::path::Component: only names count
pub fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.as_os_str().is_empty() || target.is_absolute() {
        return false;
    }
    let mut depth: Vec<&OsStr> = link
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for c in target.components() {
        match c {
            Component::Normal(n) => depth.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Resolves the symlink at `link` (relative to the root) through the archive's other links
/// (`links`: path -> target), as a reader would follow it; `false` if it leaves the root (or
/// loops). Components that are not links are taken as directories: what is not there yet
/// cannot lead anywhere but further down.
pub fn resolves_inside(links: &HashMap<PathBuf, PathBuf>, link: &Path) -> bool {
    let mut stack: Vec<OsString> = link
        .parent()
        .map(|p| p.iter().map(OsStr::to_os_string).collect())
        .unwrap_or_default();
    let Some(target) = links.get(link) else {
        return true;
    };
    let mut pending: std::collections::VecDeque<Component<'_>> = target.components().collect();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if stack.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
            Component::Normal(n) => {
                stack.push(n.to_os_string());
                let here: PathBuf = stack.iter().collect();
                if let Some(next) = links.get(&here) {
                    // As the kernel does (ELOOP): a chain this long is refused.
                    hops += 1;
                    if hops > 40 {
                        return false;
                    }
                    stack.pop();
                    for c in next.components().rev() {
                        pending.push_front(c);
                    }
                }
            }
        }
    }
    true
}
