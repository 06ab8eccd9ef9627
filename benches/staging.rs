//! Staging throughput, against the standard-tools pipeline on the same file: a generated
//! ~1 GiB tar.gz is served by a real controller over loopback mTLS, then (a) fetched,
//! verified and extracted by fieldhand's payload engine, and (b) fetched by `curl` with the
//! same certificates, checked by `sha256sum` and unpacked by `tar xzf`. Prints both
//! throughputs and their ratio. Run: `cargo bench --bench staging` (set
//! `FIELDHAND_BENCH_MIB` to change the unpacked size; default 2048).

// A benchmark runs the comparison tools (curl, sha256sum, tar) and the clock directly.
#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldhand::config::controller::ControllerConfig;
use fieldhand::net::client::HttpsClient;
use fieldhand::payload::extract::{self, Limits};
use fieldhand::payload::fetch::{self, Cache, FetchSettings};
use fieldhand::pki::Identity;
use fieldhand::proto::agent::PayloadRef;

const FILE_MIB: usize = 32;

/// Half the files are random bytes (incompressible), half are log-like text (very
/// compressible): the mix a software payload usually is.
fn generate(path: &Path, unpacked_mib: usize) -> u64 {
    let out = std::fs::File::create(path).unwrap();
    let enc = flate2::write::GzEncoder::new(
        std::io::BufWriter::with_capacity(4 << 20, out),
        flate2::Compression::new(1),
    );
    let mut b = tar::Builder::new(enc);
    let mut rng = fastrand::Rng::with_seed(42);
    let mut buf = vec![0u8; FILE_MIB << 20];
    for i in 0..unpacked_mib / FILE_MIB {
        if i % 2 == 0 {
            rng.fill(&mut buf);
        } else {
            let mut line = 0u64;
            let mut pos = 0;
            while pos < buf.len() {
                let text = format!(
                    "2026-11-24T10:{:02}:{:02}.{:03}Z INFO fieldhand::agent request {} took {} ms\n",
                    (line / 60) % 60,
                    line % 60,
                    line % 1000,
                    rng.u32(..100_000),
                    rng.u8(..200)
                );
                let n = text.len().min(buf.len() - pos);
                buf[pos..pos + n].copy_from_slice(&text.as_bytes()[..n]);
                pos += n;
                line += 1;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_path(format!("payload/part-{i:03}.bin")).unwrap();
        h.set_mode(0o644);
        h.set_size(buf.len() as u64);
        h.set_cksum();
        b.append(&h, &buf[..]).unwrap();
    }
    let mut w = b.into_inner().unwrap().finish().unwrap();
    w.flush().unwrap();
    std::fs::metadata(path).unwrap().len()
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn run(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let st = cmd.status().expect("tool");
    assert!(st.success(), "{cmd:?} failed");
    t.elapsed()
}

fn main() {
    let unpacked_mib: usize = std::env::var("FIELDHAND_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let base = std::env::var_os("FIELDHAND_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(base).unwrap();
    let dir = tmp.path();
    let pki = dir.join("pki");
    fieldhand::pki::init(&pki, &[]).unwrap();
    fieldhand::pki::issue(&pki, &Identity::operator("bench"), None).unwrap();
    fieldhand::pki::issue(&pki, &Identity::agent("bench-agent"), None).unwrap();

    let archive = dir.join("payload.tar.gz");
    let t = Instant::now();
    let size = generate(&archive, unpacked_mib);
    println!(
        "generated {} MiB tar.gz ({unpacked_mib} MiB unpacked) in {:.1} s",
        size >> 20,
        t.elapsed().as_secs_f64()
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let data_dir = dir.join("controller");
    let cfg_text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        data_dir.display(),
        pki.join("ca.pem").display(),
        pki.join("controller.pem").display(),
        pki.join("controller-key.pem").display()
    );
    let cfg = ControllerConfig::parse(&cfg_text, &dir.join("controller.toml")).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(fieldhand::controller::serve(cfg, async {
        let _ = stop_rx.await;
    }));
    let addr_file = data_dir.join("listen-addr");
    while !addr_file.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = std::fs::read_to_string(&addr_file)
        .unwrap()
        .trim()
        .to_string();
    let url = format!("https://{addr}");

    // Upload with curl (streams from the file).
    let op = |c: &mut Command| {
        c.arg("--cacert")
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(pki.join("operators/bench.pem"))
            .arg("--key")
            .arg(pki.join("operators/bench-key.pem"));
    };
    let mut up = Command::new("curl");
    up.args(["-sSf", "-o", "/dev/null", "-X", "POST", "-T"])
        .arg(&archive)
        .arg(format!("{url}/v1/blobs"));
    op(&mut up);
    run(&mut up);
    let sha256 = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut f = std::fs::File::open(&archive).unwrap();
        std::io::copy(&mut f, &mut h).unwrap();
        hex::encode(h.finalize())
    };
    let agent_tls = fieldhand::tls::client_config(
        &pki.join("ca.pem"),
        &pki.join("agents/bench-agent.pem"),
        &pki.join("agents/bench-agent-key.pem"),
    )
    .unwrap();

    // fieldhand: download + streaming sha256, then hardened extraction.
    let cache = Cache::new(dir.join("agent/payloads"));
    cache.ensure().unwrap();
    let r = PayloadRef {
        name: "bench".into(),
        version: "1".into(),
        sha256: sha256.clone(),
        size,
        format: "tar.gz".into(),
        unpacked_size: None,
        signature: None,
    };
    let client = HttpsClient::new(&url, Arc::clone(&agent_tls)).unwrap();
    // The controller serves a blob only to an agent with an assignment that uses it: register
    // the bench agent and give it a stage task for the payload.
    let op_tls = fieldhand::tls::client_config(
        &pki.join("ca.pem"),
        &pki.join("operators/bench.pem"),
        &pki.join("operators/bench-key.pem"),
    )
    .unwrap();
    let operator = HttpsClient::new(&url, op_tls).unwrap();
    rt.block_on(async {
        use http::Method;
        let t = Duration::from_secs(30);
        let hb = serde_json::json!({"pool_id": "bench", "agent_version": "bench",
            "facts": fieldhand::sys::facts::gather(dir, "bench", None)});
        client
            .json::<_, ()>(Method::POST, "/agent/v1/heartbeat", Some(&hb), t)
            .await
            .unwrap();
        let doc = serde_json::json!({"components": [
            {"name": "bench", "version": "1", "sha256": sha256, "format": "tar.gz"}]});
        operator
            .json::<_, serde_json::Value>(
                Method::PUT,
                "/v1/hosts/bench-agent/software/desired",
                Some(&doc),
                t,
            )
            .await
            .unwrap();
        operator
            .json::<_, serde_json::Value>(
                Method::POST,
                "/v1/hosts/bench-agent/software/stage",
                Some(&serde_json::json!({})),
                t,
            )
            .await
            .unwrap();
    });
    // Both pipelines start with no dirty pages pending, so neither pays for the other's
    // (or the generator's) writeback.
    nix::unistd::sync();
    let t0 = Instant::now();
    let blob = rt
        .block_on(fetch::fetch(
            &client,
            &cache,
            &r,
            &FetchSettings::default(),
            &mut |_| {},
        ))
        .unwrap();
    let t_fetch = t0.elapsed();
    let dest = dir.join("agent/software-bench");
    let limits = Limits {
        max_entries: 100_000,
        max_unpacked_bytes: 64 << 30,
    };
    let never = std::sync::atomic::AtomicBool::new(false);
    let guard = extract::Guard {
        cancel: &never,
        reserve_bytes: 0,
    };
    let t1 = Instant::now();
    extract::extract_tar_gz(&blob, &dest, &limits, &guard, &mut |_| {}).unwrap();
    let t_extract = t1.elapsed();
    let ours = t0.elapsed();
    std::fs::remove_dir_all(&dest).unwrap();
    std::fs::remove_file(&blob).unwrap();

    // Tools: curl into a file, then sha256sum, then tar xzf.
    let out = dir.join("tools.tar.gz");
    let unpack = dir.join("tools-unpack");
    std::fs::create_dir_all(&unpack).unwrap();
    let mut dl = Command::new("curl");
    dl.args(["-sSf", "-o"])
        .arg(&out)
        .arg("--cacert")
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join("agents/bench-agent.pem"))
        .arg("--key")
        .arg(pki.join("agents/bench-agent-key.pem"))
        .arg(format!("{url}/agent/v1/blobs/{sha256}"));
    nix::unistd::sync();
    let tools_t = Instant::now();
    let t_curl = run(&mut dl);
    let t_sum = run(Command::new("sha256sum")
        .arg(&out)
        .stdout(std::process::Stdio::null()));
    let t_tar = run(Command::new("tar")
        .arg("xzf")
        .arg(&out)
        .arg("-C")
        .arg(&unpack));
    let tools = tools_t.elapsed();

    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    println!(
        "fieldhand: {:.0} MB/s  ({:.2} s: download+sha256 {:.2} s, extract {:.2} s)",
        mbps(size, ours),
        ours.as_secs_f64(),
        t_fetch.as_secs_f64(),
        t_extract.as_secs_f64()
    );
    println!(
        "tools:     {:.0} MB/s  ({:.2} s: curl {:.2} s, sha256sum {:.2} s, tar xzf {:.2} s)",
        mbps(size, tools),
        tools.as_secs_f64(),
        t_curl.as_secs_f64(),
        t_sum.as_secs_f64(),
        t_tar.as_secs_f64()
    );
    println!(
        "ratio:     {:.2}x (throughput over the {} MiB tar.gz)",
        tools.as_secs_f64() / ours.as_secs_f64(),
        size >> 20
    );
}
