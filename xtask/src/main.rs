//! protodino task runner (`cargo xtask …`).
//!
//! The README's two commands are `cargo xtask demo` (the main job) and `cargo xtask test` (every
//! check). Both provision what they need by themselves — libtorch (`libtorch.rs`) and the real
//! data sets (`data.rs`) — into a cache outside the clone (`$PROTODINO_CACHE`, else
//! `$XDG_CACHE_HOME/protodino`, else `~/.cache/protodino`), so a second run downloads nothing.

mod bench;
mod cluster;
mod convert;
mod data;
mod elf;
mod libtorch;
mod loadgen;
mod plots;
mod prometheus;
mod pyref;
mod study;
mod tools;
mod validators;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "protodino task runner")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Provision libtorch 2.11.0 (CPU) from the PyPI wheels into the cache.
    Libtorch,
    /// Provision the real data sets (Fashion-MNIST, …) into the cache.
    Data,
    /// Run every check: rustfmt, clippy (-D warnings) and all tests, after provisioning.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The main job: a local coordinator and worker agents train DINO + KoLeo-proto on real
    /// data (configs/cpu-demo.toml through the job API), with progress, collapse figures and k-NN.
    Demo {
        /// Worker agents on this host (the global batch and the cores are shared out, so any
        /// number trains the same recipe).
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Without the service: `protodino train` in one process, or `--workers` static-peer
        /// ranks (`--world/--rank/--peers`).
        #[arg(long)]
        standalone: bool,
        /// Extra arguments for `protodino submit` (or, with --standalone, `protodino train`),
        /// e.g. `-- --max-steps 100`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The collapse study: DINO vs DINO + KoLeo-proto (λ ∈ {0, 0.01, 0.1, 1}, K ∈ {1024, 4096}),
    /// balanced and long-tailed, with plots and docs/results.md.
    Study {
        /// The short variant (4 runs, under 15 minutes); reports under the cache, not docs/.
        #[arg(long)]
        quick: bool,
        /// Which runs: the collapse study (docs/results.md) or the objective sweep.
        #[arg(long, value_enum, default_value = "collapse")]
        plan: study::Plan,
        /// Output directory of results.json, results.md and the figures.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Side-by-side benchmarks against PyTorch / torchvision / gloo (step, data, end to end,
    /// memory, all-reduce), one table; provisions its own Python reference environment.
    Bench {
        /// Fewer steps, images and sizes (a few minutes; for trying the command).
        #[arg(long)]
        quick: bool,
        /// Only these sections (step, data, e2e, allreduce), comma separated.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Output directory of bench.md and bench.json (default: the cache's bench/latest).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Load test of the coordinator: simulated workers (the real WorkerService) register and
    /// heartbeat every second while jobs are submitted, scheduled and cancelled; p99 latency
    /// per RPC, lost jobs and the coordinator's memory, in loadgen.md / loadgen.json.
    Loadgen(loadgen::LoadgenArgs),
    /// Provision the Python reference environment (torch 2.11.0, torchvision) and print its python.
    Pyref,
    /// Convert an official DINO / iBOT .pth checkpoint (full, or a bare state dict with
    /// `--prefix teacher`) to protodino's safetensors format, in the Python reference environment.
    Convert(convert::ConvertArgs),
    /// Provision the deployment validators (Helm SDK, kubernetes-validate, hadolint, yamllint,
    /// the prometheus-operator CRD models) and print the environment variables the tests read.
    Validators,
    /// Provision promtool and the Prometheus server (Debian's package, unpacked into the cache)
    /// and print the environment variables the metrics test reads.
    Prometheus,
    /// Print the cache locations and sizes.
    Info,
}

/// Root of the cache that survives across clones (shared with the binaries).
pub fn cache_root() -> PathBuf {
    protodino_config::cache_root()
}

/// The workspace root (xtask lives one level below it).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `target/` in the workspace).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// `cargo` in the workspace, without the variables `cargo run` set for this process
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, ...): ring's build script declares
/// `rerun-if-env-changed` on some of them and cargo compares its own environment, so builds
/// started from here recompiled ring, rustls, tonic and everything above them (and a build from
/// a shell recompiled them back).
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(repo_root());
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            )
        {
            c.env_remove(key);
        }
    }
    c
}

fn run(mut cmd: Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed with {status}");
    Ok(())
}

fn test(args: Vec<String>) -> Result<()> {
    libtorch::ensure()?;
    data::ensure()?;
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy)?;
    let prom = prometheus::ensure()?;
    let mut t = cargo();
    t.args(["test", "--workspace"])
        .args(&args)
        .env(tools::GRPCURL_ENV, tools::grpcurl()?)
        .env(prometheus::PROMETHEUS_ENV, &prom.prometheus)
        .env(prometheus::PROMTOOL_ENV, &prom.promtool)
        .envs(validators::env()?);
    run(t)
}

