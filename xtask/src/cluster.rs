//! `cargo xtask demo`: the training service on this machine. A coordinator and N worker agents
//! as real processes on loopback (each binds port 0 and prints what it bound), fresh tokens in
//! files only their owner can read, `configs/cpu-demo.toml` submitted through the job API
//! (`protodino submit`), a progress bar fed by `WatchJob` and the final report
//! (`protodino watch`). Everything lives under `runs/demo-cluster/` (store, checkpoints, logs).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, ensure};

use crate::{cargo, repo_root, run, target_dir};

/// A child process that is stopped (SIGTERM, then SIGKILL) when the demo ends, however it ends.
pub(crate) struct Guard {
    name: String,
    child: Child,
}

impl Guard {
    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("xtask: {} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn secret_file(path: &Path) -> Result<()> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, hex::encode(bytes).as_bytes())?;
    Ok(())
}

/// Starts `cmd`, reads its first stdout line (the addresses it bound) and returns its words.
pub(crate) fn start(name: &str, mut cmd: Command, log: &Path) -> Result<(Guard, Vec<String>)> {
    let log = std::fs::File::create(log)?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("piped stdout")?;
    let mut reader = BufReader::new(stdout);
    reader.read_line(&mut line)?;
    // Drain the rest so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    let guard = Guard {
        name: name.into(),
        child,
    };
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    ensure!(
        words.len() == 6,
        "{name} printed {line:?} instead of its addresses"
    );
    Ok((guard, words))
}

/// A coordinator and its worker agents, running until dropped.
pub struct LocalService {
    pub dir: PathBuf,
    pub grpc: String,
    pub url: String,
    pub job_token: PathBuf,
    protodino: PathBuf,
    // Dropped in reverse order: agents first, then the coordinator.
    _coordinator: Guard,
    agents: Vec<Guard>,
}

/// Builds the release binaries of the service (`protodino`, `protodino-coordinator`); returns
/// their directory.
pub fn build_release() -> Result<PathBuf> {
    build_release_bins(&[])
}

/// [`build_release`] and the `(package, binary)` pairs of `extra`, in one cargo invocation (so
/// the shared crates are built once, with one feature set).
pub fn build_release_bins(extra: &[(&str, &str)]) -> Result<PathBuf> {
    let mut build = cargo();
    build.args(["build", "--release"]);
    for (package, bin) in [
        ("protodino-worker", "protodino"),
        ("protodino-coordinator", "protodino-coordinator"),
    ]
    .iter()
    .chain(extra)
    {
        build.args(["--package", package, "--bin", bin]);
    }
    run(build)?;
    Ok(target_dir().join("release"))
}

impl LocalService {
    /// Starts a coordinator and `workers` agents with `threads` libtorch threads each, all
    /// state under `dir` (cleared first).
    pub fn start(release: &Path, dir: &Path, workers: usize, threads: usize) -> Result<Self> {
        let protodino = release.join("protodino");
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        let checkpoints = dir.join("checkpoints");
        std::fs::create_dir_all(&checkpoints)?;
        let (job_token, join_token) = (dir.join("job-token"), dir.join("join-token"));
        secret_file(&job_token)?;
        secret_file(&join_token)?;

        let mut coordinator = Command::new(release.join("protodino-coordinator"));
        coordinator
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--store")
            .arg(dir.join("coordinator.redb"))
            .arg("--configs-dir")
            .arg(repo_root().join("configs"))
            .arg("--data-root")
            .arg(protodino_config::data_root())
            .arg("--checkpoint-root")
            .arg(&checkpoints)
            .arg("--job-token-file")
            .arg(&job_token)
            .arg("--join-token-file")
            .arg(&join_token);
        let (coordinator, words) =
            start("the coordinator", coordinator, &dir.join("coordinator.log"))?;
        let (grpc, metrics) = (words[3].clone(), words[5].clone());
        let url = format!("http://{grpc}");
        eprintln!("xtask: coordinator on {grpc} (metrics http://{metrics}/metrics)");
        let threads = threads.to_string();
        let mut agents = Vec::new();
        for i in 0..workers {
            let name = format!("worker-{i}");
            let mut w = Command::new(&protodino);
            w.args(["worker", "--coordinator", &url, "--name", &name])
                .args(["--threads", &threads])
                .args(["--collective-listen", "127.0.0.1:0"])
                .args(["--metrics-listen", "127.0.0.1:0"])
                .arg("--data-root")
                .arg(protodino_config::data_root())
                .arg("--checkpoint-root")
                .arg(&checkpoints)
                .arg("--join-token-file")
                .arg(&join_token);
            let (guard, words) = start(&name, w, &dir.join(format!("{name}.log")))?;
            eprintln!(
                "xtask: {name}: collective {} metrics http://{}/metrics",
                words[3], words[5]
            );
            agents.push(guard);
        }
        Ok(LocalService {
            dir: dir.to_path_buf(),
            grpc,
            url,
            job_token,
            protodino,
            _coordinator: coordinator,
            agents,
        })
    }

