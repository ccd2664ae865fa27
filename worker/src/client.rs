//! The user side of the job API, beside grpcurl: `protodino submit | status | list | watch |
//! cancel | checkpoints`. Each reads the coordinator address and the job token from flags or the
//! environment (`PROTODINO_COORDINATOR`, `PROTODINO_JOB_TOKEN` / `PROTODINO_JOB_TOKEN_FILE`),
//! prints for people by default and one JSON object per line with `--json`. An `https://`
//! address speaks TLS, verified against `--tls-ca` (`PROTODINO_TLS_CA`); [`endpoint`] builds the
//! connection for these commands and for the worker agent alike.
//!
//! `submit` sends a whole TOML configuration (`configs/*.toml` format) as `spec.config_toml`,
//! layered by the coordinator over its preset (`--preset`, default `default`), so what a user
//! trains with `protodino train --config F` is what the service trains with `submit F`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use protodino_proto::v1::job_service_client::JobServiceClient;
use protodino_proto::v1::{
    CancelJobRequest, GetJobRequest, Job, JobSpec, JobState, ListJobsRequest, SubmitJobRequest,
    WatchJobRequest,
};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// TLS to the coordinator: used when its address is `https://`.
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM CA certificate(s) that sign the coordinator's certificate; needed for an `https://`
    /// coordinator address.
    #[arg(long, env = "PROTODINO_TLS_CA", help_heading = "TLS")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (workers, when the coordinator has
    /// --tls-client-ca); needs --tls-key.
    #[arg(
        long,
        env = "PROTODINO_TLS_CERT",
        requires = "tls_key",
        help_heading = "TLS"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "PROTODINO_TLS_KEY",
        requires = "tls_cert",
        help_heading = "TLS"
    )]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    fn any(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some()
    }
}

fn read_pem(path: &std::path::Path, flag: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag}: reading {}", path.display()))
}

/// The one place the `protodino` binary builds its connection to the coordinator: `url` is
/// `http://HOST:PORT` (plaintext) or `https://HOST:PORT` (TLS: the server's certificate checked
/// against `--tls-ca` and the host, and the client certificate presented when given). TLS flags
/// with an `http://` address are an error, so that nothing meant to be encrypted goes out in the
/// clear.
pub fn endpoint(url: &str, tls: &TlsArgs) -> Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("--coordinator {url:?} is not a URL"))?;
    let https = endpoint.uri().scheme_str() == Some("https");
    if !https {
        anyhow::ensure!(
            !tls.any(),
            "--tls-ca/--tls-cert/--tls-key are set but the coordinator address {url} is not \
             https:// (TLS needs an https:// address)"
        );
        return Ok(endpoint);
    }
    let Some(ca) = &tls.tls_ca else {
        bail!(
            "the coordinator address {url} uses TLS: give --tls-ca (PROTODINO_TLS_CA), the CA \
             certificate that signs the coordinator's certificate"
        );
    };
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(ca, "--tls-ca")?));
    if let (Some(cert), Some(key)) = (&tls.tls_cert, &tls.tls_key) {
        config = config.identity(Identity::from_pem(
            read_pem(cert, "--tls-cert")?,
            read_pem(key, "--tls-key")?,
        ));
    }
    endpoint
        .tls_config(config)
        .map_err(|e| anyhow::anyhow!("the TLS settings for {url}: {}", error_chain(&e)))
}

