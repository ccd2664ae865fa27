//! `cargo xtask loadgen [ARGS]`: the coordinator under the load of a large fleet. Provisions the
//! data, builds the release coordinator and `protodino-loadgen` (`crates/loadgen`), starts the
//! coordinator as a real process (port 0, fresh tokens, a fresh redb store under
//! `<out>/service`), then runs the load generator against it with `ARGS`
//! (`protodino-loadgen --help`: `--workers`, `--duration-s`, …). Reports: `loadgen.md` and
//! `loadgen.json` in `--out` (default `<cache>/loadgen/latest`).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::{cache_root, cargo, cluster, data, repo_root, run, target_dir};

#[derive(clap::Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// Where the reports and the service's files go [default: <cache>/loadgen/latest].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Arguments for `protodino-loadgen` (e.g. `--workers 1000 --duration-s 600`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn loadgen(args: LoadgenArgs) -> Result<()> {
    let data_root = data::ensure()?;
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "--package",
        "protodino-coordinator",
        "--package",
        "protodino-loadgen",
    ]);
    run(build)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| cache_root().join("loadgen/latest"));
    let dir = out.join("service");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("checkpoints"))?;
    let (job_token, join_token) = (dir.join("job-token"), dir.join("join-token"));
    cluster::secret_file(&job_token)?;
    cluster::secret_file(&join_token)?;

    let release = target_dir().join("release");
    let mut cmd = Command::new(release.join("protodino-coordinator"));
    cmd.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--store")
        .arg(dir.join("coordinator.redb"))
        .arg("--configs-dir")
        .arg(repo_root().join("configs"))
        .arg("--data-root")
        .arg(&data_root)
        .arg("--checkpoint-root")
        .arg(dir.join("checkpoints"))
        .arg("--job-token-file")
        .arg(&job_token)
        .arg("--join-token-file")
        .arg(&join_token);
    let (coordinator, words) =
        cluster::start("the coordinator", cmd, &dir.join("coordinator.log"))?;
    let mut lg = Command::new(release.join("protodino-loadgen"));
    lg.args(["--grpc", &words[3], "--metrics", &words[5]])
        .args(["--pid", &coordinator.pid().to_string()])
        .arg("--job-token-file")
        .arg(&job_token)
        .arg("--join-token-file")
        .arg(&join_token)
        .arg("--service-dir")
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .args(&args.args);
    let status = lg.status().context("starting protodino-loadgen")?;
    drop(coordinator);
    ensure!(status.success(), "the load test failed ({status})");
    Ok(())
}
