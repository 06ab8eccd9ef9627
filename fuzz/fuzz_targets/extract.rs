//! Fuzz target: the hardened tar.gz extractor. The input is a tar stream (gzipped here, so
//! the fuzzer explores tar headers rather than deflate). Whatever it holds: nothing is
//! written outside the destination, the byte and entry limits hold, no symlink in the result
//! resolves outside it, and a refused archive leaves nothing behind.
#![no_main]

use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use fieldhand::payload::extract::{extract_tar_gz, Guard, Limits};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_entries: 64,
    max_unpacked_bytes: 1 << 20,
};

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &std::fs::Metadata)) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if let Ok(m) = p.symlink_metadata() {
                f(&p, &m);
                if m.is_dir() {
                    walk(&p, f);
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().unwrap();
    // <tmp>/outside/area/dest: everything but `dest` must stay as it was.
    let area = tmp.path().join("outside/area");
    std::fs::create_dir_all(&area).unwrap();
    let dest = area.join("dest");
    let archive = tmp.path().join("in.tar.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    std::fs::write(&archive, gz.finish().unwrap()).unwrap();
    let never = AtomicBool::new(false);
    let guard = Guard {
        cancel: &never,
        reserve_bytes: 0,
    };
    let result = extract_tar_gz(&archive, &dest, &LIMITS, &guard, &mut |_| {});
    let mut outside: Vec<String> = std::fs::read_dir(tmp.path().join("outside"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    outside.sort();
    assert_eq!(
        outside,
        vec!["area".to_string()],
        "written beside the destination"
    );
    let names: Vec<_> = std::fs::read_dir(&area)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    match result {
        Err(_) => assert!(names.is_empty(), "a refused archive left {names:?}"),
        Ok(stats) => {
            assert_eq!(names, vec![std::ffi::OsString::from("dest")]);
            assert!(stats.entries <= LIMITS.max_entries);
            let root = dest.canonicalize().unwrap();
            let mut bytes = 0u64;
            walk(&dest, &mut |p, m| {
                if m.is_file() {
                    bytes += m.len();
                }
                if m.file_type().is_symlink() {
                    // Followed (where it resolves at all), it stays inside.
                    if let Ok(c) = p.canonicalize() {
                        assert!(
                            c.starts_with(&root),
                            "{} -> {} leaves {}",
                            p.display(),
                            c.display(),
                            root.display()
                        );
                    }
                }
            });
            assert!(bytes <= LIMITS.max_unpacked_bytes, "{bytes} bytes written");
        }
    }
});
