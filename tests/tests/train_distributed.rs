//! Data-parallel training across real processes: two `protodino train` ranks on one host (real
//! sockets, the shared-memory all-reduce) follow the single-process run whose batch is their
//! global batch, step for step; rank 1 logs the same global losses as rank 0; a rank killed
//! mid-run makes the other fail within seconds, its finished checkpoints intact.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use protodino_tests::{binary, json_lines, protodino, repo_root};

/// Tiny and deterministic: no stochastic depth (its masks come from each process's own
/// generator), one thread per process, rank-0 work (analysis, checkpoints) every 3 steps.
const BASE: &str = r#"
[model]
drop_path_rate = 0.0
[head]
out_dim = 256
hidden_dim = 128
[data]
limit = 640
[eval]
analysis_every_steps = 3
usage_images = 100
[train]
epochs = 1
threads = 1
checkpoint_every_steps = 3
log_every_steps = 1
"#;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn steps(records: &[serde_json::Value]) -> Vec<serde_json::Value> {
    records
        .iter()
        .filter(|r| r["kind"] == "step")
        .cloned()
        .collect()
}

fn read_log(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn two_ranks_follow_the_single_process_run_with_their_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, extra: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{BASE}{extra}")).unwrap();
        p.to_str().unwrap().to_string()
    };
    // The global batch is 16 either way: 2 ranks x 8, or 1 process x 16.
    let per_rank = write("rank.toml", "batch_size_per_worker = 8\n");
    let single = write("single.toml", "batch_size_per_worker = 16\n");
    let demo = repo_root().join("configs/cpu-demo.toml");
    let demo = demo.to_str().unwrap();
    let common = |cfg: &str, out: &str| -> Vec<String> {
        [
            "train",
            "--config",
            demo,
            "--config",
            cfg,
            "--output-dir",
            out,
            "--max-steps",
            "6",
            "--json",
            "--knn-train-limit",
            "500",
            "--knn-test-limit",
            "200",
        ]
        .map(str::to_string)
        .to_vec()
    };
    // `[train]` is the last table of BASE, so the appended key lands in it.
    let dist_out = dir.path().join("dist");
    let dist_out_s = dist_out.to_str().unwrap().to_string();
    let peers = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let rank_args = |rank: usize| -> Vec<String> {
        let mut a = common(&per_rank, &dist_out_s);
        a.extend([
            "--world".into(),
            "2".into(),
            "--rank".into(),
            rank.to_string(),
            "--peers".into(),
            peers.clone(),
        ]);
        a
    };
    let secret = ("PROTODINO_GROUP_SECRET", "distributed-test-secret");
    let mut rank1 = Command::new(binary("protodino-worker", "protodino"))
        .args(rank_args(1))
        .env(secret.0, secret.1)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rank0 = Command::new(binary("protodino-worker", "protodino"))
        .args(rank_args(0))
        .env(secret.0, secret.1)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let rank1_status = rank1.wait().unwrap();
    assert!(
        rank0.status.success(),
        "rank 0 failed: {}",
        String::from_utf8_lossy(&rank0.stderr)
    );
    assert!(rank1_status.success(), "rank 1 failed");

    let single_out = dir.path().join("single");
    let reference = json_lines(&protodino(
        dir.path(),
        &common(&single, single_out.to_str().unwrap())
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));

    let ours = json_lines(&rank0);
    let (ours_steps, ref_steps) = (steps(&ours), steps(&reference));
    assert_eq!(ours_steps.len(), 6);
    assert_eq!(ref_steps.len(), 6);
    for (a, b) in ours_steps.iter().zip(&ref_steps) {
        for key in ["dino_loss", "teacher_entropy", "grad_norm", "lr"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1e-3),
                "step {}: {key} {x} (2 ranks x 8) vs {y} (1 x 16)",
                a["step"]
            );
        }
    }
    // Rank 1 logged the same global losses, and the same gradient norms (its gradients after the
    // all-reduce are rank 0's, bit for bit).
    let rank1_steps = steps(&read_log(&dist_out.join("rank-1/metrics.jsonl")));
    assert_eq!(rank1_steps.len(), 6);
    for (a, b) in ours_steps.iter().zip(&rank1_steps) {
        for key in ["dino_loss", "grad_norm", "koleo_proto"] {
            assert_eq!(a[key], b[key], "step {}: {key}", a["step"]);
        }
    }
    // Rank 0 owns the output: checkpoints, collapse figures and the final evaluation.
    assert!(ours.iter().any(|r| r["kind"] == "collapse"));
    let fin = ours.iter().find(|r| r["kind"] == "final").unwrap();
    assert_eq!(fin["step"], 6);
    assert!(fin["knn"].is_object(), "{fin}");
    let name = "checkpoint-00000006.safetensors";
    assert!(dist_out.join(name).exists());
    assert!(!dist_out.join("rank-1").join(name).exists());
}

#[test]
fn a_killed_rank_fails_the_other_fast_and_finished_checkpoints_stay() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("rank.toml");
    std::fs::write(&cfg, format!("{BASE}batch_size_per_worker = 8\n")).unwrap();
    let demo = repo_root().join("configs/cpu-demo.toml");
    let out = dir.path().join("dist");
    let peers = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let spawn = |rank: usize| {
        Command::new(binary("protodino-worker", "protodino"))
            .args(["train", "--config", demo.to_str().unwrap()])
            .args(["--config", cfg.to_str().unwrap()])
            .args(["--output-dir", out.to_str().unwrap(), "--json"])
            .args([
                "--world",
                "2",
                "--rank",
                &rank.to_string(),
                "--peers",
                &peers,
            ])
            .env("PROTODINO_GROUP_SECRET", "distributed-test-secret")
            // Long enough (400 steps) never to finish before the kill.
            .env("PROTODINO__TRAIN__EPOCHS", "10")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut rank0 = spawn(0);
    let mut rank1 = spawn(1);
    // Wait until rank 0 is past its first checkpoint (step 3), then kill rank 1.
    let log = out.join("metrics.jsonl");
    let started = Instant::now();
    loop {
        let steps = std::fs::read_to_string(&log)
            .map(|t| {
                t.lines()
                    .filter(|l| l.contains("\"kind\":\"step\""))
                    .count()
            })
            .unwrap_or(0);
        if steps >= 4 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "rank 0 made no progress"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    rank1.kill().unwrap();
    let killed = Instant::now();
    let _ = rank1.wait();
    let status = loop {
        if let Some(s) = rank0.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "rank 0 still running 20 s after its peer died"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = killed.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(rank0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "rank 0 must fail, not train on alone");
    assert!(
        err.contains("peer rank 1"),
        "the error names the lost peer: {err}"
    );
    // Detected, not timed out (the collective deadline is 10 s).
    assert!(took < Duration::from_secs(8), "{took:?}");
    // The finished work is there and readable.
    let ckpt = out.join("checkpoint-00000003.safetensors");
    let report = json_lines(&protodino(
        dir.path(),
        &["prototypes", ckpt.to_str().unwrap(), "--json"],
    ));
    assert!(!report.is_empty());
}
