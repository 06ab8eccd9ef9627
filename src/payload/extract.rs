//! Hardened tar.gz extraction: every entry is checked by us (tar-rs alone skips `..`
//! silently, follows existing links, keeps setuid bits), and the tree appears at `dest` in
//! one rename, complete, or not at all.
//!
//! Rules: no absolute paths or `..`; symlinks only to relative targets that stay inside,
//! each on its own and resolved through every other link of the archive (chains, links
//! through directories made later); nothing is ever written through a symlink; no hardlinks,
//! devices, FIFOs or sockets; modes lose setuid/setgid/sticky and get umask 022; entry count
//! and unpacked bytes are capped while writing, and the filesystem's free-space reserve is
//! kept. A [`Guard`] stops an extraction within a chunk (1 MiB) when it is cancelled; the
//! partial tree is removed and every file closed before the error returns. A later regular file with the same path as an earlier one replaces it (as `tar`
//! does), never through a link. Header mtimes are ignored: staged files get the time they
//! were written.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use flate2::read::MultiGzDecoder;

use super::entry_path::{clean, link_stays_inside, resolves_inside};
use crate::proto::domain::ErrorCode;

/// Caps against archives that expand without bound (gzip bombs, entry floods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_entries: u64,
    pub max_unpacked_bytes: u64,
}

/// What may stop an extraction early, checked while it writes.
#[derive(Debug, Clone, Copy)]
pub struct Guard<'a> {
    /// Set by a timeout or a cancel: the extraction stops and cleans up.
    pub cancel: &'a AtomicBool,
    /// Keep at least this many bytes free on the destination's filesystem.
    pub reserve_bytes: u64,
}

/// How often (in bytes written) the free space is looked at.
const SPACE_CHECK_EVERY: u64 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extracted {
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("unsafe archive entry {entry:?}: {reason}")]
    Unsafe { entry: String, reason: String },
    #[error("the archive has more than {limit} entries (payloads.max_archive_entries)")]
    TooManyEntries { limit: u64 },
    #[error("entry {entry:?} would take the unpacked size past {limit} bytes (payloads.max_unpacked_bytes or the declared size)")]
    TooLarge { entry: String, limit: u64 },
    #[error("corrupt archive{}: {reason}", entry.as_ref().map(|e| format!(" at entry {e:?}")).unwrap_or_default())]
    Corrupt {
        entry: Option<String>,
        reason: String,
    },
    #[error("{path} already exists; refusing to extract over it")]
    DestExists { path: PathBuf },
    #[error("extraction stopped (timed out or cancelled); the partial tree was removed")]
    Cancelled,
    #[error("only {free} bytes are left free on {path}, below the reserve of {reserve} bytes (payloads.reserve_bytes)")]
    NoSpace {
        path: PathBuf,
        free: u64,
        reserve: u64,
    },
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl ExtractError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ExtractError::Unsafe { .. } => ErrorCode::UnsafeArchive,
            ExtractError::TooManyEntries { .. } | ExtractError::TooLarge { .. } => {
                ErrorCode::ArchiveLimitExceeded
            }
            ExtractError::Corrupt { .. } => ErrorCode::CorruptArchive,
            ExtractError::DestExists { .. } | ExtractError::Io { .. } => ErrorCode::ExtractIoError,
            ExtractError::Cancelled => ErrorCode::Cancelled,
            ExtractError::NoSpace { .. } => ErrorCode::InsufficientDiskSpace,
        }
    }
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> ExtractError + '_ {
    move |source| ExtractError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unsafe_entry(entry: &Path, reason: impl Into<String>) -> ExtractError {
    ExtractError::Unsafe {
        entry: entry.display().to_string(),
        reason: reason.into(),
    }
}

