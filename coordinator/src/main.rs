//! `protodino-coordinator`: parse flags, bind, serve until SIGINT/SIGTERM (or a failed store
//! write, which exits non-zero so that a supervisor restarts it from the store).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use protodino_coordinator::server::{ServerConfig, serve};

#[derive(Parser)]
#[command(
    name = "protodino-coordinator",
    version,
    about = "protodino coordinator (gRPC)"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "PROTODINO_LISTEN", default_value = "0.0.0.0:50051")]
    listen: String,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "PROTODINO_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: String,
    /// The embedded job store.
    #[arg(
        long,
        env = "PROTODINO_STORE",
        default_value = "protodino-coordinator.redb"
    )]
    store: PathBuf,
    /// Directory of job presets (`<name>.toml`).
    #[arg(long, env = "PROTODINO_CONFIGS_DIR", default_value = "configs")]
    configs_dir: PathBuf,
    /// File holding the job API bearer token (users: JobService).
    #[arg(long, env = "PROTODINO_JOB_TOKEN_FILE")]
    job_token_file: Option<PathBuf>,
    /// The job API bearer token itself (prefer the file).
    #[arg(long, env = "PROTODINO_JOB_TOKEN", hide_env_values = true)]
    job_token: Option<String>,
    /// File holding the join token (workers: WorkerService); must differ from the job token.
    #[arg(long, env = "PROTODINO_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// The join token itself (prefer the file).
    #[arg(long, env = "PROTODINO_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Root that specs' `dataset` paths are relative to [default: the provisioned data root].
    #[arg(long, env = "PROTODINO_DATA_ROOT")]
    data_root: Option<PathBuf>,
    /// Root that specs' `checkpoint_dir` and catalogued checkpoints are relative to.
    #[arg(long, env = "PROTODINO_CHECKPOINT_ROOT", default_value = "runs")]
    checkpoint_root: PathBuf,
    /// Upper bound of a job's world size.
    #[arg(long, env = "PROTODINO_MAX_WORKERS", default_value_t = 64)]
    max_workers: i32,
    /// How often workers heartbeat.
    #[arg(long, env = "PROTODINO_HEARTBEAT_INTERVAL_MS", default_value_t = 1000)]
    heartbeat_interval_ms: u64,
    /// A worker silent this long is lost and leaves its group.
    #[arg(long, env = "PROTODINO_HEARTBEAT_TIMEOUT_MS", default_value_t = 10000)]
    heartbeat_timeout_ms: u64,
    /// Members report a replica hash every this many steps (0: never).
    #[arg(long, env = "PROTODINO_HASH_EVERY_STEPS", default_value_t = 10)]
    hash_every_steps: i64,
    /// Idle workers join running groups below their max_world_size, but not within this long of
    /// the job's last failure.
    #[arg(long, env = "PROTODINO_JOIN_COOLDOWN_MS", default_value_t = 30000)]
    join_cooldown_ms: u64,
    /// A member of a group that is stopping (its peers reported it broken) that stays silent
    /// this long is lost, without waiting for the heartbeat timeout.
    #[arg(long, env = "PROTODINO_STOP_GRACE_MS", default_value_t = 2000)]
    stop_grace_ms: u64,
    /// PEM certificate (chain) of the gRPC listener: serve TLS (needs --tls-key). Without it the
    /// listener is plaintext.
    #[arg(long, env = "PROTODINO_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PROTODINO_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that sign workers' client certificates: mutual TLS for the worker
    /// API (WorkerService calls without such a certificate are UNAUTHENTICATED; the job API, health
    /// and reflection need none). Needs --tls-cert.
    #[arg(long, env = "PROTODINO_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Logs as JSON lines on stderr, one object per line; lines about a job or a worker carry
    /// `job_id` or `worker` (docs/service.md, "Logs"). The variable takes true/false, 1/0,
    /// yes/no or on/off.
    #[arg(
        long,
        env = "PROTODINO_LOG_JSON",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    log_json: bool,
}

/// A token from its file (trimmed) or its value; `what` names the flags in the error.
fn token(file: Option<&Path>, value: Option<&str>, what: &str, flag: &str) -> Result<String> {
    let t = match (file, value) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => anyhow::bail!("a {what} is required: --{flag}-file or --{flag}"),
    };
    anyhow::ensure!(!t.is_empty(), "the {what} must not be empty");
    Ok(t)
}

/// At most this many glibc malloc arenas. By default glibc gives each new thread an arena, up
/// to 8 per core, and tokio's blocking pool (store writes, spec validation) keeps starting
/// threads: the freed memory scattered over many arenas made the resident size climb for
/// minutes under a steady load (1000-worker loadgen soaks: +76 % over 10 minutes with the
/// default, +18 % over 5 minutes with two arenas). Set before any thread starts;
/// `MALLOC_ARENA_MAX` in the environment wins.
#[cfg(target_env = "gnu")]
const MALLOC_ARENAS: libc::c_int = 2;

fn main() -> Result<()> {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists; mallopt only
        // changes an allocator tunable.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run())
}

async fn run() -> Result<()> {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .json()
            // The same shape as the worker agent's: the event's fields at the top level.
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let job_token = token(
        args.job_token_file.as_deref(),
        args.job_token.as_deref(),
        "job token",
        "job-token",
    )?;
    let join_token = token(
        args.join_token_file.as_deref(),
        args.join_token.as_deref(),
        "join token",
        "join-token",
    )?;
    anyhow::ensure!(
        job_token != join_token,
        "the join token must differ from the job token (workers and users hold different secrets)"
    );
    anyhow::ensure!(
        args.heartbeat_interval_ms > 0 && args.heartbeat_timeout_ms > args.heartbeat_interval_ms,
        "--heartbeat-timeout-ms ({}) must exceed --heartbeat-interval-ms ({}) > 0",
        args.heartbeat_timeout_ms,
        args.heartbeat_interval_ms
    );
    anyhow::ensure!(
        args.stop_grace_ms > args.heartbeat_interval_ms,
        "--stop-grace-ms ({}) must exceed --heartbeat-interval-ms ({}): live members would be \
         taken for lost",
        args.stop_grace_ms,
        args.heartbeat_interval_ms
    );
    anyhow::ensure!(
        args.hash_every_steps >= 0,
        "--hash-every-steps must not be negative"
    );
    let tls = protodino_coordinator::tls::load(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.tls_client_ca.as_deref(),
    )?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let metrics = tokio::net::TcpListener::bind(&args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    println!(
        "protodino-coordinator listening on {} metrics {}",
        listener.local_addr()?,
        metrics.local_addr()?
    );
    std::io::stdout().flush()?;
    let cfg = ServerConfig {
        store_path: args.store,
        configs_dir: args.configs_dir,
        data_root: args.data_root.unwrap_or_else(protodino_config::data_root),
        checkpoint_root: args.checkpoint_root,
        job_token,
        join_token,
        max_workers: args.max_workers,
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
        heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
        hash_every_steps: args.hash_every_steps,
        join_cooldown: Duration::from_millis(args.join_cooldown_ms),
        stop_grace: Duration::from_millis(args.stop_grace_ms),
        tls,
    };
    serve(cfg, listener, metrics, shutdown_signal()).await
}

async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!("no SIGTERM handler ({e}); stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}
