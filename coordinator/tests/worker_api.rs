//! The worker protocol end to end: the real coordinator binary, two test workers speaking the
//! real `WorkerService` over loopback (no training: they report the steps the plan says), a
//! real store, and a `kill -9` in the middle of a job.

mod support;

use std::collections::HashSet;

use protodino_data::{DataPlan, sample_digest};
use protodino_proto::v1::heartbeat_response::Action;
use protodino_proto::v1::worker_service_client::WorkerServiceClient;
use protodino_proto::v1::{
    Assignment, CancelJobRequest, Capabilities, CheckpointRef, CheckpointReport, FailureKind,
    FailureReport, GetJobRequest, HeartbeatRequest, Job, JobState, Progress, RegisterRequest,
    ResultReport, StepAck, StepReport, SubmitJobRequest, WatchJobRequest, WorkerPhase,
};
use support::{Authed, Coordinator, JOB_TOKEN, TINY_IMAGES, http_get, tiny_dataset, tiny_spec};
use tonic::{Code, Status};

type Workers = WorkerServiceClient<Authed>;

/// Register `name` (collective address `addr`), re-attaching to `session` when given.
async fn register(
    w: &mut Workers,
    name: &str,
    addr: &str,
    old_id: &str,
    session: Option<(&str, i64, i64)>,
) -> String {
    let (job_id, membership_epoch, committed_step) = session.unwrap_or(("", 0, 0));
    let resp = w
        .register(RegisterRequest {
            worker_name: name.into(),
            capabilities: Some(Capabilities {
                hostname: name.into(),
                cpu_threads: 2,
                collective_address: addr.into(),
                ..Default::default()
            }),
            worker_id: old_id.into(),
            job_id: job_id.into(),
            membership_epoch,
            committed_step,
        })
        .await
        .expect("register")
        .into_inner();
    assert_eq!(resp.heartbeat_interval_ms, 100);
    assert_eq!(resp.heartbeat_timeout_ms, 60000);
    resp.worker_id
}

async fn beat(
    w: &mut Workers,
    id: &str,
    phase: WorkerPhase,
    session: (&str, i64, i64),
) -> Result<Action, Status> {
    let resp = w
        .heartbeat(HeartbeatRequest {
            worker_id: id.into(),
            job_id: session.0.into(),
            membership_epoch: session.1,
            committed_step: session.2,
            state_hash: if phase == WorkerPhase::Idle && !session.0.is_empty() {
                vec![7; 32]
            } else {
                vec![]
            },
            phase: phase as i32,
        })
        .await?
        .into_inner();
    Ok(resp.action.expect("an action"))
}

async fn assignment(w: &mut Workers, id: &str) -> Assignment {
    match beat(w, id, WorkerPhase::Idle, ("", 0, 0))
        .await
        .expect("heartbeat")
    {
        Action::Assign(a) => a,
        other => panic!("{id}: expected an assignment, got {other:?}"),
    }
}

/// The plan the assignment describes (the seed is in the resolved configuration).
fn plan_of(a: &Assignment) -> DataPlan {
    let cfg: serde_json::Value = serde_json::from_str(&a.resolved_config).expect("config JSON");
    DataPlan {
        seed: cfg["train"]["seed"].as_u64().expect("a seed"),
        dataset_size: a.dataset_size as u64,
        global_batch: a.global_batch as u64,
    }
}

fn report(a: &Assignment, id: &str, step: i64) -> StepReport {
    let ids = plan_of(a).global_ids(step as u64 - 1);
    StepReport {
        worker_id: id.into(),
        job_id: a.job_id.clone(),
        membership_epoch: a.membership_epoch,
        step,
        epoch: 0,
        progress: Some(Progress {
            dino_loss: 6.0,
            koleo_proto: -1.5,
            ..Default::default()
        }),
        state_hash: vec![],
        sample_digest: sample_digest(&ids).to_vec(),
        step_seconds: 0.25,
    }
}

async fn step(w: &mut Workers, a: &Assignment, id: &str, s: i64) -> Result<StepAck, Status> {
    Ok(w.report_step(report(a, id, s)).await?.into_inner())
}

async fn get(c: &Coordinator, id: &str) -> Job {
    c.jobs()
        .await
        .get_job(GetJobRequest { job_id: id.into() })
        .await
        .expect("get job")
        .into_inner()
}

async fn submit(c: &Coordinator) -> Job {
    c.jobs()
        .await
        .submit_job(SubmitJobRequest {
            spec: Some(tiny_spec(2, 2)),
        })
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("a job")
}