/// Extracts `archive` into `dest` (which must not exist; its parent must).
pub fn extract_tar_gz(
    archive: &Path,
    dest: &Path,
    limits: &Limits,
    guard: &Guard<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<Extracted, ExtractError> {
    if dest.symlink_metadata().is_ok() {
        return Err(ExtractError::DestExists {
            path: dest.to_path_buf(),
        });
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "extract".into());
    let tmp = parent.join(format!(".{name}.partial-{:08x}", fastrand::u32(..)));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(io_at(&tmp))?;
    let result = unpack(archive, &tmp, limits, guard, progress).and_then(|stats| {
        publish(&tmp, dest, parent)?;
        Ok(stats)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Makes the private tree durable and moves it into place.
fn publish(tmp: &Path, dest: &Path, parent: &Path) -> Result<(), ExtractError> {
    let dir = File::open(tmp).map_err(io_at(tmp))?;
    // One syncfs flushes every file written, far cheaper than an fsync per small file.
    use std::os::fd::AsRawFd;
    nix::unistd::syncfs(dir.as_raw_fd()).map_err(|e| ExtractError::Io {
        path: tmp.to_path_buf(),
        source: io::Error::from(e),
    })?;
    fs::set_permissions(tmp, fs::Permissions::from_mode(0o755)).map_err(io_at(tmp))?;
    dir.sync_all().map_err(io_at(tmp))?;
    fs::rename(tmp, dest).map_err(io_at(dest))?;
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_at(parent))
}

/// How often a large file's dirty pages are pushed towards the disk while it is written.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Starts (does not wait for) writeback of a file's dirty pages, so the disk works while we
/// decompress and the final syncfs has little left to do. On Linux, `POSIX_FADV_DONTNEED`
/// initiates writeback; pages still dirty are kept, so nothing is lost if it does not.
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

struct Unpacker<'a> {
    root: &'a Path,
    limits: &'a Limits,
    guard: &'a Guard<'a>,
    symlinks: HashSet<PathBuf>,
    /// Every symlink and its target, to resolve chains once the whole archive is read.
    links: HashMap<PathBuf, PathBuf>,
    next_space_check: u64,
    /// Directories and the mode they get once everything is written into them.
    dirs: Vec<(PathBuf, u32)>,
    entries: u64,
    bytes: u64,
    reported: u64,
    buf: Vec<u8>,
}

fn unpack(
    archive: &Path,
    root: &Path,
    limits: &Limits,
    guard: &Guard<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<Extracted, ExtractError> {
    let f = File::open(archive).map_err(io_at(archive))?;
    // Decompression runs on its own thread, a few MiB ahead of the thread that parses and
    // writes, so inflating and writing overlap.
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(8);
        scope.spawn(move || inflate(f, tx));
        let reader = ChannelReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        };
        // `reader` is dropped when this returns, which stops the inflater early on errors.
        unpack_from(reader, root, limits, guard, progress)
    })
}

