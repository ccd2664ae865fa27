//! `protodino-loadgen`: the coordinator under the load of a large fleet (`cargo xtask loadgen`
//! starts the release coordinator as a real process — port 0, fresh tokens, a fresh redb store
//! under `--out` — and then this binary, with its address, pid and tokens).
//!
//! This process drives the coordinator over the real gRPC API:
//! - `--workers` simulated workers (`sim.rs`), tokio tasks multiplexed over `--channels` HTTP/2
//!   connections, `Register` (spread over `--ramp-s`), then `Heartbeat` every interval the
//!   coordinator hands out (1 s), at evenly spread phases. They act as the agent does on each
//!   answer: an assignment starts a session (`TRAINING` heartbeats; with `--step-ms N`, also a
//!   `ReportStep` every N ms with the plan's real sample digest, so groups commit steps and
//!   jobs go `RUNNING` — off by default: the requirement's load is registration, heartbeats
//!   and job churn); `stop` or `ABORTED` ends it (an at-once `IDLE` heartbeat describing the
//!   replica, as the agent's wake-up does); `stop` while idle drops the replica.
//! - a job driver (`jobs.rs`): keeps up to `--max-active` small jobs (the cpu-demo preset,
//!   world `--world`) in flight, submitted at most `--submit-per-s` a second with an
//!   idempotency key, polled with `GetJob`, held `--job-lifetime-s` (±50 %) once their group
//!   formed, then cancelled; one in ten is cancelled while still queued. At the end every job
//!   left is cancelled and `ListJobs` must show each submitted job `CANCELLED` (none lost), and
//!   `/metrics` must count every simulated worker idle again.
//!
//! Measured: the client-side latency of every call (exact percentiles, `stats.rs`), failed
//! calls by status code, and the coordinator's RSS (`/proc/PID/status`) every 2 s: start (after
//! warm-up: 10 % of the run, 10–60 s), end, max, least-squares slope, and KiB per job
//! submitted. The run fails when an RPC's p99 during the load reaches 50 ms, a job is lost or
//! in the wrong state, a call fails unexpectedly (`Rpc::expects` lists the protocol's own
//! codes), a simulated worker is not idle at the end, or RSS grows more than 20 % after
//! warm-up. The drain (the jobs still in flight all cancelled at once, the final check) is
//! reported apart and not judged. Reports: `loadgen.md` (also printed) and `loadgen.json` in
//! `--out` (default `<cache>/loadgen/latest`).

mod jobs;
mod probe;
mod report;
mod sim;
mod stats;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use stats::{Limits, MemSample, Rpc};

/// Deadline of one call; a call that takes longer counts as `DeadlineExceeded`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the coordinator's memory is sampled.
const MEM_EVERY: Duration = Duration::from_secs(2);

#[derive(clap::Parser, Debug, Clone)]
#[command(
    version,
    about = "Simulated workers and a job driver against a running coordinator"
)]
pub struct LoadgenArgs {
    /// The coordinator's gRPC address (`HOST:PORT`).
    #[arg(long)]
    pub grpc: String,
    /// The coordinator's metrics address (`HOST:PORT`).
    #[arg(long)]
    pub metrics: String,
    /// The coordinator's process id (its memory and CPU are sampled from /proc).
    #[arg(long)]
    pub pid: u32,
    /// The files holding the job and join tokens.
    #[arg(long)]
    pub job_token_file: PathBuf,
    #[arg(long)]
    pub join_token_file: PathBuf,
    /// The coordinator's directory (store and log sizes are reported).
    #[arg(long)]
    pub service_dir: PathBuf,
    /// Simulated workers.
    #[arg(long, default_value_t = 1000)]
    pub workers: usize,
    /// Length of the load (the soak), from the first registration.
    #[arg(long, default_value_t = 600)]
    pub duration_s: u64,
    /// Output directory of loadgen.md and loadgen.json.
    #[arg(long)]
    pub out: PathBuf,
    /// HTTP/2 connections the simulated workers share.
    #[arg(long, default_value_t = 16)]
    pub channels: usize,
    /// Registrations are spread over this many seconds.
    #[arg(long, default_value_t = 5)]
    pub ramp_s: u64,
    /// World size of every job (min = max).
    #[arg(long, default_value_t = 4)]
    pub world: i32,
    /// Jobs in flight at most [default: 90 % of the workers in groups of --world; 0: no jobs,
    /// heartbeats only].
    #[arg(long)]
    pub max_active: Option<usize>,
    /// Submissions per second at most.
    #[arg(long, default_value_t = 10.0)]
    pub submit_per_s: f64,
    /// Mean time a job is left running once its group formed (uniform over ±50 %).
    #[arg(long, default_value_t = 30.0)]
    pub job_lifetime_s: f64,
    /// Each training member reports a step this often (0: no step reports; jobs then stay in
    /// RENDEZVOUS until cancelled).
    #[arg(long, default_value_t = 0)]
    pub step_ms: u64,
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Result<Self> {
        Ok(Bearer(
            format!("Bearer {token}")
                .parse()
                .context("a token is not valid header text")?,
        ))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// `n` HTTP/2 connections to `url`, each dialled now.
async fn channels(url: &str, n: usize) -> Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let ch = Endpoint::from_shared(url.to_string())?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        out.push(ch);
    }
    Ok(out)
}

