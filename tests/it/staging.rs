//! Payload staging end to end: blobs, desired-software commits, verified and resumable
//! downloads, signatures, disk space, hostile archives, and the seed-004 error codes.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::support::{machine_of, wait_until, Agent, Client, Env};

const T: Duration = Duration::from_secs(60);

/// A tar.gz holding `files` (path, content) plus a directory.
fn targz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(enc);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_path("bin").unwrap();
    h.set_mode(0o755);
    h.set_size(0);
    h.set_cksum();
    b.append(&h, std::io::empty()).unwrap();
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// A tar.gz with one entry named `../escape` (written raw: tar-rs refuses such names).
fn traversal_targz() -> Vec<u8> {
    let mut h = tar::Header::new_old();
    let name = b"../escape";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_mode(0o644);
    h.set_size(3);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.extend_from_slice(b"bad");
    raw.resize(raw.len() + 509 + 1024, 0);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&raw).unwrap();
    enc.finish().unwrap()
}

/// Deterministic, mildly compressible bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len)
        .map(|i| {
            if i % 4 == 0 {
                rng.u8(..)
            } else {
                b'a' + (i % 7) as u8
            }
        })
        .collect()
}

fn sha(d: &[u8]) -> String {
    hex::encode(Sha256::digest(d))
}

fn stage(op: &Client, host: &str, body: Value) -> String {
    let (s, v) = op.post(&format!("/v1/hosts/{host}/software/stage"), body);
    assert_eq!(s, 200, "{v}");
    v["task_id"].as_str().unwrap().to_string()
}

fn desired(op: &Client, host: &str, components: Value) -> String {
    let (s, v) = op.put(
        &format!("/v1/hosts/{host}/software/desired"),
        json!({ "components": components }),
    );
    assert_eq!(s, 200, "{v}");
    v["commit"].as_str().unwrap().to_string()
}