/// Inflates `f` into 1 MiB blocks until the end, an error, or the reader hanging up.
fn inflate(f: File, tx: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>) {
    let mut gz = MultiGzDecoder::new(BufReader::with_capacity(1 << 20, f));
    loop {
        let mut buf = vec![0u8; 1 << 20];
        let mut filled = 0;
        while filled < buf.len() {
            match gz.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        if filled == 0 {
            return;
        }
        buf.truncate(filled);
        if tx.send(Ok(buf)).is_err() {
            return;
        }
    }
}

struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    self.cur = b;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn unpack_from<R: Read>(
    reader: R,
    root: &Path,
    limits: &Limits,
    guard: &Guard<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<Extracted, ExtractError> {
    let mut ar = tar::Archive::new(reader);
    let corrupt = |entry: Option<String>| {
        move |e: io::Error| ExtractError::Corrupt {
            entry,
            reason: e.to_string(),
        }
    };
    let mut u = Unpacker {
        root,
        limits,
        guard,
        symlinks: HashSet::new(),
        links: HashMap::new(),
        next_space_check: 0,
        dirs: Vec::new(),
        entries: 0,
        bytes: 0,
        reported: 0,
        buf: vec![0u8; 1 << 20],
    };
    for entry in ar.entries().map_err(corrupt(None))? {
        if guard.cancel.load(Ordering::Relaxed) {
            return Err(ExtractError::Cancelled);
        }
        let mut entry = entry.map_err(corrupt(None))?;
        u.entries += 1;
        if u.entries > limits.max_entries {
            return Err(ExtractError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        u.entry(&mut entry, progress)?;
    }
    // Each link on its own stayed inside; followed through the others, so must it.
    let mut all: Vec<&PathBuf> = u.links.keys().collect();
    all.sort();
    for l in all {
        if !resolves_inside(&u.links, l) {
            return Err(unsafe_entry(
                l,
                format!(
                    "symlink to {:?}, followed through the archive's other links, leaves the destination",
                    u.links[l].display()
                ),
            ));
        }
    }
    // Deepest first, so a read-only directory is closed only after its children are done.
    u.dirs
        .sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (p, mode) in &u.dirs {
        fs::set_permissions(p, fs::Permissions::from_mode(*mode)).map_err(io_at(p))?;
    }
    progress(u.bytes);
    Ok(Extracted {
        entries: u.entries,
        bytes: u.bytes,
    })
}

impl Unpacker<'_> {
    #[allow(clippy::wildcard_enum_match_arm)] // tar::EntryType: every type not allowed is refused
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), ExtractError> {
        let raw = PathBuf::from(OsStr::from_bytes(&entry.path_bytes()));
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let Some(rel) = clean(&raw).map_err(|why| unsafe_entry(&raw, why))? else {
            return Ok(()); // "./": the root, which we create ourselves
        };
        for anc in rel.ancestors().skip(1) {
            if self.symlinks.contains(anc) {
                return Err(unsafe_entry(
                    &raw,
                    format!("would write through the symlink {:?}", anc.display()),
                ));
            }
        }
        let target = self.root.join(&rel);
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777 & !0o022;
        match kind {
            tar::EntryType::Directory => {
                self.make_parents(&rel, &raw)?;
                match target.symlink_metadata() {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(unsafe_entry(
                            &raw,
                            "directory over an existing non-directory",
                        ))
                    }
                    Err(_) => fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&target)
                        .map_err(io_at(&target))?,
                }
                self.dirs.push((target, mode | 0o700));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.make_parents(&rel, &raw)?;
                self.file(entry, &raw, &target, mode, progress)?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| unsafe_entry(&raw, format!("bad link target: {e}")))?
                    .map(|l| l.into_owned())
                    .ok_or_else(|| unsafe_entry(&raw, "symlink without a target"))?;
                if !link_stays_inside(&rel, &link) {
                    return Err(unsafe_entry(
                        &raw,
                        format!("symlink to {:?} leaves the destination", link.display()),
                    ));
                }
                self.make_parents(&rel, &raw)?;
                if target.symlink_metadata().is_ok() {
                    return Err(unsafe_entry(&raw, "symlink over an existing entry"));
                }
                std::os::unix::fs::symlink(&link, &target).map_err(io_at(&target))?;
                self.symlinks.insert(rel.clone());
                self.links.insert(rel, link);
            }
            tar::EntryType::Link => return Err(unsafe_entry(&raw, "hardlinks are not allowed")),
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(unsafe_entry(&raw, "device nodes are not allowed"))
            }
            tar::EntryType::Fifo => return Err(unsafe_entry(&raw, "FIFOs are not allowed")),
            other => {
                return Err(unsafe_entry(
                    &raw,
                    format!("entry type {other:?} is not allowed"),
                ))
            }
        }
        Ok(())
    }

    /// Creates missing parent directories of `rel` (never through a symlink: those were
    /// refused above, and everything else in the private root is ours).
    fn make_parents(&mut self, rel: &Path, raw: &Path) -> Result<(), ExtractError> {
        let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return Ok(());
        };
        let mut cur = self.root.to_path_buf();
        for c in parent.components() {
            cur.push(c);
            match cur.symlink_metadata() {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(unsafe_entry(raw, "a parent path is not a directory")),
                Err(_) => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&cur)
                        .map_err(io_at(&cur))?;
                }
            }
        }
        Ok(())
    }

    /// The reserve holds while writing, not only before: other writers share the disk.
    fn check_space(&self) -> Result<(), ExtractError> {
        let Ok(st) = nix::sys::statvfs::statvfs(self.root) else {
            return Ok(());
        };
        let free = st.blocks_available() * st.fragment_size();
        if free < self.guard.reserve_bytes {
            return Err(ExtractError::NoSpace {
                path: self.root.to_path_buf(),
                free,
                reserve: self.guard.reserve_bytes,
            });
        }
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &Path,
        target: &Path,
        mode: u32,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), ExtractError> {
        let declared = entry.header().size().map_err(|e| ExtractError::Corrupt {
            entry: Some(raw.display().to_string()),
            reason: e.to_string(),
        })?;
        if self.bytes.saturating_add(declared) > self.limits.max_unpacked_bytes {
            return Err(ExtractError::TooLarge {
                entry: raw.display().to_string(),
                limit: self.limits.max_unpacked_bytes,
            });
        }
        if let Ok(m) = target.symlink_metadata() {
            if m.is_file() {
                fs::remove_file(target).map_err(io_at(target))?;
            } else {
                return Err(unsafe_entry(raw, "file over an existing non-file"));
            }
        }
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .mode(0o600)
            .open(target)
            .map_err(io_at(target))?;
        let mut written = 0u64;
        while written < declared {
            if self.guard.cancel.load(Ordering::Relaxed) {
                return Err(ExtractError::Cancelled);
            }
            if self.bytes >= self.next_space_check {
                self.next_space_check = self.bytes + SPACE_CHECK_EVERY;
                self.check_space()?;
            }
            let want = (declared - written).min(self.buf.len() as u64) as usize;
            let n = entry
                .read(&mut self.buf[..want])
                .map_err(|e| ExtractError::Corrupt {
                    entry: Some(raw.display().to_string()),
                    reason: e.to_string(),
                })?;
            if n == 0 {
                return Err(ExtractError::Corrupt {
                    entry: Some(raw.display().to_string()),
                    reason: format!("data ends after {written} of {declared} bytes"),
                });
            }
            out.write_all(&self.buf[..n]).map_err(io_at(target))?;
            written += n as u64;
            if written % WRITEBACK_EVERY < n as u64 {
                start_writeback(&out);
            }
            self.bytes += n as u64;
            if self.bytes - self.reported >= 4 << 20 {
                self.reported = self.bytes;
                progress(self.bytes);
            }
        }
        out.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_at(target))?;
        start_writeback(&out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The hostile-archive corpus, generated here: each archive must fail with its code and
    //! leave nothing behind, inside or outside the destination.
    use super::*;
    use flate2::write::GzEncoder;

    const LIMITS: Limits = Limits {
        max_entries: 1000,
        max_unpacked_bytes: 1 << 20,
    };
    static NEVER: AtomicBool = AtomicBool::new(false);
    const GUARD: Guard<'static> = Guard {
        cancel: &NEVER,
        reserve_bytes: 0,
    };

    /// One raw tar header (ustar), written by hand so hostile names survive.
    fn header(name: &str, kind: tar::EntryType, size: u64, mode: u32, link: &str) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_cksum();
        h
    }

    enum E<'a> {
        File(&'a str, &'a [u8]),
        Mode(&'a str, &'a [u8], u32),
        Dir(&'a str),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Kind(&'a str, tar::EntryType),
    }

    fn build(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let (h, data): (tar::Header, &[u8]) = match e {
                E::File(n, d) => (
                    header(n, tar::EntryType::Regular, d.len() as u64, 0o644, ""),
                    d,
                ),
                E::Mode(n, d, m) => (
                    header(n, tar::EntryType::Regular, d.len() as u64, *m, ""),
                    d,
                ),
                E::Dir(n) => (header(n, tar::EntryType::Directory, 0, 0o755, ""), &[]),
                E::Sym(n, t) => (header(n, tar::EntryType::Symlink, 0, 0o777, t), &[]),
                E::Hard(n, t) => (header(n, tar::EntryType::Link, 0, 0o644, t), &[]),
                E::Kind(n, k) => (header(n, *k, 0, 0o644, ""), &[]),
            };
            b.append(&h, data).unwrap();
        }
        gzip(&b.into_inner().unwrap())
    }

    fn gzip(raw: &[u8]) -> Vec<u8> {
        let mut g = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        g.write_all(raw).unwrap();
        g.finish().unwrap()
    }

    struct Case {
        _dir: tempfile::TempDir,
        /// `<tmp>/outer/area`: the destination's parent; `<tmp>/outer` is "outside".
        area: PathBuf,
        dest: PathBuf,
        archive: PathBuf,
    }

    fn case(bytes: &[u8]) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let area = dir.path().join("outer/area");
        fs::create_dir_all(&area).unwrap();
        let archive = dir.path().join("a.tar.gz");
        fs::write(&archive, bytes).unwrap();
        Case {
            dest: area.join("dest"),
            area,
            archive,
            _dir: dir,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Extraction fails with `code` and nothing remains anywhere under `<tmp>/outer`.
    fn refused(entries: &[E], limits: Limits, code: &str) -> ExtractError {
        let c = case(&build(entries));
        refused_case(&c, limits, code)
    }

    fn refused_case(c: &Case, limits: Limits, code: &str) -> ExtractError {
        refused_case_with(c, limits, &GUARD, code)
    }

    fn refused_case_with(c: &Case, limits: Limits, guard: &Guard<'_>, code: &str) -> ExtractError {
        let e = extract_tar_gz(&c.archive, &c.dest, &limits, guard, &mut |_| {}).unwrap_err();
        assert_eq!(e.code().as_str(), code, "{e}");
        assert!(
            names(&c.area).is_empty(),
            "left behind: {:?}",
            names(&c.area)
        );
        assert_eq!(names(c.area.parent().unwrap()), vec!["area".to_string()]);
        e
    }

    #[test]
    fn a_clean_archive_unpacks_with_safe_modes() {
        let c = case(&build(&[
            E::Dir("bin/"),
            E::Mode("bin/tool", b"#!/bin/sh\n", 0o6777),
            E::File("./etc/conf", b"k=v\n"),
            E::Sym("bin/current", "tool"),
            E::Sym("link-to-etc", "etc"),
        ]));
        let mut seen = 0;
        let stats =
            extract_tar_gz(&c.archive, &c.dest, &LIMITS, &GUARD, &mut |b| seen = b).unwrap();
        assert_eq!(
            stats,
            Extracted {
                entries: 5,
                bytes: 14
            }
        );
        assert_eq!(seen, 14);
        assert_eq!(fs::read(c.dest.join("bin/tool")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(fs::read(c.dest.join("etc/conf")).unwrap(), b"k=v\n");
        let mode = |p: &str| {
            fs::symlink_metadata(c.dest.join(p))
                .unwrap()
                .permissions()
                .mode()
        };
        assert_eq!(
            mode("bin/tool") & 0o7777,
            0o755,
            "setuid, setgid, sticky and g/o write go"
        );
        assert_eq!(
            fs::read_link(c.dest.join("bin/current")).unwrap(),
            Path::new("tool")
        );
        assert_eq!(mode("") & 0o777, 0o755);
        assert_eq!(names(&c.area), vec!["dest".to_string()]);
        // The destination is never overwritten.
        let e = extract_tar_gz(&c.archive, &c.dest, &LIMITS, &GUARD, &mut |_| {}).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ExtractIoError);
    }

    #[test]
    fn traversal_and_absolute_paths() {
        refused(
            &[E::File("ok", b"1"), E::File("../evil", b"x")],
            LIMITS,
            "UNSAFE_ARCHIVE",
        );
        refused(&[E::File("a/../../evil", b"x")], LIMITS, "UNSAFE_ARCHIVE");
        let dir = tempfile::tempdir().unwrap();
        let abs = dir.path().join("abs-evil");
        let e = refused(
            &[E::File(abs.to_str().unwrap(), b"x")],
            LIMITS,
            "UNSAFE_ARCHIVE",
        );
        assert!(e.to_string().contains("absolute"), "{e}");
        assert!(!abs.exists());
    }

    #[test]
    fn symlink_escapes_and_writes_through_links() {
        refused(&[E::Sym("esc", "../../outside")], LIMITS, "UNSAFE_ARCHIVE");
        refused(&[E::Sym("abs", "/etc")], LIMITS, "UNSAFE_ARCHIVE");
        refused(&[E::Sym("d/up", "../..")], LIMITS, "UNSAFE_ARCHIVE");
        // An inside link is fine on its own, but nothing may be written through it.
        let e = refused(
            &[
                E::Dir("sub/"),
                E::Sym("link", "sub"),
                E::File("link/file", b"x"),
            ],
            LIMITS,
            "UNSAFE_ARCHIVE",
        );
        assert!(e.to_string().contains("through the symlink"), "{e}");
        // Nor may a later entry replace a link (which would then be followed by a reader).
        refused(
            &[E::Sym("l", "target"), E::File("l", b"x")],
            LIMITS,
            "UNSAFE_ARCHIVE",
        );
    }

    #[test]
    fn symlink_chains_that_leave_the_destination_are_refused() {
        // `b -> .` and `a -> b/..`: each stays inside lexically; followed, `a` is the parent.
        let e = refused(
            &[E::Sym("b", "."), E::Sym("a", "b/..")],
            LIMITS,
            "UNSAFE_ARCHIVE",
        );
        assert!(e.to_string().contains("other links"), "{e}");
        // A ten-level chain (l10 -> l9 -> ... -> l1 -> .), then one step up from its end.
        let names: Vec<String> = (1..=10).map(|i| format!("l{i}")).collect();
        let targets: Vec<String> = (0..10)
            .map(|i| {
                if i == 0 {
                    ".".into()
                } else {
                    names[i - 1].clone()
                }
            })
            .collect();
        let mut chain: Vec<E> = (0..10).map(|i| E::Sym(&names[i], &targets[i])).collect();
        chain.push(E::Sym("out", "l10/.."));
        refused(&chain, LIMITS, "UNSAFE_ARCHIVE");
        // A link through a directory the archive makes a link only later.
        refused(
            &[E::Sym("a", "b/c/.."), E::Sym("b", "..")],
            LIMITS,
            "UNSAFE_ARCHIVE",
        );
        // Loops are refused too; chains that stay inside are fine.
        refused(
            &[E::Sym("x", "y"), E::Sym("y", "x/z")],
            LIMITS,
            "UNSAFE_ARCHIVE",
        );
        let c = case(&build(&[
            E::Dir("v1/"),
            E::File("v1/bin", b"x"),
            E::Sym("current", "v1"),
            E::Sym("run", "current/bin"),
            E::Sym("d/up", "../current"),
        ]));
        extract_tar_gz(&c.archive, &c.dest, &LIMITS, &GUARD, &mut |_| {}).unwrap();
        assert_eq!(fs::read(c.dest.join("run")).unwrap(), b"x");
    }

    #[test]
    fn a_cancelled_or_starved_extraction_stops_and_leaves_nothing() {
        let big: Vec<u8> = vec![7u8; 4 << 20];
        let c = case(&build(&[E::File("a", &big), E::File("b", &big)]));
        let limits = Limits {
            max_entries: 10,
            max_unpacked_bytes: 1 << 30,
        };
        let cancel = AtomicBool::new(false);
        let guard = Guard {
            cancel: &cancel,
            reserve_bytes: 0,
        };
        // Cancelled after the first progress report: it stops there.
        let mut reports = 0;
        let e = extract_tar_gz(&c.archive, &c.dest, &limits, &guard, &mut |_| {
            reports += 1;
            cancel.store(true, Ordering::Relaxed);
        })
        .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Cancelled, "{e}");
        assert_eq!(reports, 1);
        assert!(names(&c.area).is_empty(), "{:?}", names(&c.area));
        // A reserve larger than the disk: refused as soon as it is looked at.
        let guard = Guard {
            cancel: &NEVER,
            reserve_bytes: u64::MAX,
        };
        refused_case_with(&c, limits, &guard, "INSUFFICIENT_DISK_SPACE");
    }

    #[test]
    fn hardlinks_devices_fifos_are_refused() {
        refused(
            &[E::File("a", b"x"), E::Hard("b", "a")],
            LIMITS,
            "UNSAFE_ARCHIVE",
        );
        refused(
            &[E::Kind("dev", tar::EntryType::Char)],
            LIMITS,
            "UNSAFE_ARCHIVE",
        );
        refused(
            &[E::Kind("blk", tar::EntryType::Block)],
            LIMITS,
            "UNSAFE_ARCHIVE",
        );
        refused(
            &[E::Kind("fifo", tar::EntryType::Fifo)],
            LIMITS,
            "UNSAFE_ARCHIVE",
        );
    }

    #[test]
    fn an_entry_bigger_than_its_data_is_corrupt() {
        let mut raw = header("big", tar::EntryType::Regular, 1000, 0o644, "")
            .as_bytes()
            .to_vec();
        raw.extend_from_slice(b"only ten b");
        let c = case(&gzip(&raw));
        refused_case(&c, LIMITS, "CORRUPT_ARCHIVE");
        let c = case(b"this is not gzip at all");
        refused_case(&c, LIMITS, "CORRUPT_ARCHIVE");
    }

    #[test]
    fn entry_and_size_caps_stop_bombs() {
        let many: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
        let entries: Vec<E> = many.iter().map(|n| E::File(n, b"x")).collect();
        let small = Limits {
            max_entries: 10,
            max_unpacked_bytes: 1 << 20,
        };
        refused(&entries, small, "ARCHIVE_LIMIT_EXCEEDED");

        // 64 MiB of zeros compress to ~64 KiB; the cap is 1 MiB.
        let mut g = GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut b = tar::Builder::new(&mut g);
        for i in 0..2 {
            let h = header(
                &format!("bomb{i}"),
                tar::EntryType::Regular,
                32 << 20,
                0o644,
                "",
            );
            b.append(&h, std::io::repeat(0).take(32 << 20)).unwrap();
        }
        b.finish().unwrap();
        drop(b);
        let bomb = g.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        let c = case(&bomb);
        refused_case(&c, LIMITS, "ARCHIVE_LIMIT_EXCEEDED");
        // A header that lies small cannot sneak past the cap either.
        let tight = Limits {
            max_entries: 10,
            max_unpacked_bytes: 10,
        };
        refused(
            &[E::File("a", b"0123456789abc")],
            tight,
            "ARCHIVE_LIMIT_EXCEEDED",
        );
    }
}
