//! The service-overhead rows of `cargo xtask bench`: the same recipe trained through the
//! service (a local coordinator and worker agents, submitted through the job API) and without
//! it, in the same run.
//!
//! | row | protodino service | reference |
//! |---|---|---|
//! | 1 worker | coordinator + 1 agent | `protodino train` in one process |
//! | 2 workers | coordinator + 2 agents | 2 static-peer ranks (`--world 2 --rank R --peers …`) |
//!
//! Both sides run `configs/cpu-demo.toml` + `configs/bench/e2e-fmnist.toml` (periodic analysis
//! and checkpoints off) with the same global batch and the same threads per process; the figure
//! is the training loop's images/s from each run's final report.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::{Ctx, Pair, f, measure};
use crate::cluster::LocalService;
use crate::repo_root;

const DEMO: &str = "configs/cpu-demo.toml";
const E2E: &str = "configs/bench/e2e-fmnist.toml";

/// The final report of the last JSON line whose `kind` is `final`.
fn final_record(lines: &[String]) -> Result<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["kind"] == "final")
        .context("no final record")
}

fn knn_args(c: &mut Command) {
    c.args(["--knn-train-limit", "1000", "--knn-test-limit", "200"]);
}

/// Images/s of one job through a fresh local service with `workers` agents.
fn through_service(ctx: &Ctx, workers: usize, threads: usize, steps: &str) -> Result<f64> {
    let dir = ctx.scratch.join(format!("service-{workers}"));
    let service = LocalService::start(&ctx.release, &dir, workers, threads)?;
    let global = 32;
    let job = service.submit_with_preset(
        "cpu-demo",
        E2E,
        workers,
        global,
        &["--max-steps".into(), steps.into()],
    )?;
    let status = service
        .client("watch")
        .arg(&job)
        .arg("--json")
        .stdout(std::process::Stdio::null())
        .status()?;
    ensure!(status.success(), "the benchmark job {job} did not succeed");
    let out = service.client("status").arg(&job).arg("--json").output()?;
    ensure!(out.status.success(), "protodino status {job} failed");
    let job: Value = serde_json::from_slice(&out.stdout)?;
    service.stop();
    f(&job["result"], "images_per_second")
}

pub(super) fn service(ctx: &Ctx, pairs: &mut Vec<Pair>) -> Result<()> {
    let steps = if ctx.quick { "30" } else { "100" };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    // One process with all cores against one agent with all cores.
    let out = ctx.scratch.join("service-bare");
    let _ = std::fs::remove_dir_all(&out);
    let mut bare = Command::new(ctx.release.join("protodino"));
    bare.current_dir(repo_root())
        .args(["train", "--config", DEMO, "--config", E2E])
        .args(["--max-steps", steps, "--json"])
        .arg("--output-dir")
        .arg(&out)
        .env("PROTODINO__TRAIN__THREADS", cores.to_string());
    knn_args(&mut bare);
    let bare = measure("service: bare train", bare)?;
    let bare = f(&final_record(&bare.stdout)?, "images_per_second")?;
    let one = through_service(ctx, 1, cores, steps)?;
    pairs.push(Pair {
        section: "service",
        what: format!("1 worker through the coordinator vs `protodino train`, cpu-demo, batch 32, {steps} steps"),
        unit: "img/s",
        ours: one,
        theirs: bare,
        mem: None,
    });

    // Two agents against two static-peer ranks, one thread each, global batch 32.
    let out = ctx.scratch.join("service-static");
    let _ = std::fs::remove_dir_all(&out);
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        })
        .collect::<Result<_>>()?;
    let peers = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let rank = |r: usize| {
        let mut c = Command::new(ctx.release.join("protodino"));
        c.current_dir(repo_root())
            .args(["train", "--config", DEMO, "--config", E2E])
            .args(["--max-steps", steps, "--json"])
            .arg("--output-dir")
            .arg(&out)
            .args(["--world", "2", "--rank", &r.to_string(), "--peers", &peers])
            .env("PROTODINO_GROUP_SECRET", "bench-static-peers")
            .env("PROTODINO__TRAIN__BATCH_SIZE_PER_WORKER", "16")
            .env("PROTODINO__TRAIN__THREADS", (cores / 2).max(1).to_string());
        knn_args(&mut c);
        c
    };
    let mut rank1 = rank(1)
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting static rank 1")?;
    let rank0 = measure("service: static-peer world 2", rank(0));
    let status = rank1.wait()?;
    let rank0 = rank0?;
    ensure!(status.success(), "static rank 1 failed with {status}");
    let static2 = f(&final_record(&rank0.stdout)?, "images_per_second")?;
    let two = through_service(ctx, 2, (cores / 2).max(1), steps)?;
    pairs.push(Pair {
        section: "service",
        what: format!("2 workers through the coordinator vs 2 static-peer ranks, global batch 32, {steps} steps"),
        unit: "img/s",
        ours: two,
        theirs: static2,
        mem: None,
    });
    Ok(())
}
