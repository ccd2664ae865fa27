//! The job API end to end: the real coordinator binary on an ephemeral loopback port, a real
//! gRPC client, a real store file, and a restart in the middle.

mod support;

use protodino_proto::v1::job_service_client::JobServiceClient;
use protodino_proto::v1::{
    CancelJobRequest, GetJobRequest, JobSpec, JobState, ListJobsRequest, OptimSpec,
    SubmitJobRequest, WatchJobRequest,
};
use support::{Coordinator, JOIN_TOKEN, http_get, tiny_dataset, tiny_spec};
use tonic::Code;

/// A 1-worker demo job over the tiny data set (no worker ever registers here: it stays queued).
fn demo_spec() -> JobSpec {
    JobSpec {
        epochs: Some(2),
        ..tiny_spec(1, 1)
    }
}

/// A coordinator over a fresh store and a data root holding the tiny set.
fn start(dir: &tempfile::TempDir) -> Coordinator {
    tiny_dataset(dir.path());
    Coordinator::start(&dir.path().join("s.redb"), dir.path())
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir);
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
    let c = start(&dir);
    let mut jobs = c.jobs().await;

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
            lr: Some(-1.0),
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
            reason: String::new(),
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
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn credentials_are_required() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir);
    let mut anonymous = JobServiceClient::new(c.channel().await);
    let e = anonymous
        .get_job(GetJobRequest { job_id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // A wrong token, and the workers' join token: both refused.
    for token in ["nope", JOIN_TOKEN] {
        let e = c
            .jobs_with(token)
            .await
            .submit_job(SubmitJobRequest {
                spec: Some(demo_spec()),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token}");
    }
}

#[tokio::test]
async fn a_killed_coordinator_loses_no_job() {
    let dir = tempfile::tempdir().unwrap();
    tiny_dataset(dir.path());
    let store = dir.path().join("s.redb");
    let id = {
        let c = Coordinator::start(&store, dir.path());
        let mut jobs = c.jobs().await;
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
    let c = Coordinator::start(&store, dir.path());
    let mut jobs = c.jobs().await;
    let job = jobs
        .get_job(GetJobRequest { job_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, JobState::Queued as i32);
}

/// `/metrics` has the `protodino_` prefix and counts jobs by state; a scrape that does not ask
/// for OpenMetrics gets the classic text format (counter families named after their samples).
#[tokio::test]
async fn metrics_count_jobs_by_state() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir);
    let mut jobs = c.jobs().await;
    jobs.submit_job(SubmitJobRequest {
        spec: Some(demo_spec()),
    })
    .await
    .unwrap();
    let refused = c
        .jobs_with("nope")
        .await
        .submit_job(SubmitJobRequest {
            spec: Some(demo_spec()),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let body = http_get(&c.metrics_addr, "/metrics").await;
    assert!(
        body.contains("protodino_unauthenticated_requests_total{service=\"job\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("protodino_jobs{state=\"queued\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("protodino_jobs{state=\"running\"} 0"),
        "{body}"
    );
    assert!(body.contains("protodino_build_info{version="), "{body}");
    assert!(
        body.contains("# TYPE protodino_committed_steps_total counter\n"),
        "{body}"
    );
    assert!(
        body.contains("protodino_job_submissions_total{result=\"accepted\"} 1"),
        "{body}"
    );
    assert!(!body.contains("# EOF"), "{body}");
}

/// Finished jobs leave the coordinator's memory (all but the newest
/// `RETAIN_FINISHED`), and nothing of the API notices: `GetJob`, `WatchJob`, `ListJobs`,
/// idempotency keys and `/metrics` answer for every job, before and after a restart.
#[tokio::test]
async fn finished_jobs_leave_memory_but_not_the_api() {
    use protodino_coordinator::core::RETAIN_FINISHED;
    let dir = tempfile::tempdir().unwrap();
    tiny_dataset(dir.path());
    let store = dir.path().join("s.redb");
    let n = RETAIN_FINISHED + 20;
    let keyed = |i: usize| JobSpec {
        idempotency_key: format!("key-{i}"),
        ..demo_spec()
    };
    let mut ids = Vec::new();
    let c = Coordinator::start(&store, dir.path());
    let mut jobs = c.jobs().await;
    for i in 0..n {
        let job = jobs
            .submit_job(SubmitJobRequest {
                spec: Some(keyed(i)),
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        jobs.cancel_job(CancelJobRequest {
            job_id: job.job_id.clone(),
            reason: format!("number {i}"),
        })
        .await
        .unwrap();
        ids.push(job.job_id);
    }
    let check = |c: Coordinator, ids: Vec<String>| async move {
        let mut jobs = c.jobs().await;
        // The oldest jobs left memory first: they come from the store.
        let first = jobs
            .get_job(GetJobRequest {
                job_id: ids[0].clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(first.state, JobState::Cancelled as i32);
        assert_eq!(first.message, "cancelled: number 0");
        let mut watch = jobs
            .watch_job(WatchJobRequest {
                job_id: ids[0].clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(watch.message().await.unwrap().unwrap().job.unwrap(), first);
        assert!(watch.message().await.unwrap().is_none());
        // Its key still names it; used with another spec it is ALREADY_EXISTS.
        let again = jobs
            .submit_job(SubmitJobRequest {
                spec: Some(keyed(0)),
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert_eq!(again.job_id, ids[0]);
        let other = JobSpec {
            epochs: Some(3),
            ..keyed(0)
        };
        let e = jobs
            .submit_job(SubmitJobRequest { spec: Some(other) })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
        // Every job is listed once, in order, page by page.
        let mut listed = Vec::new();
        let mut token = String::new();
        loop {
            let page = jobs
                .list_jobs(ListJobsRequest {
                    state: JobState::Cancelled as i32,
                    page_size: 100,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            listed.extend(page.jobs.into_iter().map(|j| j.job_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(listed, ids);
        let body = http_get(&c.metrics_addr, "/metrics").await;
        assert!(
            body.contains(&format!(
                "protodino_jobs{{state=\"cancelled\"}} {}",
                ids.len()
            )),
            "{body}"
        );
    };
    check(c, ids.clone()).await;
    // The same from a restarted coordinator, which loads only the newest finished jobs.
    let c = Coordinator::start(&store, dir.path());
    check(c, ids).await;
}