fn demo(workers: usize, standalone: bool, args: Vec<String>) -> Result<()> {
    libtorch::ensure()?;
    data::ensure()?;
    if !standalone {
        return cluster::demo(workers, &args);
    }
    const CONFIG: &str = "configs/cpu-demo.toml";
    let train = ["train", "--config", CONFIG];
    if workers <= 1 {
        let mut c = cargo();
        c.args([
            "run",
            "--release",
            "--package",
            "protodino-worker",
            "--bin",
            "protodino",
            "--",
        ])
        .args(train)
        .args(&args);
        return run(c);
    }
    // The demo's global batch and the machine's cores are shared out over the ranks, so the
    // recipe is the single-process one; rank 0 prints progress and results, the others only
    // errors.
    let batch = protodino_config::TrainConfig::load(&[repo_root().join(CONFIG)])?
        .train
        .batch_size_per_worker as usize;
    ensure!(
        batch.is_multiple_of(workers),
        "--workers {workers}: the demo's global batch of {batch} must divide evenly"
    );
    cluster::build_release()?;
    let exe = target_dir().join("release/protodino");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ports: Vec<u16> = (0..workers)
        .map(|_| {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        })
        .collect::<Result<_>>()?;
    let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut secret = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut secret)?;
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let rank_cmd = |rank: usize| {
        let mut c = Command::new(&exe);
        c.current_dir(repo_root())
            .args(train)
            .args(&args)
            .args(["--world", &workers.to_string(), "--rank", &rank.to_string()])
            .args(["--peers", &peers.join(",")])
            .env("PROTODINO_GROUP_SECRET", &secret)
            .env(
                "PROTODINO__TRAIN__BATCH_SIZE_PER_WORKER",
                (batch / workers).to_string(),
            )
            .env(
                "PROTODINO__TRAIN__THREADS",
                (cores / workers).max(1).to_string(),
            );
        c
    };
    // Not `run`: its log line would print the environment, secret included.
    eprintln!(
        "xtask: {workers} ranks of {} train --config {CONFIG} {} --peers {}",
        exe.display(),
        args.join(" "),
        peers.join(",")
    );
    let mut others = Vec::new();
    for rank in 1..workers {
        let mut c = rank_cmd(rank);
        c.stdout(std::process::Stdio::null());
        others.push(c.spawn().with_context(|| format!("starting rank {rank}"))?);
    }
    let leader = rank_cmd(0)
        .status()
        .context("starting rank 0")
        .and_then(|s| {
            ensure!(s.success(), "rank 0 failed with {s}");
            Ok(())
        });
    for (i, mut child) in others.into_iter().enumerate() {
        if leader.is_err() {
            let _ = child.kill();
        }
        let status = child.wait()?;
        ensure!(
            leader.is_err() || status.success(),
            "rank {} failed with {status}",
            i + 1
        );
    }
    leader
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Libtorch => {
            let dir = libtorch::ensure()?;
            println!("{}", dir.display());
        }
        Cmd::Data => {
            let dir = data::ensure()?;
            println!("{}", dir.display());
        }
        Cmd::Bench { quick, only, out } => bench::bench(bench::BenchArgs { quick, only, out })?,
        Cmd::Loadgen(args) => loadgen::loadgen(args)?,
        Cmd::Pyref => println!("{}", pyref::ensure()?.display()),
        Cmd::Convert(args) => convert::convert(args)?,
        Cmd::Validators => {
            for (var, path) in validators::env()? {
                println!("{var}={}", path.display());
            }
        }
        Cmd::Prometheus => {
            let b = prometheus::ensure()?;
            println!("{}={}", prometheus::PROMETHEUS_ENV, b.prometheus.display());
            println!("{}={}", prometheus::PROMTOOL_ENV, b.promtool.display());
        }
        Cmd::Test { args } => test(args)?,
        Cmd::Demo {
            workers,
            standalone,
            args,
        } => demo(workers, standalone, args)?,
        Cmd::Study { quick, plan, out } => study::study(study::StudyArgs { quick, plan, out })?,
        Cmd::Info => {
            let root = cache_root();
            println!("cache: {}", root.display());
            let lt = libtorch::install_dir();
            if lt.exists() {
                println!(
                    "libtorch: {} ({} MiB)",
                    lt.display(),
                    libtorch::dir_size(&lt)? >> 20
                );
            }
            let d = data::data_root();
            if d.exists() {
                println!(
                    "data: {} ({} MiB)",
                    d.display(),
                    libtorch::dir_size(&d)? >> 20
                );
            }
        }
    }
    Ok(())
}
