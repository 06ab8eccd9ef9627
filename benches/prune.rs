//! Pruning finished tasks (`task_retention_seconds`): how long removing one finished task of
//! N machines takes, and how long each chunk's transaction holds the write lock (on
//! PostgreSQL, the lock every replica's writes wait for). Each machine has the three event
//! keys a run leaves (`started`, `result`, a power step) and an output of 1 kB.
//!
//! `cargo bench --bench prune -- --machines 100000 [--postgres URL]` prints, per database:
//! the time to fill the task, the whole removal (the controller's own round,
//! `controller::prune_finished_tasks`), machines removed per second, and one chunk of
//! `PRUNE_CHUNK` machines timed alone (p50 and max over a second task). It asserts nothing.

use std::time::{Duration, Instant};

use fieldhand::controller::store::{Database, Outcome, RolloutRow, Store, StoreError, TaskRow};
use fieldhand::controller::{prune_finished_tasks, PRUNE_CHUNK};
use fieldhand::proto::domain::{MachineState, TaskKind, TaskState};

fn task(id: &str) -> TaskRow {
    TaskRow {
        task_id: id.into(),
        kind: TaskKind::ScriptExecution,
        pool_id: "p".into(),
        state: TaskState::Succeeded,
        created_ms: 1,
        finished_ms: Some(1_000),
        gray_fail_threshold: None,
        timeout_seconds: 60,
        scripts_json: "[]".into(),
        power_json: None,
        created_by: None,
        cancelled_by: None,
        rollout: RolloutRow::default(),
    }
}

/// A finished task of `n` machines with their keys and outputs, in transactions of 5,000.
async fn fill(store: &Store, id: &str, n: usize) {
    let ids: Vec<(String, String, u32)> = (0..n)
        .map(|i| (format!("m{i:06}"), format!("{id}-{i:06}"), 0))
        .collect();
    let t = task(id);
    let all = ids.clone();
    store.tx(move |tx| tx.insert_task(&t, &all)).await.unwrap();
    for part in ids.chunks(5_000) {
        let part = part.to_vec();
        store
            .tx(move |tx| {
                let out = Outcome {
                    stdout: "x".repeat(1024),
                    ..Outcome::default()
                };
                for (m, a, _) in &part {
                    for k in ["started", "result", "power:1:REBOOTING"] {
                        tx.claim_event(m, &format!("{a}:{k}"), 1)?;
                    }
                    tx.set_final(a, MachineState::Succeeded, &out)?;
                }
                Ok::<_, StoreError>(())
            })
            .await
            .unwrap();
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn measure(label: &str, db: Database, n: usize) {
    let store = Store::open(&db).unwrap();
    let t0 = Instant::now();
    fill(&store, "a", n).await;
    let filled = t0.elapsed();
    let t0 = Instant::now();
    let removed = prune_finished_tasks(&store, 2_000).await.unwrap();
    let took = t0.elapsed();
    // One chunk at a time, timed alone, over a second task of the same size.
    fill(&store, "b", n).await;
    let mut chunks = Vec::new();
    loop {
        let t0 = Instant::now();
        let k = store
            .tx(|tx| tx.prune_task_machines("b", 2_000, PRUNE_CHUNK))
            .await
            .unwrap();
        chunks.push(t0.elapsed());
        if k < PRUNE_CHUNK {
            break;
        }
    }
    chunks.sort();
    println!("{label}, a finished task of {n} machines (3 event keys and 1 kB of output each)");
    println!("  filled in             {:.2} s", filled.as_secs_f64());
    println!(
        "  removed in            {:.2} s ({removed} task), {:.0} machines/s",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    println!(
        "  one chunk of {PRUNE_CHUNK}     p50 {}, max {} ({} chunks)",
        ms(chunks[chunks.len() / 2]),
        ms(chunks[chunks.len() - 1]),
        chunks.len()
    );
}

fn main() {
    let mut machines = 100_000usize;
    let mut postgres = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--machines" => machines = args.next().and_then(|v| v.parse().ok()).unwrap_or(machines),
            "--postgres" => postgres = args.next(),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(measure(
        "SQLite",
        Database::Sqlite(dir.path().join("prune.db")),
        machines,
    ));
    if let Some(base) = postgres {
        let name = format!("fh_prune_{}", std::process::id());
        let mut admin = postgres::Client::connect(&base, postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let (root, _) = base.rsplit_once('/').unwrap();
        rt.block_on(measure(
            "PostgreSQL",
            Database::Postgres(format!("{root}/{name}")),
            machines,
        ));
    }
}