/// Both workers' assignments, by rank; checks they describe one group.
async fn group(w: &mut Workers, ids: [&str; 2], job: &Job) -> [(String, Assignment); 2] {
    let a0 = assignment(w, ids[0]).await;
    let a1 = assignment(w, ids[1]).await;
    let mut by_rank = [(ids[0].to_string(), a0), (ids[1].to_string(), a1)];
    by_rank.sort_by_key(|(_, a)| a.rank);
    let [(_, r0), (_, r1)] = &by_rank;
    assert_eq!((r0.rank, r1.rank), (0, 1));
    assert_eq!(r0.job_id, job.job_id);
    assert_eq!(r0.membership_epoch, r1.membership_epoch);
    assert_eq!(r0.group_secret.len(), 32);
    assert_eq!(r0.group_secret, r1.group_secret);
    assert_eq!(r0.peers, r1.peers);
    assert_eq!(r0.world_size, 2);
    // Global batch 2 × 2 over 16 images for one epoch.
    assert_eq!(
        (r0.global_batch, r0.dataset_size, r0.total_steps),
        (4, TINY_IMAGES as i64, 4)
    );
    assert!(
        r0.checkpoint_dir.ends_with(&format!("/{}", job.job_id)),
        "{}",
        r0.checkpoint_dir
    );
    assert_eq!(r0.resolved_config, job.resolved_config);
    for (id, a) in &by_rank {
        assert_eq!(
            beat(
                w,
                id,
                WorkerPhase::Training,
                (&a.job_id, a.membership_epoch, 0)
            )
            .await
            .unwrap(),
            Action::KeepGoing(true)
        );
    }
    by_rank
}

