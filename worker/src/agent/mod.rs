//! `protodino worker`: the agent that serves a coordinator (docs/service.md). It binds its
//! collective listener and its `/metrics` listener itself (port 0 → a free port, so there is no
//! race between choosing a port and using it), prints
//! `protodino-worker listening collective ADDR metrics ADDR` as its first stdout line, registers
//! with the join token, and then heartbeats, takes assignments and trains them.
//!
//! The async side (tokio) only talks: registration, heartbeats, the ordered report queue,
//! reconnecting with backoff while the coordinator is away. Training runs on one OS thread per
//! job, never on the runtime; the two sides share a few atomics and mutexes (`job.rs`).
//!
//! Module map (start with `state.rs`, then `session.rs`):
//! - `state`     — [`state::Agent`]: identity, (re-)registration, heartbeat contents and answers;
//! - `heartbeat` — the heartbeat loop;
//! - `queue`     — the ordered report queue and what acknowledgements mean;
//! - `client`    — the `WorkerService` client: auth, deadlines, what a failed call means;
//! - `backoff`   — 100 ms → 5 s exponential backoff;
//! - `job`       — a job's thread and the state it shares with the agent (stop vote, watermark);
//! - `session`   — one session per assignment: group, state sync, step loop, outcome;
//! - `setup`     — a job's data (configuration, data set checked against the plan) and the
//!   assignment checks;
//! - `finish`    — rank 0's end of a finished job (final checkpoint, report, audit, result);
//! - `sink`      — the step sink of a session: reports, metrics, audit, checkpoints;
//! - `outcome`   — how a session ends (`Finished | Stopped | PeerLost | Failed`), from errors;
//! - `audit`     — `steps.jsonl`, one line per committed step;
//! - `metrics`   — `/metrics` (Prometheus text).

mod audit;
mod backoff;
mod client;
mod finish;
mod heartbeat;
mod job;
mod metrics;
mod outcome;
mod queue;
mod session;
mod setup;
mod sink;
mod state;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use protodino_collectives::{GroupOptions, bind_listener};
use protodino_proto::v1::Capabilities;

use self::metrics::Metrics;
use self::session::SessionContext;
use self::state::Agent;

/// The environment variable holding the join token when no file is given.
pub const JOIN_TOKEN_ENV: &str = "PROTODINO_JOIN_TOKEN";

/// The libtorch this binary is built against (torch-sys 0.24 requires it).
const LIBTORCH_VERSION: &str = "2.11.0";

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The coordinator's gRPC address (`http://HOST:PORT`, or `https://HOST:PORT` for TLS).
    #[arg(long, env = "PROTODINO_COORDINATOR")]
    pub coordinator: String,
    /// This worker's name in the coordinator (default: the hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// libtorch threads for training (default: the job's `train.threads`).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=4096))]
    pub threads: Option<i32>,
    /// Address of the Prometheus `/metrics` endpoint (port 0: a free port, printed).
    #[arg(long, default_value = "0.0.0.0:0")]
    pub metrics_listen: String,
    /// Address the collective listener binds (port 0: a free port, printed and registered).
    #[arg(long, default_value = "0.0.0.0:0")]
    pub collective_listen: String,
    /// Host the peers dial (default: the listen host, or this machine's hostname when that is
    /// unspecified).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// Root the jobs' dataset paths are relative to (default: the provisioned data root).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Root the jobs' checkpoint directories are relative to.
    #[arg(long, default_value = "runs")]
    pub checkpoint_root: PathBuf,
    /// File holding the join token (otherwise PROTODINO_JOIN_TOKEN).
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
    /// Progress deadline of every collective operation of a training step, in milliseconds: a
    /// peer that moves no byte for this long (stopped, cut off) fails the step on every member,
    /// which then report it and regroup. 10 s absorbs the skew between members entering a step.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub collective_timeout_ms: u64,
    /// How long a training session goes on while the coordinator is unreachable, in
    /// milliseconds: past it the session stops at its next step boundary and keeps its replica
    /// (the reports wait in their queue), so a coordinator that stays away for long does not
    /// find a group that trained far ahead of its ledger.
    #[arg(long, default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub coordinator_grace_ms: u64,
    /// TLS to an `https://` coordinator (with a client certificate for mutual TLS).
    #[command(flatten)]
    pub tls: crate::client::TlsArgs,
    /// Logs as JSON lines on stderr, one object per line; a session's lines carry `job_id`,
    /// `worker`, `rank` and `membership_epoch` in `span` (docs/service.md, "Logs"). The
    /// variable takes true/false, 1/0, yes/no or on/off.
    #[arg(
        long,
        env = "PROTODINO_LOG_JSON",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub log_json: bool,
}

fn init_tracing(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        // The event's fields at the top level, the innermost span's (the session's) in `span`.
        fmt.json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        fmt.init();
    }
}