#[derive(Default)]
struct Recorded {
    /// Per RPC: (milliseconds since the start, latency in µs) of every call that returned.
    samples: BTreeMap<Rpc, Vec<(u32, u32)>>,
    /// Failed calls by (RPC, status code name), expected or not.
    errors: BTreeMap<(Rpc, String), u64>,
    /// The first message of each (RPC, status code name).
    messages: BTreeMap<(Rpc, String), String>,
}

/// Every call's latency and outcome, from all tasks.
pub struct Recorder {
    start: Instant,
    inner: Mutex<Recorded>,
    /// Jobs submitted so far (for the memory-per-job figure).
    pub jobs_submitted: AtomicU64,
}

impl Recorder {
    fn new(start: Instant) -> Self {
        Recorder {
            start,
            inner: Mutex::new(Recorded::default()),
            jobs_submitted: AtomicU64::new(0),
        }
    }

    pub fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Times `call` (at most [`CALL_TIMEOUT`]) and records its latency and, if it failed, its
    /// status code.
    pub async fn call<T>(
        &self,
        rpc: Rpc,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let t0 = Instant::now();
        let res = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {CALL_TIMEOUT:?}"
            ))),
        };
        let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        let at = t0.duration_since(self.start).as_millis() as u32;
        let mut inner = self.inner.lock().unwrap();
        inner.samples.entry(rpc).or_default().push((at, us));
        if let Err(s) = &res {
            let key = (rpc, format!("{:?}", s.code()));
            *inner.errors.entry(key.clone()).or_default() += 1;
            inner
                .messages
                .entry(key)
                .or_insert_with(|| s.message().chars().take(300).collect());
        }
        res
    }

    fn take(&self) -> Recorded {
        std::mem::take(&mut *self.inner.lock().unwrap())
    }
}

