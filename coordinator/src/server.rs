//! Wiring: the store, the scheduler and its tick loop, `JobService` behind the job token,
//! `WorkerService` behind the join token, `grpc.health.v1.Health`, server reflection v1 and
//! v1alpha (grpcurl 1.8 speaks only v1alpha) on one listener (optionally TLS, see `tls.rs`), and
//! `/metrics` on another. One shutdown for all: the caller's signal, or a failed store write (the
//! process must restart from the store, see `scheduler.rs`).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protodino_proto::v1::job_service_server::JobServiceServer;
use protodino_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;

use crate::api::jobs::JobsApi;
use crate::api::workers::WorkersApi;
use crate::auth::BearerAuth;
use crate::core::CoreConfig;
use crate::scheduler::Scheduler;
use crate::store::Store;
use crate::tls::ServerTls;

pub struct ServerConfig {
    pub store_path: PathBuf,
    pub configs_dir: PathBuf,
    /// Specs name data sets relative to this.
    pub data_root: PathBuf,
    /// Checkpoint paths in the catalogue are relative to this; the coordinator itself never
    /// opens a file below it (workers write there, on their own mounts).
    pub checkpoint_root: PathBuf,
    pub job_token: String,
    pub join_token: String,
    pub max_workers: i32,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub hash_every_steps: i64,
    pub join_cooldown: Duration,
    pub stop_grace: Duration,
    /// TLS on the gRPC listener (`None`: plaintext).
    pub tls: Option<ServerTls>,
}

/// Serve gRPC on `listener` and `/metrics` on `metrics_listener` until `shutdown` resolves
/// (then `Ok`) or the store fails (then `Err`).
pub async fn serve(
    cfg: ServerConfig,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg.job_token != cfg.join_token,
        "the job token and the join token must differ"
    );
    let path = cfg.store_path.clone();
    let store = Arc::new(tokio::task::spawn_blocking(move || Store::open(&path)).await??);
    let scheduler = Scheduler::open(
        store,
        CoreConfig {
            heartbeat_timeout: cfg.heartbeat_timeout,
            hash_every_steps: cfg.hash_every_steps,
            join_cooldown: cfg.join_cooldown,
            stop_grace: cfg.stop_grace,
        },
    )
    .await?;
    tracing::info!(
        data_root = %cfg.data_root.display(),
        checkpoint_root = %cfg.checkpoint_root.display(),
        "coordinator ready"
    );
    tokio::spawn(scheduler.clone().run_ticks());

    let metrics = crate::metrics::router(scheduler.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, metrics).await {
            tracing::error!("metrics endpoint stopped: {e}");
        }
    });

    let jobs = JobsApi::new(
        scheduler.clone(),
        cfg.configs_dir,
        cfg.data_root,
        cfg.max_workers,
    );
    let job_auth = BearerAuth::new(&cfg.job_token, "job token");
    let counts = scheduler.clone();
    let job_service = JobServiceServer::with_interceptor(jobs, move |req| {
        let refused = |_: &_| counts.api_counts().unauthenticated("job");
        job_auth.check(req).inspect_err(refused)
    });
    let workers = WorkersApi::new(
        scheduler.clone(),
        cfg.heartbeat_interval,
        cfg.heartbeat_timeout,
    );
    let join_auth = BearerAuth::new(&cfg.join_token, "join token");
    let mutual_tls = cfg.tls.as_ref().is_some_and(|t| t.mutual);
    let counts = scheduler.clone();
    let worker_service = WorkerServiceServer::with_interceptor(workers, move |req| {
        let refused = |_: &_| counts.api_counts().unauthenticated("worker");
        if mutual_tls {
            crate::auth::require_client_cert(&req).inspect_err(refused)?;
        }
        join_auth.check(req).inspect_err(refused)
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<JobsApi>>().await;
    health
        .set_serving::<WorkerServiceServer<WorkersApi>>()
        .await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(protodino_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(protodino_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let mut failure = scheduler.failure();
    let store_failed = async move {
        loop {
            if let Some(why) = failure.borrow_and_update().clone() {
                return why;
            }
            if failure.changed().await.is_err() {
                // The scheduler is gone: nothing can fail any more.
                std::future::pending::<()>().await;
            }
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Option<String>>();
    let stop = async move {
        let why = tokio::select! {
            _ = shutdown => None,
            why = store_failed => Some(why),
        };
        let _ = stop_tx.send(why);
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &cfg.tls {
        builder = builder.tls_config(tls.config.clone())?;
        tracing::info!(
            mutual = tls.mutual,
            "TLS on the gRPC listener{}",
            if tls.mutual {
                "; the worker API needs a client certificate"
            } else {
                ""
            }
        );
    }
    builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(job_service)
        .add_service(worker_service)
        // TCP_NODELAY: without it a response of a few KB (a job with its resolved config)
        // waits ~40 ms for the client's delayed ACK (Nagle).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop,
        )
        .await?;
    match stop_rx.await {
        Ok(Some(why)) => anyhow::bail!("stopped after a failed store write: {why}"),
        _ => Ok(()),
    }
}