fn join_token(args: &AgentArgs) -> Result<String> {
    let token = match &args.join_token_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the join token from {}", f.display()))?,
        None => std::env::var(JOIN_TOKEN_ENV).with_context(|| {
            format!("a join token is required: --join-token-file or {JOIN_TOKEN_ENV}")
        })?,
    };
    let token = token.trim().to_string();
    anyhow::ensure!(!token.is_empty(), "the join token is empty");
    Ok(token)
}

/// This machine's hostname.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: a valid buffer of the given length; gethostname NUL-terminates on success
    // (truncation aside, handled by stopping at the buffer's end).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `host:port` the peers dial: the advertised host, else the bound one unless unspecified,
/// else the hostname (IPv6 literals bracketed).
fn advertised_address(advertise: Option<&str>, bound: SocketAddr) -> String {
    let host = match advertise {
        Some(h) => h.to_string(),
        None if bound.ip().is_unspecified() => hostname(),
        None => bound.ip().to_string(),
    };
    // Only IPv6 literals contain ':' (host names never do).
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", bound.port())
    } else {
        format!("{host}:{}", bound.port())
    }
}

/// Runs the agent until it is told to stop (SIGINT/SIGTERM) or the coordinator refuses it.
pub fn run(args: AgentArgs) -> Result<()> {
    init_tracing(args.log_json);
    let token = join_token(&args)?;
    let listener = bind_listener(&args.collective_listen, &GroupOptions::default())
        .with_context(|| format!("binding the collective listener {}", args.collective_listen))?;
    let collective = listener.local_addr()?;
    let metrics_listener = std::net::TcpListener::bind(&args.metrics_listen)
        .with_context(|| format!("binding the metrics listener {}", args.metrics_listen))?;
    let metrics_addr = metrics_listener.local_addr()?;
    let mut out = std::io::stdout();
    writeln!(
        out,
        "protodino-worker listening collective {collective} metrics {metrics_addr}"
    )?;
    out.flush()?;

    let advertised = advertised_address(args.advertise_host.as_deref(), collective);
    let host = hostname();
    let capabilities = Capabilities {
        hostname: host.clone(),
        cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get() as i32),
        cuda_devices: tch::Cuda::device_count() as i32,
        libtorch_version: LIBTORCH_VERSION.into(),
        collective_address: advertised.clone(),
    };
    let name = args.name.clone().unwrap_or(host);
    tracing::info!(
        "worker {name}: collective {collective} (advertised {advertised}), metrics {metrics_addr}, coordinator {}",
        args.coordinator
    );
    let (reports, queue) = queue::report_queue();
    let metrics = Arc::new(Metrics::new());
    let ctx = SessionContext {
        reports,
        metrics: metrics.clone(),
        listener: Arc::new(listener),
        data_root: args
            .data_root
            .clone()
            .unwrap_or_else(protodino_config::data_root),
        checkpoint_root: args.checkpoint_root.clone(),
        threads: args.threads,
        collective_timeout: std::time::Duration::from_millis(args.collective_timeout_ms),
        wake: Arc::new(tokio::sync::Notify::new()),
        perturb_at: sink::perturb_step(),
    };
    if let Some(n) = ctx.perturb_at {
        tracing::warn!(
            "{}={n}: this worker will perturb its replica (a test hook)",
            sink::PERTURB_ENV
        );
    }
    let grace = std::time::Duration::from_millis(args.coordinator_grace_ms);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = client::connect(&args.coordinator, &token, &args.tls)?;
        let agent = Arc::new(Agent::new(client, name, capabilities, ctx));
        metrics_listener.set_nonblocking(true)?;
        let metrics_listener = tokio::net::TcpListener::from_std(metrics_listener)?;
        let metrics_server =
            tokio::spawn(
                async move { axum::serve(metrics_listener, metrics::router(metrics)).await },
            );
        agent.register(None).await?;
        tokio::select! {
            r = queue.run(agent.clone()) => r,
            r = heartbeat::run(agent.clone(), grace) => r,
            r = metrics_server => Err(anyhow::anyhow!("the metrics server stopped: {r:?}")),
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
                Ok(())
            }
        }
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address_follows_the_bound_host() {
        let bound: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        assert_eq!(advertised_address(None, bound), "127.0.0.1:7001");
        assert_eq!(
            advertised_address(Some("worker-0.pool"), bound),
            "worker-0.pool:7001"
        );
        let any: SocketAddr = "0.0.0.0:7001".parse().unwrap();
        assert_eq!(
            advertised_address(None, any),
            format!("{}:7001", hostname())
        );
        let v6: SocketAddr = "[::1]:7001".parse().unwrap();
        assert_eq!(advertised_address(None, v6), "[::1]:7001");
        assert_eq!(advertised_address(Some("fe80::1"), bound), "[fe80::1]:7001");
    }
}
