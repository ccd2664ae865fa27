//! The job API end to end: the real coordinator binary on an ephemeral loopback port, a real
//! gRPC client, a real store file, and a restart in the middle.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use protodino_proto::v1::job_service_client::JobServiceClient;
use protodino_proto::v1::{
    CancelJobRequest, GetJobRequest, JobSpec, JobState, ListJobsRequest, OptimSpec,
    SubmitJobRequest, WatchJobRequest,
};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

const TOKEN: &str = "test-job-token";

struct Coordinator {
    child: Child,
    addr: String,
    metrics_addr: String,
}

impl Coordinator {
    fn start(store: &Path) -> Self {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut child = Command::new(env!("CARGO_BIN_EXE_protodino-coordinator"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--max-workers",
                "8",
            ])
            .arg("--store")
            .arg(store)
            .arg("--configs-dir")
            .arg(configs)
            .env("PROTODINO_JOB_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the coordinator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "protodino-coordinator listening on ADDR metrics ADDR"
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.len(), 6, "unexpected first line {line:?}");
        let (addr, metrics_addr) = (words[3].to_string(), words[5].to_string());
        assert!(
            addr.starts_with("127.0.0.1:"),
            "unexpected first line {line:?}"
        );
        Coordinator {
            child,
            addr,
            metrics_addr,
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(
        &self,
    ) -> JobServiceClient<
        tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor>,
    > {
        let token: MetadataValue<_> = format!("Bearer {TOKEN}").parse().unwrap();
        JobServiceClient::with_interceptor(
            self.channel().await,
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", token.clone());
                Ok(req)
            },
        )
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn demo_spec() -> JobSpec {
    JobSpec {
        preset: "cpu-demo".into(),
        koleo_weight: 0.1,
        epochs: 2,
        ..Default::default()
    }
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("s.redb"));
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel().await);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        resp.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "protodino.v1.JobService".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        resp.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(c.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("{msg:?}")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"protodino.v1.JobService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

#[tokio::test]
async fn submit_get_list_cancel_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("s.redb"));
    let mut jobs = c.client().await;

    let job = jobs
        .submit_job(SubmitJobRequest {
            spec: Some(demo_spec()),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.state, JobState::Queued as i32);
    let got = jobs
        .get_job(GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, job);

    // A bad spec is INVALID_ARGUMENT naming the field.
    let bad = JobSpec {
        optim: Some(OptimSpec {
            lr: -1.0,
            ..Default::default()
        }),
        ..demo_spec()
    };
    let e = jobs
        .submit_job(SubmitJobRequest { spec: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("spec.optim.lr"), "{}", e.message());
    let e = jobs
        .submit_job(SubmitJobRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let e = jobs
        .get_job(GetJobRequest {
            job_id: "job-unknown".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Idempotency key: the same job again.
    let keyed = JobSpec {
        idempotency_key: "k-1".into(),
        ..demo_spec()
    };
    let a = jobs
        .submit_job(SubmitJobRequest {
            spec: Some(keyed.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let b = jobs
        .submit_job(SubmitJobRequest { spec: Some(keyed) })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(a.job_id, b.job_id);

    let list = jobs
        .list_jobs(ListJobsRequest {
            state: 0,
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.jobs.len(), 1);
    let rest = jobs
        .list_jobs(ListJobsRequest {
            state: 0,
            page_size: 10,
            page_token: list.next_page_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.jobs.len(), 1);
    assert!(rest.next_page_token.is_empty());

    // Watch sees the current state, then the cancellation, then ends.
    let mut watch = jobs
        .watch_job(WatchJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().job.unwrap();
    assert_eq!(first.state, JobState::Queued as i32);
    let cancelled = jobs
        .cancel_job(CancelJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, JobState::Cancelled as i32);
    let next = watch.message().await.unwrap().unwrap().job.unwrap();
    assert_eq!(next.state, JobState::Cancelled as i32);
    assert!(
        watch.message().await.unwrap().is_none(),
        "the stream ends at a final state"
    );
    let e = jobs
        .cancel_job(CancelJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn credentials_are_required() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("s.redb"));
    let mut anonymous = JobServiceClient::new(c.channel().await);
    let e = anonymous
        .get_job(GetJobRequest { job_id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let wrong: MetadataValue<_> = "Bearer nope".parse().unwrap();
    let mut wrong_client =
        JobServiceClient::with_interceptor(c.channel().await, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", wrong.clone());
            Ok(req)
        });
    let e = wrong_client
        .submit_job(SubmitJobRequest {
            spec: Some(demo_spec()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_killed_coordinator_loses_no_job() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.redb");
    let id = {
        let c = Coordinator::start(&store);
        let mut jobs = c.client().await;
        jobs.submit_job(SubmitJobRequest {
            spec: Some(demo_spec()),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
        .job_id
        // dropped here: SIGKILL, no graceful shutdown
    };
    let c = Coordinator::start(&store);
    let mut jobs = c.client().await;
    let job = jobs
        .get_job(GetJobRequest { job_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, JobState::Queued as i32);
}

/// `/metrics` speaks OpenMetrics with the `protodino_` prefix and counts jobs by state.
#[tokio::test]
async fn metrics_count_jobs_by_state() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("s.redb"));
    let mut jobs = c.client().await;
    jobs.submit_job(SubmitJobRequest {
        spec: Some(demo_spec()),
    })
    .await
    .unwrap();
    let body = http_get(&c.metrics_addr, "/metrics").await;
    assert!(
        body.contains("protodino_jobs{state=\"queued\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("protodino_jobs{state=\"running\"} 0"),
        "{body}"
    );
    assert!(body.contains("protodino_build_info{version="), "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
}

/// A minimal HTTP/1.1 GET over a real socket (no client library needed for one request).
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}