#[tokio::test]
async fn two_workers_train_through_a_coordinator_kill_and_end_three_ways() {
    let dir = tempfile::tempdir().unwrap();
    tiny_dataset(dir.path());
    let store = dir.path().join("s.redb");
    let c = Coordinator::start(&store, dir.path());
    let mut w = c.workers().await;
    let a = register(&mut w, "a", "127.0.0.1:7001", "", None).await;
    let b = register(&mut w, "b", "127.0.0.1:7002", "", None).await;
    let addr = |id: &str| {
        if id == a {
            "127.0.0.1:7001"
        } else {
            "127.0.0.1:7002"
        }
    };
    // A worker joins groups once its first heartbeat has said what replica it holds.
    for id in [&a, &b] {
        let first = beat(&mut w, id, WorkerPhase::Idle, ("", 0, 0))
            .await
            .unwrap();
        assert_eq!(first, Action::KeepGoing(true));
    }

    // --- Job 1: rendezvous, steps, checkpoints.
    let job = submit(&c).await;
    let [(r0, g0), (r1, g1)] = group(&mut w, [&a, &b], &job).await;
    assert_eq!(g0.peers, [addr(&r0), addr(&r1)], "peers in rank order");
    let epoch = g0.membership_epoch;
    let got = get(&c, &job.job_id).await;
    assert_eq!(got.state, JobState::Rendezvous as i32);
    assert_eq!(got.workers, [r0.clone(), r1.clone()]);
    assert!(
        got.message.starts_with("rendezvous: epoch 1, 2 workers"),
        "{}",
        got.message
    );

    // The watermark moves only when both reported.
    assert_eq!(step(&mut w, &g0, &r0, 1).await.unwrap().committed_step, 0);
    assert_eq!(get(&c, &job.job_id).await.progress.unwrap().step, 0);
    assert_eq!(step(&mut w, &g1, &r1, 1).await.unwrap().committed_step, 1);
    let got = get(&c, &job.job_id).await;
    assert_eq!(got.state, JobState::Running as i32);
    let p = got.progress.unwrap();
    assert_eq!(
        (p.step, p.committed_samples, p.world_size, p.total_steps),
        (1, 4, 2, 4)
    );
    assert_eq!(p.dino_loss, 6.0);
    // A duplicate changes nothing; a wrong digest and a stale epoch are refused.
    assert_eq!(step(&mut w, &g1, &r1, 1).await.unwrap().committed_step, 1);
    let mut wrong = report(&g0, &r0, 2);
    wrong.sample_digest = report(&g0, &r0, 3).sample_digest;
    assert_eq!(
        w.report_step(wrong).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let mut stale = report(&g0, &r0, 2);
    stale.membership_epoch = epoch - 1;
    assert_eq!(
        w.report_step(stale).await.unwrap_err().code(),
        Code::Aborted
    );
    let e = beat(
        &mut w,
        &r0,
        WorkerPhase::Training,
        (&job.job_id, epoch - 1, 1),
    )
    .await;
    assert_eq!(e.unwrap_err().code(), Code::Aborted);

    let ckpt = |uri: String| CheckpointReport {
        worker_id: r0.clone(),
        job_id: job.job_id.clone(),
        membership_epoch: epoch,
        checkpoint: Some(CheckpointRef {
            step: 1,
            epoch: 0,
            uri,
            sha256: "5e".repeat(32),
        }),
    };
    let inside = format!("{}/checkpoint-000001.safetensors", g0.checkpoint_dir);
    w.report_checkpoint(ckpt(inside.clone())).await.unwrap();
    let outside = w
        .report_checkpoint(ckpt("jobs/other/c.safetensors".into()))
        .await;
    assert_eq!(outside.unwrap_err().code(), Code::InvalidArgument);
    // Rank 0 is one report ahead when the coordinator dies.
    assert_eq!(step(&mut w, &g0, &r0, 2).await.unwrap().committed_step, 1);

    // --- kill -9, restart on the same store: nothing acknowledged is lost.
    c.kill();
    let c = Coordinator::start(&store, dir.path());
    let mut w = c.workers().await;
    let got = get(&c, &job.job_id).await;
    assert_eq!(got.state, JobState::Running as i32);
    assert_eq!(got.progress.unwrap().step, 1);
    assert_eq!(got.workers, [r0.clone(), r1.clone()]);
    assert_eq!(got.checkpoints.len(), 1);
    assert_eq!(got.checkpoints[0].uri, inside);
    let e = beat(&mut w, &r0, WorkerPhase::Training, (&job.job_id, epoch, 2)).await;
    assert_eq!(e.unwrap_err().code(), Code::NotFound, "register again");
    let back0 = register(&mut w, "a", addr(&r0), &r0, Some((&job.job_id, epoch, 2))).await;
    let back1 = register(&mut w, "b", addr(&r1), &r1, Some((&job.job_id, epoch, 1))).await;
    assert_eq!((back0.as_str(), back1.as_str()), (r0.as_str(), r1.as_str()));
    for id in [&r0, &r1] {
        let ok = beat(&mut w, id, WorkerPhase::Training, (&job.job_id, epoch, 1)).await;
        assert_eq!(ok.unwrap(), Action::KeepGoing(true));
    }
    // Rank 0's report of step 2 survived the kill: rank 1's commits it.
    assert_eq!(step(&mut w, &g1, &r1, 2).await.unwrap().committed_step, 2);

    // --- Cancel: both are told to stop and are idle again.
    let cancelled = c
        .jobs()
        .await
        .cancel_job(CancelJobRequest {
            job_id: job.job_id.clone(),
            reason: "enough".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, JobState::Cancelled as i32);
    assert_eq!(cancelled.message, "cancelled: enough");
    for (id, g) in [(&r0, &g0), (&r1, &g1)] {
        let told = beat(&mut w, id, WorkerPhase::Training, (&job.job_id, epoch, 2)).await;
        assert_eq!(told.unwrap(), Action::Stop(true));
        assert!(step(&mut w, g, id, 3).await.unwrap().stop);
        let drop_it = beat(&mut w, id, WorkerPhase::Idle, (&job.job_id, epoch, 2)).await;
        assert_eq!(
            drop_it.unwrap(),
            Action::Stop(true),
            "drop the replica of a final job"
        );
        let idle = beat(&mut w, id, WorkerPhase::Idle, ("", 0, 0)).await;
        assert_eq!(idle.unwrap(), Action::KeepGoing(true));
    }
    let body = http_get(&c.metrics_addr, "/metrics").await;
    assert!(
        body.contains("protodino_workers{state=\"idle\"} 2"),
        "{body}"
    );
    assert!(body.contains("protodino_committed_steps_total 2"), "{body}");
    assert!(
        body.contains("protodino_jobs{state=\"cancelled\"} 1"),
        "{body}"
    );

    // --- Job 2 runs to the end: every step committed and rank 0's result → SUCCEEDED.
    let job2 = submit(&c).await;
    let mut watch = c
        .jobs()
        .await
        .watch_job(WatchJobRequest {
            job_id: job2.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let [(q0, h0), (q1, h1)] = group(&mut w, [&a, &b], &job2).await;
    for s in 1..=4 {
        step(&mut w, &h0, &q0, s).await.unwrap();
        step(&mut w, &h1, &q1, s).await.unwrap();
    }
    assert_eq!(get(&c, &job2.job_id).await.state, JobState::Running as i32);
    let rank1_result = w
        .report_result(ResultReport {
            worker_id: q1.clone(),
            job_id: job2.job_id.clone(),
            membership_epoch: h1.membership_epoch,
            result: "{}".into(),
        })
        .await;
    assert_eq!(rank1_result.unwrap_err().code(), Code::FailedPrecondition);
    w.report_result(ResultReport {
        worker_id: q0.clone(),
        job_id: job2.job_id.clone(),
        membership_epoch: h0.membership_epoch,
        result: r#"{"knn":{"top1":0.5}}"#.into(),
    })
    .await
    .unwrap();
    let done = get(&c, &job2.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32);
    assert_eq!(done.result, r#"{"knn":{"top1":0.5}}"#);
    // The watch saw the steps commit, then ended with the final state.
    let mut seen = Vec::new();
    while let Some(ev) = watch.message().await.unwrap() {
        seen.push(ev.job.unwrap());
    }
    let steps: HashSet<i64> = seen
        .iter()
        .filter_map(|j| j.progress.map(|p| p.step))
        .collect();
    assert!(steps.is_superset(&(0..=4).collect()), "{steps:?}");
    assert_eq!(seen.last().unwrap().state, JobState::Succeeded as i32);

    // --- Job 3: a JOB failure fails it with the report's reason.
    let job3 = submit(&c).await;
    let [(f0, k0), (f1, k1)] = group(&mut w, [&a, &b], &job3).await;
    let reason = "non-finite loss at step 1; replay batch saved in failures/step-000001";
    w.report_failure(FailureReport {
        worker_id: f0.clone(),
        job_id: job3.job_id.clone(),
        membership_epoch: k0.membership_epoch,
        last_committed_step: 0,
        state_hash: vec![],
        reason: reason.into(),
        kind: FailureKind::Job as i32,
    })
    .await
    .unwrap();
    let failed = get(&c, &job3.job_id).await;
    assert_eq!(failed.state, JobState::Failed as i32);
    assert_eq!(failed.message, reason);
    let told = beat(
        &mut w,
        &f1,
        WorkerPhase::Training,
        (&job3.job_id, k1.membership_epoch, 0),
    )
    .await;
    assert_eq!(told.unwrap(), Action::Stop(true));
}

#[tokio::test]
async fn each_service_takes_only_its_own_token() {
    let dir = tempfile::tempdir().unwrap();
    tiny_dataset(dir.path());
    let c = Coordinator::start(&dir.path().join("s.redb"), dir.path());
    let register = RegisterRequest {
        worker_name: "a".into(),
        capabilities: Some(Capabilities {
            collective_address: "127.0.0.1:7001".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    for token in ["wrong", JOB_TOKEN] {
        let e = c.workers_with(token).await.register(register.clone()).await;
        assert_eq!(e.unwrap_err().code(), Code::Unauthenticated, "{token}");
    }
    let e = WorkerServiceClient::new(c.channel().await)
        .register(register.clone())
        .await;
    assert_eq!(e.unwrap_err().code(), Code::Unauthenticated);
    // The join token works, and a bad request is INVALID_ARGUMENT naming the field.
    let mut w = c.workers().await;
    w.register(register.clone()).await.unwrap();
    let mut bad = register;
    bad.capabilities = Some(Capabilities {
        collective_address: "no-port".into(),
        ..Default::default()
    });
    let e = w.register(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("capabilities.collective_address"),
        "{}",
        e.message()
    );
    let e = beat(&mut w, "w-unknown", WorkerPhase::Idle, ("", 0, 0)).await;
    assert_eq!(e.unwrap_err().code(), Code::NotFound);
}

#[test]
fn the_coordinator_refuses_to_start_with_one_token_for_both_services() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::command(&dir.path().join("s.redb"), dir.path())
        .env("PROTODINO_JOIN_TOKEN", JOB_TOKEN)
        .output()
        .expect("run the coordinator");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("join token must differ"), "{err}");
    let out = support::command(&dir.path().join("s.redb"), dir.path())
        .env_remove("PROTODINO_JOIN_TOKEN")
        .output()
        .expect("run the coordinator");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("join token is required"));
}
