//! Source-tree rules from the code map in `src/lib.rs`, checked so they cannot rot.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("tests"), &mut files);
    files.sort();
    assert!(files.len() > 20, "found only {} files", files.len());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p.strip_prefix(root).unwrap().display().to_string(), text)
        })
        .collect()
}

#[test]
fn every_file_says_what_it_is_for() {
    let missing: Vec<_> = sources()
        .into_iter()
        .filter(|(_, t)| !t.starts_with("//! "))
        .map(|(p, _)| p)
        .collect();
    assert!(
        missing.is_empty(),
        "files without a leading `//!` line: {missing:?}"
    );
}

#[test]
fn only_sys_spawns_processes_and_only_proto_derives_serde() {
    let mut offenders = Vec::new();
    for (path, text) in sources() {
        if !path.starts_with("src/") {
            continue;
        }
        if !path.starts_with("src/sys/") && text.contains("Command::new") {
            offenders.push(format!("{path}: spawns a process outside sys"));
        }
        let derives_serde = text.lines().any(|l| {
            l.contains("derive(") && (l.contains("Serialize") || l.contains("Deserialize"))
        });
        if !path.starts_with("src/proto/") && derives_serde {
            offenders.push(format!("{path}: derives serde outside proto"));
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}

/// The code map's boot-id rule: only `sys` reads the boot id (the kernel's file and the
/// `bootid` seam are named nowhere else but where the agent starts and its config default).
#[test]
fn only_sys_reads_the_boot_id_and_the_wall_clock() {
    let mut offenders = Vec::new();
    for (path, text) in sources() {
        if !path.starts_with("src/") || path.starts_with("src/sys/") {
            continue;
        }
        if text.contains("random/boot_id") {
            offenders.push(format!("{path}: names the kernel's boot id file"));
        }
        // The agent reads it once, at start, through the seam.
        if text.contains("bootid::read_boot_id") && path != "src/agent/mod.rs" {
            offenders.push(format!(
                "{path}: reads the boot id outside the agent's start"
            ));
        }
        // Monotonic timers (Instant) are fine anywhere; the wall clock goes through sys.
        for clock in ["SystemTime::now", "OffsetDateTime::now_utc"] {
            if text.contains(clock) {
                offenders.push(format!(
                    "{path}: reads the wall clock ({clock}) outside sys::clock"
                ));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}