/// An error and its sources on one line (`transport error: …: invalid peer certificate: …`).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Where the coordinator is and how to authenticate.
#[derive(Args, Clone)]
pub struct Conn {
    /// The coordinator's gRPC address.
    #[arg(
        long,
        env = "PROTODINO_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// File holding the job API token.
    #[arg(long, env = "PROTODINO_JOB_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The job API token itself (prefer the file).
    #[arg(long, env = "PROTODINO_JOB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum ClientCmd {
    /// Submit a training job: a TOML configuration layered over a preset of the coordinator.
    Submit {
        /// The configuration (`configs/*.toml` format); its paths are relative to the
        /// coordinator's data and checkpoint roots.
        config: PathBuf,
        #[command(flatten)]
        conn: Conn,
        /// The coordinator's preset under the file (`default` = official DINO defaults).
        #[arg(long, default_value = "default")]
        preset: String,
        /// Smallest group the job runs with.
        #[arg(long)]
        min_world: Option<i32>,
        /// Largest group the job takes.
        #[arg(long)]
        max_world: Option<i32>,
        /// Samples per step over the whole group (default: batch per worker × max world).
        #[arg(long)]
        global_batch: Option<i32>,
        /// Stop after this many steps.
        #[arg(long)]
        max_steps: Option<i64>,
        /// A repeated key returns the first job instead of a second one.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// A job's state, progress and checkpoints.
    Status {
        job_id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Jobs, oldest first.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Follow a job to its end with a progress bar, then print its final report.
    Watch {
        job_id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a job; its workers go back to idle.
    Cancel {
        job_id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// The checkpoints a job has written (step, path below the checkpoint root, SHA-256).
    Checkpoints {
        job_id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Clone)]
struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = JobServiceClient<InterceptedService<Channel, Bearer>>;

impl Conn {
    fn token(&self) -> Result<String> {
        let t = match (&self.token_file, &self.token) {
            (Some(f), _) => std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim()
                .to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => bail!(
                "a job token is needed: --token-file, PROTODINO_JOB_TOKEN_FILE or PROTODINO_JOB_TOKEN"
            ),
        };
        Ok(t)
    }

    async fn client(&self) -> Result<Client> {
        let header: MetadataValue<_> = format!("Bearer {}", self.token()?)
            .parse()
            .context("the job token is not valid header text")?;
        let channel: Channel = endpoint(&self.coordinator, &self.tls)?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| {
                anyhow::anyhow!("connecting to {}: {}", self.coordinator, error_chain(&e))
            })?;
        Ok(JobServiceClient::with_interceptor(channel, Bearer(header)))
    }
}

/// A gRPC error as a one-line message with its code (`INVALID_ARGUMENT: invalid ...`).
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

pub fn run(cmd: ClientCmd) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run_async(cmd))
}

async fn run_async(cmd: ClientCmd) -> Result<()> {
    match cmd {
        ClientCmd::Submit {
            config,
            conn,
            preset,
            min_world,
            max_world,
            global_batch,
            max_steps,
            idempotency_key,
        } => {
            let toml = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let spec = JobSpec {
                preset,
                config_toml: toml,
                min_world_size: min_world,
                max_world_size: max_world,
                global_batch_size: global_batch,
                max_steps,
                idempotency_key: idempotency_key.unwrap_or_default(),
                ..Default::default()
            };
            let job = conn
                .client()
                .await?
                .submit_job(SubmitJobRequest { spec: Some(spec) })
                .await
                .map_err(status_error)?
                .into_inner()
                .job
                .context("the coordinator answered without a job")?;
            if conn.json {
                println!("{}", job_json(&job));
            } else {
                println!("{}", job.job_id);
            }
            Ok(())
        }
        ClientCmd::Status { job_id, conn } => {
            let job = get(&conn, &job_id).await?;
            if conn.json {
                println!("{}", job_json(&job));
            } else {
                print_status(&job);
            }
            Ok(())
        }
        ClientCmd::List { conn } => {
            let mut client = conn.client().await?;
            let mut token = String::new();
            loop {
                let page = client
                    .list_jobs(ListJobsRequest {
                        state: 0,
                        page_size: 100,
                        page_token: token.clone(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                for job in &page.jobs {
                    if conn.json {
                        println!("{}", job_json(job));
                    } else {
                        let p = job.progress.unwrap_or_default();
                        println!(
                            "{}  {:<10} step {}/{}  {}",
                            job.job_id,
                            state_name(job.state),
                            p.step,
                            p.total_steps,
                            job.message
                        );
                    }
                }
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                token = page.next_page_token;
            }
        }
        ClientCmd::Watch { job_id, conn } => watch(&conn, &job_id).await,
        ClientCmd::Cancel { job_id, conn } => {
            let job = conn
                .client()
                .await?
                .cancel_job(CancelJobRequest {
                    job_id,
                    reason: String::new(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if conn.json {
                println!("{}", job_json(&job));
            } else {
                println!("{} {}", job.job_id, state_name(job.state));
            }
            Ok(())
        }
        ClientCmd::Checkpoints { job_id, conn } => {
            let job = get(&conn, &job_id).await?;
            for c in &job.checkpoints {
                if conn.json {
                    println!(
                        "{}",
                        serde_json::json!({"step": c.step, "epoch": c.epoch, "uri": c.uri, "sha256": c.sha256})
                    );
                } else {
                    println!("{:>8}  {}  {}", c.step, c.sha256, c.uri);
                }
            }
            Ok(())
        }
    }
}

async fn get(conn: &Conn, job_id: &str) -> Result<Job> {
    conn.client()
        .await?
        .get_job(GetJobRequest {
            job_id: job_id.into(),
        })
        .await
        .map_err(status_error)
        .map(|r| r.into_inner())
}

/// `JOB_STATE_RUNNING` → `running`.
pub fn state_name(state: i32) -> String {
    JobState::try_from(state)
        .unwrap_or(JobState::Unspecified)
        .as_str_name()
        .trim_start_matches("JOB_STATE_")
        .to_ascii_lowercase()
}

fn is_final(state: i32) -> bool {
    [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
        .iter()
        .any(|s| *s as i32 == state)
}

/// A job as JSON: the fields people script against, the result parsed.
fn job_json(job: &Job) -> serde_json::Value {
    let p = job.progress.unwrap_or_default();
    serde_json::json!({
        "job_id": job.job_id,
        "state": state_name(job.state),
        "message": job.message,
        "workers": job.workers,
        "progress": {
            "step": p.step, "total_steps": p.total_steps, "epoch": p.epoch,
            "dino_loss": p.dino_loss, "koleo_proto": p.koleo_proto,
            "teacher_entropy": p.teacher_entropy, "unique_prototypes": p.unique_prototypes,
            "images_per_second": p.images_per_second, "committed_samples": p.committed_samples,
            "world_size": p.world_size, "membership_epoch": p.membership_epoch,
            "replica_mismatches": p.replica_mismatches,
        },
        "checkpoints": job.checkpoints.iter().map(|c| serde_json::json!({
            "step": c.step, "epoch": c.epoch, "uri": c.uri, "sha256": c.sha256,
        })).collect::<Vec<_>>(),
        "result": serde_json::from_str::<serde_json::Value>(&job.result).unwrap_or(serde_json::Value::Null),
    })
}

fn print_status(job: &Job) {
    let p = job.progress.unwrap_or_default();
    println!("{}  {}", job.job_id, state_name(job.state));
    println!("  {}", job.message);
    println!(
        "  step {}/{} (epoch {}), world {} (membership epoch {}), {} committed samples",
        p.step, p.total_steps, p.epoch, p.world_size, p.membership_epoch, p.committed_samples
    );
    println!(
        "  DINO loss {:.4}, KoLeo-proto {:.4}, unique prototypes {}, {:.1} img/s",
        p.dino_loss, p.koleo_proto, p.unique_prototypes, p.images_per_second
    );
    for c in &job.checkpoints {
        println!("  checkpoint step {}: {} ({})", c.step, c.uri, c.sha256);
    }
}

/// One progress line: step, epoch, losses, collapse figure, rate, world.
fn progress_message(job: &Job) -> String {
    let p = job.progress.unwrap_or_default();
    let unique = if p.unique_prototypes >= 0 {
        format!(" unique {}", p.unique_prototypes)
    } else {
        String::new()
    };
    format!(
        "{} epoch {} loss {:.4} koleo {:.4}{unique} {:.1} img/s world {}",
        state_name(job.state),
        p.epoch,
        p.dino_loss,
        p.koleo_proto,
        p.images_per_second,
        p.world_size
    )
}

async fn watch(conn: &Conn, job_id: &str) -> Result<()> {
    let mut stream = conn
        .client()
        .await?
        .watch_job(WatchJobRequest {
            job_id: job_id.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let bar = if conn.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut last: Option<Job> = None;
    let mut last_message = String::new();
    while let Some(event) = stream.message().await.map_err(status_error)? {
        let Some(job) = event.job else { continue };
        let p = job.progress.unwrap_or_default();
        if conn.json {
            println!("{}", job_json(&job));
        } else {
            if job.message != last_message {
                bar.println(format!("{}: {}", state_name(job.state), job.message));
                last_message = job.message.clone();
            }
            bar.set_length(p.total_steps.max(0) as u64);
            bar.set_position(p.step.max(0) as u64);
            bar.set_message(progress_message(&job));
        }
        let done = is_final(job.state);
        last = Some(job);
        if done {
            break;
        }
    }
    bar.finish_and_clear();
    // The stream ends with the final state; if it broke off, ask once more.
    let job = match last {
        Some(j) if is_final(j.state) => j,
        _ => get(conn, job_id).await?,
    };
    if !conn.json {
        println!(
            "job {}: {} ({})",
            job.job_id,
            state_name(job.state),
            job.message
        );
        if let Ok(report) = serde_json::from_str::<crate::train::FinalReport>(&job.result) {
            report.print();
        }
    }
    match JobState::try_from(job.state) {
        Ok(JobState::Succeeded) => Ok(()),
        _ => bail!(
            "job {} ended {}: {}",
            job.job_id,
            state_name(job.state),
            job.message
        ),
    }
}
