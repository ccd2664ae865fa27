//! One tonic server: `JobService` behind the bearer-token interceptor, `grpc.health.v1.Health`,
//! and server reflection v1 and v1alpha (grpcurl 1.8 speaks only v1alpha).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use protodino_proto::v1::job_service_server::JobServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::auth::BearerAuth;
use crate::jobs::Jobs;
use crate::store::Store;

pub struct ServerConfig {
    pub store_path: PathBuf,
    pub configs_dir: PathBuf,
    pub job_token: String,
    pub max_workers: i32,
}

/// Serve gRPC on `listener` and `/metrics` on `metrics_listener` until `shutdown` resolves.
pub async fn serve(
    cfg: ServerConfig,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let store = Arc::new(Store::open(&cfg.store_path)?);
    let metrics = crate::metrics::router(store.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, metrics).await {
            tracing::error!("metrics endpoint stopped: {e}");
        }
    });
    let jobs = Jobs::new(store, cfg.configs_dir, cfg.max_workers);
    let auth = BearerAuth::new(&cfg.job_token);
    let job_service = JobServiceServer::with_interceptor(jobs, move |req| auth.check(req));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<Jobs>>().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(protodino_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(protodino_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(job_service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