    /// `protodino SUB --coordinator URL --token-file F`.
    pub fn client(&self, sub: &str) -> Command {
        let mut c = Command::new(&self.protodino);
        c.arg(sub)
            .args(["--coordinator", &self.url])
            .arg("--token-file")
            .arg(&self.job_token)
            .current_dir(repo_root());
        c
    }

    /// Submits `config` on the `default` preset with a fixed world and global batch; returns
    /// the job id.
    pub fn submit(
        &self,
        config: &str,
        world: usize,
        global: usize,
        args: &[String],
    ) -> Result<String> {
        self.submit_with_preset("default", config, world, global, args)
    }

    /// [`Self::submit`] over the coordinator's preset `preset`.
    pub fn submit_with_preset(
        &self,
        preset: &str,
        config: &str,
        world: usize,
        global: usize,
        args: &[String],
    ) -> Result<String> {
        self.submit_elastic(preset, config, world..=world, global, args)
    }

    /// [`Self::submit_with_preset`] with a range of world sizes: the group may shrink to
    /// `world.start()` members and grow to `world.end()`.
    pub fn submit_elastic(
        &self,
        preset: &str,
        config: &str,
        world: std::ops::RangeInclusive<usize>,
        global: usize,
        args: &[String],
    ) -> Result<String> {
        let mut submit = self.client("submit");
        submit
            .arg(config)
            .args(["--preset", preset])
            .args(["--min-world", &world.start().to_string()])
            .args(["--max-world", &world.end().to_string()])
            .args(["--global-batch", &global.to_string()])
            .args(args);
        let out = submit.output().context("running protodino submit")?;
        ensure!(
            out.status.success(),
            "protodino submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// Each agent's name (`worker-I`, its `--name`) and process id, in start order.
    pub fn agent_pids(&self) -> Vec<(String, u32)> {
        self.agents
            .iter()
            .map(|g| (g.name.clone(), g.pid()))
            .collect()
    }

    /// Stops the agents, then the coordinator.
    pub fn stop(mut self) {
        self.agents.clear();
    }
}

/// The demo: `workers` agents, the global batch of `configs/cpu-demo.toml`, `args` passed on to
/// `protodino submit` (e.g. `--max-steps 100`).
pub fn demo(workers: usize, args: &[String]) -> Result<()> {
    ensure!(workers >= 1, "--workers must be at least 1");
    const CONFIG: &str = "configs/cpu-demo.toml";
    let cfg = protodino_config::TrainConfig::load_files(&[repo_root().join(CONFIG)])?;
    let global = cfg.train.batch_size_per_worker as usize;
    ensure!(
        global.is_multiple_of(workers),
        "--workers {workers}: the demo's global batch of {global} must divide evenly"
    );
    let release = build_release()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = repo_root().join("runs/demo-cluster");
    let service = LocalService::start(&release, &dir, workers, (cores / workers).max(1))?;
    eprintln!("xtask: protodino submit {CONFIG} (world {workers}, global batch {global})");
    let job_id = service.submit(CONFIG, workers, global, args)?;
    eprintln!(
        "xtask: job {job_id}; follow it elsewhere with\n  grpcurl -plaintext -H \"authorization: Bearer $(cat {})\" -d '{{\"jobId\": \"{job_id}\"}}' {} protodino.v1.JobService/WatchJob",
        display_rel(&service.job_token).display(),
        service.grpc
    );
    let status = service
        .client("watch")
        .arg(&job_id)
        .status()
        .context("running protodino watch")?;
    eprintln!(
        "xtask: checkpoints, audit file and logs under {}",
        display_rel(&service.dir).display()
    );
    ensure!(status.success(), "the demo job did not succeed");
    service.stop();
    Ok(())
}

fn display_rel(p: &Path) -> PathBuf {
    p.strip_prefix(repo_root()).unwrap_or(p).to_path_buf()
}