fn software_dir(a: &Agent) -> std::path::PathBuf {
    a.dir.join("state/software")
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn signing_key(env: &Env) -> String {
    let out = crate::support::run(
        env!("CARGO_BIN_EXE_fieldhand-controller"),
        &["pki", "signing-key", "--dir", env.pki.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    std::fs::read_to_string(env.pki.join("signing-key.pub"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn signed_software_is_staged_by_newest_commit() {
    let env = Env::new();
    let public = signing_key(&env);
    let ctl = env.controller_with(&format!(
        "signing_key = \"{}\"",
        env.pki.join("signing-key.pem").display()
    ));
    let a = env.agent_with(
        &ctl,
        "h1",
        "hosts",
        &format!("[payloads]\ntrusted_keys = [\"{public}\"]\nrequire_signed_payloads = true\n"),
    );
    let op = env.operator(&ctl);
    op.wait_online(&["h1"], T);

    let tool = data(300_000, 1);
    let archive = targz(&[("bin/tool", &tool), ("README", b"hello")]);
    let conf = b"key = 1\n".to_vec();
    let (arc_sha, conf_sha) = (op.upload(&archive), op.upload(&conf));
    assert_eq!(arc_sha, sha(&archive));
    assert_eq!(op.upload(&archive), arc_sha, "uploading twice is a no-op");

    let c1 = desired(
        &op,
        "h1",
        json!([{"name": "conf", "version": "1", "sha256": conf_sha}]),
    );
    let c2 = desired(
        &op,
        "h1",
        json!([
            {"name": "tools", "version": "2.0", "sha256": arc_sha, "format": "tar.gz"},
            {"name": "conf", "version": "1", "sha256": conf_sha}
        ]),
    );
    assert!(c2.parse::<u64>().unwrap() > c1.parse::<u64>().unwrap());
    // `commit` is the minimum: asking for c1 stages the newest, c2.
    let task = stage(&op, "h1", json!({ "commit": c1 }));
    let t = op.wait_task(&task, T);
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    let m = machine_of(&t, "h1");
    assert!(m["components"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["phase"] == "STAGED" && c["bytes_done"] == c["bytes_total"]));

    let root = software_dir(&a).join(&c2);
    assert_eq!(std::fs::read(root.join("tools/bin/tool")).unwrap(), tool);
    assert_eq!(std::fs::read(root.join("tools/README")).unwrap(), b"hello");
    assert_eq!(std::fs::read(root.join("conf/conf")).unwrap(), conf);
    assert_eq!(entries(&software_dir(&a)), vec![c2.clone()]);

    let (s, sw) = op.get("/v1/hosts/h1/software");
    assert_eq!(s, 200);
    assert_eq!(sw["desired_commit"], c2.as_str());
    assert_eq!(sw["staged_commit"], c2.as_str());
    assert!(sw["components"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["staged"] == true));
    wait_until("status to show the staged commit", T, || {
        (a.status()["staged_commit"] == c2.as_str()).then_some(())
    });
}

#[test]
fn seed_error_codes_and_deadlines() {
    let env = Env::new();
    let ctl = env.controller();
    let _a = env.agent_with(
        &ctl,
        "h1",
        "hosts",
        "[payloads]\nmax_download_bytes_per_second = 65536\n",
    );
    let op = env.operator(&ctl);
    op.wait_online(&["h1"], T);
    let err = |(s, v): (u16, Value)| (s, v["error_code"].as_str().unwrap_or("").to_string(), v);

    let (s, code, _) = err(op.post("/v1/hosts/nobody/software/stage", json!({})));
    assert_eq!((s, code.as_str()), (404, "NOT_FOUND"));
    let (s, code, _) = err(op.post("/v1/hosts/h1/software/stage", json!({})));
    assert_eq!(
        (s, code.as_str()),
        (404, "NOT_FOUND"),
        "no desired document yet"
    );
    let missing = "0".repeat(64);
    let (s, code, v) = err(op.put(
        "/v1/hosts/h1/software/desired",
        json!({"components": [{"name": "ghost", "version": "1", "sha256": missing}]}),
    ));
    assert_eq!((s, code.as_str()), (400, "INVALID_PARAMETER"));
    assert!(v["error_msg"].as_str().unwrap().contains("ghost"), "{v}");

    let big = data(1 << 20, 2);
    let sum = op.upload(&big);
    let c = desired(
        &op,
        "h1",
        json!([{"name": "big", "version": "1", "sha256": sum}]),
    );
    for bad in ["abc", "0", "-1", "99"] {
        let (s, code, v) = err(op.post("/v1/hosts/h1/software/stage", json!({ "commit": bad })));
        assert_eq!((s, code.as_str()), (400, "INVALID_PARAMETER"), "{bad}: {v}");
        assert!(v["error_msg"].as_str().unwrap().contains(bad), "{v}");
    }
    // 1 MiB at 64 KiB/s needs 16 s; a 2 s deadline must end it as TIMED_OUT.
    let task = stage(&op, "h1", json!({ "commit": c, "timeout_seconds": 2 }));
    let (s, code, _) = err(op.post("/v1/hosts/h1/software/stage", json!({})));
    assert_eq!((s, code.as_str()), (409, "NOT_ALLOWED_IN_CURRENT_STATE"));
    let t = op.wait_task(&task, T);
    let m = machine_of(&t, "h1");
    assert_eq!(m["state"], "TIMED_OUT", "{t:#}");
    assert_eq!(m["error_code"], "TIMED_OUT");
}

#[test]
fn bad_payloads_fail_with_clear_codes_and_leave_nothing() {
    let env = Env::new();
    let public = signing_key(&env);
    let ctl = env.controller();
    let other = tempfile::tempdir().unwrap();
    fieldhand::pki::signing_key(other.path()).unwrap();
    let foreign = std::fs::read_to_string(other.path().join("signing-key.pub")).unwrap();
    let plain = env.agent(&ctl, "plain", "hosts");
    let strict = env.agent_with(
        &ctl,
        "strict",
        "hosts",
        &format!("[payloads]\ntrusted_keys = [\"{public}\"]\nrequire_signed_payloads = true\n"),
    );
    let op = env.operator(&ctl);
    op.wait_online(&["plain", "strict"], T);
    let run = |host: &str, comps: Value| {
        desired(&op, host, comps);
        let t = op.wait_task(&stage(&op, host, json!({})), T);
        machine_of(&t, host).clone()
    };
    let expect = |m: &Value, code: &str| {
        assert_eq!(m["state"], "FAILED", "{m:#}");
        assert_eq!(m["error_code"], code, "{m:#}");
    };

    // Unsigned while signatures are required.
    let ok = data(10_000, 3);
    let ok_sum = op.upload(&ok);
    let m = run(
        "strict",
        json!([{"name": "a", "version": "1", "sha256": ok_sum}]),
    );
    expect(&m, "SIGNATURE_REQUIRED");

    // Hash mismatch: the controller's stored copy was altered (same length).
    let victim = data(20_000, 4);
    let vsum = op.upload(&victim);
    let blob = ctl.dir.join("blobs/sha256").join(&vsum);
    let mut altered = victim.clone();
    altered[100] ^= 0xff;
    std::fs::write(&blob, &altered).unwrap();
    let m = run(
        "plain",
        json!([{"name": "v", "version": "1", "sha256": vsum}]),
    );
    expect(&m, "HASH_MISMATCH");

    // Truncated download: the stored copy lost its tail after the commit was staged.
    let long = data(50_000, 5);
    let lsum = op.upload(&long);
    desired(
        &op,
        "plain",
        json!([{"name": "l", "version": "1", "sha256": lsum}]),
    );
    // The commit pinned 50 000 bytes; the controller now serves 10 000.
    std::fs::write(ctl.dir.join("blobs/sha256").join(&lsum), &long[..10_000]).unwrap();
    let t = op.wait_task(&stage(&op, "plain", json!({})), T);
    expect(machine_of(&t, "plain"), "SIZE_MISMATCH");

    // Hostile archive: fails with the extractor's code, nothing staged, nothing outside.
    let hostile = traversal_targz();
    let hsum = op.upload(&hostile);
    let m = run(
        "plain",
        json!([{"name": "h", "version": "1", "sha256": hsum, "format": "tar.gz"}]),
    );
    expect(&m, "UNSAFE_ARCHIVE");
    let sw = software_dir(&plain);
    assert!(entries(&sw).is_empty(), "{:?}", entries(&sw));
    assert!(!sw.parent().unwrap().join("escape").exists());
    assert!(!sw.join("escape").exists());

    // Not enough disk: the declared unpacked size cannot fit anywhere.
    let m = run(
        "plain",
        json!([{"name": "huge", "version": "1", "sha256": ok_sum, "format": "tar.gz",
                "unpacked_size": 1u64 << 60}]),
    );
    expect(&m, "INSUFFICIENT_DISK_SPACE");
    assert!(m["error_msg"].as_str().unwrap().contains("free"), "{m:#}");

    // A signature from a key the agent does not trust.
    drop(strict);
    let ctl2_env = Env::new();
    std::fs::copy(
        other.path().join("signing-key.pem"),
        ctl2_env.pki.join("signing-key.pem"),
    )
    .unwrap();
    let ctl2 = ctl2_env.controller_with(&format!(
        "signing_key = \"{}\"",
        ctl2_env.pki.join("signing-key.pem").display()
    ));
    let _s2 = ctl2_env.agent_with(
        &ctl2,
        "strict2",
        "hosts",
        &format!("[payloads]\ntrusted_keys = [\"{public}\"]\nrequire_signed_payloads = true\n"),
    );
    assert_ne!(foreign.trim(), public);
    let op2 = ctl2_env.operator(&ctl2);
    op2.wait_online(&["strict2"], T);
    let s2 = op2.upload(&ok);
    desired(
        &op2,
        "strict2",
        json!([{"name": "a", "version": "1", "sha256": s2}]),
    );
    let t = op2.wait_task(&stage(&op2, "strict2", json!({})), T);
    expect(machine_of(&t, "strict2"), "SIGNATURE_INVALID");
}

#[test]
fn a_download_interrupted_by_an_agent_crash_resumes() {
    let env = Env::new();
    let ctl = env.controller();
    // 40 MiB at 8 MiB/s: long enough to kill the agent in the middle.
    let mut a = env.agent_with(
        &ctl,
        "h1",
        "hosts",
        "[payloads]\nmax_download_bytes_per_second = 8388608\n",
    );
    let op = env.operator(&ctl);
    op.wait_online(&["h1"], T);
    let payload = data(40 << 20, 6);
    let sum = op.upload(&payload);
    desired(
        &op,
        "h1",
        json!([{"name": "img", "version": "1", "sha256": sum}]),
    );
    let task = stage(&op, "h1", json!({}));
    wait_until("half of the download", T, || {
        let s = a.status();
        let done = s["running"]["components"][0]["bytes_done"]
            .as_u64()
            .unwrap_or(0);
        (done >= 22 << 20).then_some(())
    });
    a.kill();
    let served_before = op.get(&format!("/v1/blobs/{sum}")).1["bytes_served"]
        .as_u64()
        .unwrap();
    a.restart();
    let t = op.wait_task(&task, T);
    assert_eq!(machine_of(&t, "h1")["state"], "SUCCEEDED", "{t:#}");
    let served_after = op.get(&format!("/v1/blobs/{sum}")).1["bytes_served"]
        .as_u64()
        .unwrap();
    let second = served_after - served_before;
    println!(
        "resume: first attempt served {served_before} bytes, second {second} of {}",
        payload.len()
    );
    assert!(
        second < payload.len() as u64,
        "the second attempt re-downloaded everything ({second} bytes)"
    );
    let staged = software_dir(&a).join("1/img/img");
    assert_eq!(sha(&std::fs::read(staged).unwrap()), sum);
}

#[test]
fn blobs_are_served_with_ranges_to_agents_only() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    let blob = data(100_000, 7);
    let sum = op.upload(&blob);
    let other = op.upload(&data(1000, 8));
    let agent = env.agent_client(&ctl, "h1");
    let path = format!("/agent/v1/blobs/{sum}");
    // Blobs go only to an agent with an in-flight assignment that uses them.
    let (s, v) = agent.get(&path);
    assert_eq!(
        (s, v["error_code"].as_str()),
        (403, Some("FORBIDDEN")),
        "{v}"
    );
    let facts = json!({"hostname": "h1", "os": "x", "kernel": "x", "cpu_count": 1,
        "memory_total_bytes": 1, "memory_available_bytes": 1, "disk_free_bytes": 1,
        "uptime_seconds": 1, "agent_version": "0"});
    let (s, v) = agent.post(
        "/agent/v1/heartbeat",
        json!({"pool_id": "hosts", "agent_version": "0", "facts": facts}),
    );
    assert_eq!(s, 204, "{v}");
    desired(
        &op,
        "h1",
        json!([{"name": "b", "version": "1", "sha256": sum}]),
    );
    stage(&op, "h1", json!({}));
    let (s, _) = agent.get(&format!("/agent/v1/blobs/{other}"));
    assert_eq!(s, 403, "a blob outside the assignment stays private");
    let (s, _) = env.agent_client(&ctl, "h2").get(&path);
    assert_eq!(s, 403, "another machine's assignment is not ours");
    let (s, h, body) = agent.get_with(&path, &[]);
    assert_eq!(s, 200);
    assert_eq!(body, blob);
    let etag = h[http::header::ETAG].to_str().unwrap().to_string();

    let range = |r: &str, if_range: Option<&str>| {
        let mut hs = vec![(http::header::RANGE, r.to_string())];
        if let Some(v) = if_range {
            hs.push((http::header::IF_RANGE, v.to_string()));
        }
        agent.get_with(&path, &hs)
    };
    let (s, h, body) = range("bytes=90000-", Some(&etag));
    assert_eq!(s, 206);
    assert_eq!(h[http::header::CONTENT_RANGE], "bytes 90000-99999/100000");
    assert_eq!(body, &blob[90_000..]);
    let (s, _, body) = range("bytes=10-19", None);
    assert_eq!((s, body.as_slice()), (206, &blob[10..20]));
    let (s, h, _) = range("bytes=100000-", None);
    assert_eq!(s, 416);
    assert_eq!(h[http::header::CONTENT_RANGE], "bytes */100000");
    // A stale validator means "send it all".
    let (s, _, body) = range("bytes=5-", Some("\"other\""));
    assert_eq!((s, body.len()), (200, blob.len()));
    // Operators cannot use the agent download, and agents cannot upload.
    let (s, _, _) = op.get_with(&path, &[]);
    assert_eq!(s, 403);
    let (s, v) = agent.call(http::Method::POST, "/v1/blobs", Some(json!("x")));
    assert_eq!((s, v["error_code"].as_str()), (403, Some("FORBIDDEN")));
    let (s, v) = op.get(&format!("/agent/v1/blobs/{}", "0".repeat(64)));
    assert_eq!(s, 403, "{v}");
    let (s, v) = op.get(&format!("/v1/blobs/{}", "0".repeat(64)));
    assert_eq!((s, v["error_code"].as_str()), (404, Some("NOT_FOUND")));
    let (s, v) = op.get(&format!("/v1/blobs/{sum}"));
    assert_eq!((s, v["size"].as_u64()), (200, Some(100_000)));
}

#[test]
fn images_are_registered_from_uploaded_blobs() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    let archive = targz(&[("fieldhand/health-check", b"#!/bin/sh\nexit 0\n")]);
    let sum = op.upload(&archive);
    let (s, v) = op.post(
        "/v1/images",
        json!({"name": "desk", "version": "2026.11", "os_type": "linux", "gpu": false, "sha256": sum}),
    );
    assert_eq!(s, 200, "{v}");
    let id = v["image_id"].as_str().unwrap().to_string();
    let (s, list) = op.get("/v1/images");
    assert_eq!(s, 200);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["image_id"], id.as_str());
    assert_eq!(list[0]["size"], archive.len() as u64);
    let missing = "1".repeat(64);
    let (s, v) = op.post(
        "/v1/images",
        json!({"name": "desk", "version": "1", "os_type": "linux", "gpu": true, "sha256": missing}),
    );
    assert_eq!(
        (s, v["error_code"].as_str()),
        (400, Some("INVALID_PARAMETER"))
    );
    assert!(v["error_msg"].as_str().unwrap().contains(&missing), "{v}");
    let (s, v) = op.post(
        "/v1/images",
        json!({"name": "", "version": "1", "os_type": "linux", "gpu": true, "sha256": sum}),
    );
    assert_eq!(s, 400);
    assert!(v["error_msg"].as_str().unwrap().contains("name"), "{v}");
    let (s, v) = op.post(
        "/v1/images",
        json!({"name": "x", "version": "1", "os_type": "linux", "gpu": "yes", "sha256": sum}),
    );
    assert_eq!(s, 400, "{v}");
}

/// A tar.gz of one file of `len` zeros (a multiple of 64 MiB), made of concatenated gzip
/// members (as `MultiGzDecoder`, and gzip itself, read them): the 64 MiB member is
/// compressed once and repeated, so a huge archive costs the test almost nothing to make.
fn zeros_targz(len: u64) -> Vec<u8> {
    let gz = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    let chunk: u64 = 64 << 20;
    assert_eq!(len % chunk, 0);
    let mut h = tar::Header::new_gnu();
    h.set_path("zeros").unwrap();
    h.set_mode(0o644);
    h.set_size(len);
    h.set_cksum();
    let mut out = gz(h.as_bytes());
    let zeros = gz(&vec![0u8; chunk as usize]);
    for _ in 0..len / chunk {
        out.extend_from_slice(&zeros);
    }
    out.extend_from_slice(&gz(&[0u8; 1024]));
    out
}

/// Bytes in regular files below `p` (excluding the payload cache's verified downloads).
fn tree_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                if e.file_name() != "payloads" {
                    total += tree_bytes(&e.path());
                }
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

#[test]
fn a_staging_timeout_stops_the_extraction_and_an_archive_may_not_outgrow_its_declared_size() {
    let env = Env::new();
    let ctl = env.controller();
    let a = env.agent(&ctl, "h1", "hosts");
    let op = env.operator(&ctl);
    op.wait_online(&["h1"], T);

    // Larger than its declaration: refused while writing, whatever the header said before.
    let liar = targz(&[("bin/big", &data(4 << 20, 9))]);
    let sum = op.upload(&liar);
    desired(
        &op,
        "h1",
        json!([{"name": "liar", "version": "1", "sha256": sum, "format": "tar.gz", "unpacked_size": 1000}]),
    );
    let t = op.wait_task(&stage(&op, "h1", json!({})), T);
    let m = machine_of(&t, "h1");
    assert_eq!(m["error_code"], "ARCHIVE_LIMIT_EXCEEDED", "{t:#}");
    assert_eq!(entries(&software_dir(&a)), Vec::<String>::new());

    // 16 GiB of zeros in a 16 MiB archive, with a 1 s deadline: the extraction is still
    // writing when it times out, and must have stopped, cleaned up and closed its files by
    // the time the result is reported.
    let bomb = zeros_targz(16 << 30);
    let sum = op.upload(&bomb);
    desired(
        &op,
        "h1",
        json!([{"name": "zeros", "version": "1", "sha256": sum, "format": "tar.gz", "unpacked_size": 16u64 << 30}]),
    );
    let task = stage(&op, "h1", json!({"timeout_seconds": 1}));
    let t = op.wait_task(&task, T);
    let reported = std::time::Instant::now();
    let m = machine_of(&t, "h1");
    assert_eq!(m["state"], "TIMED_OUT", "{t:#}");
    let root = software_dir(&a);
    assert_eq!(
        entries(&root),
        Vec::<String>::new(),
        "a partial tree was left"
    );
    let pid = a.pid().expect("agent running");
    let open_deleted = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().contains("(deleted)"))
            .count()
    };
    assert_eq!(
        open_deleted(),
        0,
        "the agent still holds deleted files open"
    );
    let log = a.log();
    let stopped = log
        .lines()
        .find(|l| l.contains("staging stopped"))
        .expect("the agent logs when its staging stopped");
    eprintln!("from the staging timeout to the extraction stopping: {stopped}");
    // Nothing under the agent's directories grows afterwards (a deleted file still being
    // written would show as an open fd above; a live one shows here).
    let state = a.dir.join("state");
    let before = tree_bytes(&state);
    std::thread::sleep(Duration::from_secs(1));
    let after = tree_bytes(&state);
    assert!(
        after <= before + (1 << 20) && after < 64 << 20,
        "the agent's files kept growing after the result: {before} then {after} bytes, {:?} after it",
        reported.elapsed()
    );
}