fn read_token(path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

fn main() -> Result<()> {
    let args = <LoadgenArgs as clap::Parser>::parse();
    ensure!(args.workers >= 1, "--workers must be at least 1");
    ensure!(args.world >= 1, "--world must be at least 1");
    ensure!(args.duration_s >= 10, "--duration-s must be at least 10");
    ensure!(args.submit_per_s > 0.0, "--submit-per-s must be positive");
    let (grpc, metrics_addr, pid) = (args.grpc.clone(), args.metrics.clone(), args.pid);
    let (dir, out) = (args.service_dir.clone(), args.out.clone());
    let log = dir.join("coordinator.log");
    eprintln!(
        "loadgen: coordinator pid {pid} on {grpc} (metrics {metrics_addr}); {} workers for {} s",
        args.workers, args.duration_s
    );
    let context = report::Context {
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        loadavg_before: probe::loadavg(),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tokens = (
        read_token(&args.job_token_file)?,
        read_token(&args.join_token_file)?,
    );
    let result = rt.block_on(drive(
        &args,
        &format!("http://{grpc}"),
        &metrics_addr,
        pid,
        tokens,
        context,
    ));
    drop(rt);
    let mut result = result?;
    result.context.store_mib = std::fs::metadata(dir.join("coordinator.redb"))
        .map(|m| m.len() as f64 / (1 << 20) as f64)
        .unwrap_or(0.0);
    result.context.log_mib = std::fs::metadata(&log)
        .map(|m| m.len() as f64 / (1 << 20) as f64)
        .unwrap_or(0.0);
    let why = stats::verdict(&result.outcome, &Limits::default());
    let md = report::markdown(&args, &result, &why);
    println!("\n{md}");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("loadgen.md"), &md)?;
    std::fs::write(
        out.join("loadgen.json"),
        serde_json::to_string_pretty(&report::json(&args, &result, &why))?,
    )?;
    eprintln!("loadgen: wrote {}", out.join("loadgen.md").display());
    ensure!(why.is_empty(), "the load test failed: {}", why.join("; "));
    Ok(())
}

/// The load itself: workers, the job driver and the memory sampler, then the checks.
async fn drive(
    args: &LoadgenArgs,
    url: &str,
    metrics_addr: &str,
    pid: u32,
    (job_token, join_token): (String, String),
    mut context: report::Context,
) -> Result<report::Run> {
    let start = Instant::now();
    let rec = Arc::new(Recorder::new(start));
    let load_for = Duration::from_secs(args.duration_s);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Memory and CPU of the coordinator, until the workers stop.
    let sampler = {
        let rec = rec.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let mut every = tokio::time::interval(MEM_EVERY);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.changed() => break,
                }
                if let Some(rss_kib) = probe::rss_kib(pid) {
                    out.push(MemSample {
                        t_s: rec.elapsed_s(),
                        rss_kib,
                        jobs: rec.jobs_submitted.load(Ordering::Relaxed),
                        cpu_s: probe::cpu_s(pid).unwrap_or(0.0),
                    });
                }
            }
            out
        })
    };
    let cpu_before = probe::cpu_s(pid).unwrap_or(0.0);
    let own_before = probe::cpu_s(std::process::id()).unwrap_or(0.0);

    let worker_channels = channels(url, args.channels).await?;
    let fleet = sim::Fleet::start(
        sim::FleetConfig {
            workers: args.workers,
            ramp: Duration::from_secs(args.ramp_s),
            step_every: (args.step_ms > 0).then(|| Duration::from_millis(args.step_ms)),
        },
        &worker_channels,
        Bearer::new(&join_token)?,
        rec.clone(),
        stop_rx.clone(),
    );

    let job_channels = channels(url, 2).await?;
    let auth = Bearer::new(&job_token)?;
    let max_active = args
        .max_active
        .unwrap_or(args.workers * 9 / 10 / args.world.max(1) as usize);
    let driver = jobs::Driver {
        channels: job_channels,
        auth,
        rec: rec.clone(),
        world: args.world,
        max_active,
        submit_every: Duration::from_secs_f64(1.0 / args.submit_per_s),
        lifetime: Duration::from_secs_f64(args.job_lifetime_s),
        run_tag: format!("{:x}", start.elapsed().as_nanos() ^ u128::from(pid)),
    };
    let jobs = driver
        .run(tokio::time::Instant::from_std(start + load_for))
        .await?;
    let run_s = rec.elapsed_s();
    let load_end_ms = (args.duration_s * 1000) as u32;
    let cpu_load = probe::cpu_s(pid).unwrap_or(0.0) - cpu_before;
    context.loadgen_cpu_s = probe::cpu_s(std::process::id()).unwrap_or(0.0) - own_before;
    context.loadavg_after = probe::loadavg();

    // Everything is cancelled: give the workers two heartbeats to hear it, then count them.
    let settle_until = Instant::now() + Duration::from_secs(30);
    let mut idle = None;
    let mut active_jobs = None;
    while Instant::now() < settle_until {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let addr = metrics_addr.to_string();
        let text =
            tokio::task::spawn_blocking(move || probe::http_get(&addr, "/metrics")).await??;
        idle = probe::metric(&text, "protodino_workers{state=\"idle\"}").map(|v| v as i64);
        active_jobs = Some(
            ["queued", "rendezvous", "running", "recovering"]
                .iter()
                .filter_map(|s| probe::metric(&text, &format!("protodino_jobs{{state=\"{s}\"}}")))
                .sum::<f64>() as i64,
        );
        if idle == Some(args.workers as i64) && active_jobs == Some(0) {
            break;
        }
    }
    let _ = stop_tx.send(true);
    let fleet = fleet.join().await;
    let mem = sampler.await?;

    let recorded = rec.take();
    let warmup_s = (args.duration_s as f64 * 0.1).clamp(10.0, 60.0);
    let in_load: Vec<MemSample> = mem
        .iter()
        .copied()
        .filter(|s| s.t_s <= args.duration_s as f64)
        .collect();
    let outcome = report::outcome(
        &recorded.samples,
        &recorded.errors,
        &jobs,
        stats::mem_trend(&in_load, warmup_s),
        idle.map(|n| args.workers as i64 - n),
        load_end_ms,
    );
    context.coordinator_cpu_s = cpu_load;
    context.run_s = run_s;
    context.active_jobs_after = active_jobs;
    let windows = report::windows(
        &recorded.samples,
        &mem,
        (args.duration_s / 12).max(10) as u32,
    );
    Ok(report::Run {
        context,
        outcome,
        jobs,
        fleet,
        mem,
        warmup_s,
        errors: recorded.errors,
        messages: recorded.messages,
        windows,
        max_active,
        drain: report::summaries(&recorded.samples, load_end_ms, u32::MAX),
    })
}
