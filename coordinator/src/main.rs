//! `protodino-coordinator`: parse flags, open the store, serve until SIGINT/SIGTERM.

use std::io::Write;
use std::path::PathBuf;

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
    /// File holding the job API bearer token.
    #[arg(long, env = "PROTODINO_JOB_TOKEN_FILE")]
    job_token_file: Option<PathBuf>,
    /// The job API bearer token itself (prefer the file).
    #[arg(long, env = "PROTODINO_JOB_TOKEN", hide_env_values = true)]
    job_token: Option<String>,
    /// Upper bound of a job's world size.
    #[arg(long, env = "PROTODINO_MAX_WORKERS", default_value_t = 64)]
    max_workers: i32,
    /// Logs as JSON lines.
    #[arg(long, env = "PROTODINO_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let job_token = match (&args.job_token_file, &args.job_token) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .to_string(),
        (None, Some(t)) => t.clone(),
        (None, None) => {
            anyhow::bail!("a job token is required: --job-token-file or PROTODINO_JOB_TOKEN")
        }
    };
    anyhow::ensure!(!job_token.is_empty(), "the job token must not be empty");
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
        job_token,
        max_workers: args.max_workers,
    };
    serve(cfg, listener, metrics, shutdown_signal()).await
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
