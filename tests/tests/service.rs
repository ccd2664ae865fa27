//! The training service end to end: the real coordinator and `protodino worker` processes on
//! loopback, jobs submitted through the job API, the real store, real checkpoints, SIGKILL.
//!
//! - two workers run a job to SUCCEEDED and end with the parameters of one process with their
//!   global batch; the audit file shows every sample once per epoch;
//! - a cancelled job frees its workers for the next job within seconds; `koleo_weight = 0` trains
//!   plain DINO; a job whose loss turns non-finite FAILS naming the step and the replay batch,
//!   and its workers take the next job;
//! - a coordinator killed with -9 mid-job and restarted on the same store loses no job, committed
//!   step or checkpoint record, its workers re-attach and the job finishes.

use std::time::{Duration, Instant};

use protodino_proto::v1::{CancelJobRequest, JobState, OptimSpec};
use protodino_tests::cluster::{
    Coordinator, Roots, Worker, audit_exactly_once, get, job_dir, load_f32, read_jsonl, spec,
    state, submit, wait_for, worst_relative,
};
use protodino_tests::faults::assert_listed_checkpoints_load;
use protodino_tests::scenario::{
    BASE, MINUTES, is_state, runtime, single_process, without_key_bias,
};

/// `worker-a` and `worker-b`, plain.
fn two_workers(roots: &Roots, coordinator: &Coordinator) -> [Worker; 2] {
    ["worker-a", "worker-b"].map(|name| Worker::start(roots, &coordinator.url(), name, &[]))
}

#[test]
fn two_workers_train_a_job_equal_to_one_process_and_use_each_sample_once() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let coordinator = Coordinator::start(&roots, "127.0.0.1:0", &[]);
    let _workers = two_workers(&roots, &coordinator);
    runtime().block_on(async {
        let mut jobs = coordinator.jobs().await;
        let job = submit(&mut jobs, spec(BASE, 2, 16, 20)).await;
        // Queued, or already in rendezvous when both workers were idle at submission.
        assert!(
            matches!(state(&job), JobState::Queued | JobState::Rendezvous),
            "{job:?}"
        );
        let resolved: serde_json::Value = serde_json::from_str(&job.resolved_config).unwrap();
        assert_eq!(resolved["head"]["out_dim"], 256, "{resolved}");
        let done = wait_for(&mut jobs, &job.job_id, 5 * MINUTES, "success", |j| {
            state(j) == JobState::Succeeded
        })
        .await;
        let p = done.progress.unwrap();
        assert_eq!((p.step, p.total_steps, p.world_size), (20, 20, 2));
        assert_eq!(p.committed_samples, 20 * 16);
        assert_eq!(done.workers.len(), 2);
        let result: serde_json::Value = serde_json::from_str(&done.result).unwrap();
        assert!(
            result["collapse"]["report"]["counts"].is_array(),
            "{result}"
        );

        // Exactly once: 20 committed steps, 160 distinct samples in each of the 2 epochs.
        let jdir = job_dir(&roots, &done);
        assert_eq!(audit_exactly_once(&jdir.join("steps.jsonl"), 16), 20);
        let audit = read_jsonl(&jdir.join("steps.jsonl"));
        assert!(audit.iter().all(|l| l["world_size"] == 2));

        // Every listed checkpoint is there and matches its SHA-256.
        assert!(
            done.checkpoints.iter().any(|c| c.step == 20),
            "{:?}",
            done.checkpoints
        );
        assert_listed_checkpoints_load(&roots, &done);

        // The same recipe in one process with the global batch.
        let single = single_process(dir.path(), "", 16, 20);
        let service = without_key_bias(load_f32(&jdir.join("checkpoint-00000020.safetensors")));
        let (worst, name) = worst_relative(&single, &service);
        eprintln!("worst relative parameter difference after 20 steps: {worst:.3e} ({name})");
        assert!(worst < 2e-5, "{name} differs by {worst:e}");
    });
}

#[test]
fn cancel_frees_the_workers_koleo_zero_is_plain_dino_and_non_finite_losses_fail() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let coordinator = Coordinator::start(&roots, "127.0.0.1:0", &[]);
    let _workers = two_workers(&roots, &coordinator);
    runtime().block_on(async {
        let mut jobs = coordinator.jobs().await;
        // A long job, cancelled once it trains.
        let long = submit(&mut jobs, spec(BASE, 2, 16, 100_000)).await;
        wait_for(&mut jobs, &long.job_id, 3 * MINUTES, "a few steps", |j| {
            j.progress.as_ref().is_some_and(|p| p.step >= 3)
        })
        .await;
        let cancelled = jobs
            .cancel_job(CancelJobRequest {
                job_id: long.job_id.clone(),
                reason: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let t0 = Instant::now();
        assert_eq!(state(&cancelled), JobState::Cancelled);
        let again = jobs
            .cancel_job(CancelJobRequest {
                job_id: long.job_id.clone(),
                reason: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(again.code(), tonic::Code::FailedPrecondition);

        // koleo_weight = 0 over a preset with 0.1: plain DINO. It needs both workers, so its
        // rendezvous shows they were freed.
        let mut plain = spec(BASE, 2, 16, 3);
        plain.koleo_weight = Some(0.0);
        let plain = submit(&mut jobs, plain).await;
        let resolved: serde_json::Value = serde_json::from_str(&plain.resolved_config).unwrap();
        assert_eq!(resolved["koleo"]["weight"], 0.0);
        wait_for(
            &mut jobs,
            &plain.job_id,
            MINUTES,
            "the next rendezvous",
            |j| state(j) != JobState::Queued,
        )
        .await;
        let freed = t0.elapsed();
        eprintln!("cancel → both workers in the next job's rendezvous: {freed:?}");
        assert!(
            freed < Duration::from_secs(5),
            "workers freed after {freed:?}"
        );
        let plain = wait_for(
            &mut jobs,
            &plain.job_id,
            3 * MINUTES,
            "plain DINO to succeed",
            is_state(JobState::Succeeded),
        )
        .await;
        let result: serde_json::Value = serde_json::from_str(&plain.result).unwrap();
        assert_eq!(result["last_step"]["koleo_proto"], 0.0, "{result}");

        // An absurd learning rate: the loss turns non-finite, the job FAILS naming the step and
        // the replay batch, and the workers take the next job.
        let mut bad = spec(BASE, 2, 16, 50);
        // AdamW's decoupled decay multiplies each weight by 1 − lr·wd ≈ −60 a step.
        bad.optim = Some(OptimSpec {
            lr: Some(100.0),
            weight_decay: Some(10.0),
            weight_decay_end: Some(10.0),
            warmup_epochs: Some(0),
            ..Default::default()
        });
        let bad = submit(&mut jobs, bad).await;
        let failed = wait_for(
            &mut jobs,
            &bad.job_id,
            3 * MINUTES,
            "the failure",
            is_state(JobState::Failed),
        )
        .await;
        let step = failed.progress.as_ref().map_or(0, |p| p.step);
        assert!(step < 10, "failed only after {step} steps");
        assert!(
            failed.message.contains("step") && failed.message.contains("batch"),
            "{}",
            failed.message
        );
        let next = submit(&mut jobs, spec(BASE, 2, 16, 2)).await;
        wait_for(
            &mut jobs,
            &next.job_id,
            3 * MINUTES,
            "the job after the failure",
            is_state(JobState::Succeeded),
        )
        .await;
    });
}

#[test]
fn a_coordinator_killed_mid_job_loses_nothing_and_the_job_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let mut coordinator = Coordinator::start(&roots, "127.0.0.1:0", &[]);
    let _workers = two_workers(&roots, &coordinator);
    let addr = coordinator.addr.clone();
    let rt = runtime();
    let (job_id, before) = rt.block_on(async {
        let mut jobs = coordinator.jobs().await;
        let mut s = spec(BASE, 2, 16, 40);
        s.checkpoint_every_steps = Some(5);
        s.epochs = Some(4);
        let job = submit(&mut jobs, s).await;
        let before = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "a checkpoint", |j| {
            j.progress.as_ref().is_some_and(|p| p.step >= 8) && !j.checkpoints.is_empty()
        })
        .await;
        (job.job_id, before)
    });
    coordinator.kill9();
    // The restarted coordinator serves the address its workers know.
    let coordinator = Coordinator::start(&roots, &addr, &[]);
    rt.block_on(async {
        let mut jobs = coordinator.jobs().await;
        let after = get(&mut jobs, &job_id).await;
        let (b, a) = (before.progress.unwrap(), after.progress.unwrap());
        assert!(
            a.step >= b.step,
            "committed steps lost: {} → {}",
            b.step,
            a.step
        );
        for c in &before.checkpoints {
            assert!(
                after.checkpoints.iter().any(|d| d == c),
                "checkpoint record {c:?} lost"
            );
        }
        let done = wait_for(
            &mut jobs,
            &job_id,
            5 * MINUTES,
            "success after the restart",
            is_state(JobState::Succeeded),
        )
        .await;
        assert_eq!(done.progress.unwrap().step, 40);
        assert_eq!(
            audit_exactly_once(&job_dir(&roots, &done).join("steps.jsonl"), 16),
            40
        );
    });
}

#[test]
fn a_drifted_replica_is_detected_by_its_hash_and_re_synced_from_the_majority() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let coordinator = Coordinator::start(&roots, "127.0.0.1:0", &["--hash-every-steps", "4"]);
    let _workers = two_workers(&roots, &coordinator);
    // The test-only hook: this replica changes one teacher weight after step 3. Three members,
    // so the two untouched replicas are the majority whatever the ranks.
    let _w2 = Worker::start(
        &roots,
        &coordinator.url(),
        "worker-c",
        &[("PROTODINO_TEST_PERTURB_AT_STEP", "3")],
    );
    runtime().block_on(async {
        let mut jobs = coordinator.jobs().await;
        // 160 images, global batch 24: 6 steps per epoch, 2 epochs.
        let job = submit(&mut jobs, spec(BASE, 3, 24, 12)).await;
        let done = wait_for(
            &mut jobs,
            &job.job_id,
            5 * MINUTES,
            "success",
            is_state(JobState::Succeeded),
        )
        .await;
        let p = done.progress.unwrap();
        eprintln!(
            "replica mismatches {}, membership epochs {}",
            p.replica_mismatches, p.membership_epoch
        );
        // Detected once (at the hash of step 4), and equal at every later hash (8, 12).
        assert_eq!(p.replica_mismatches, 1, "{p:?}");
        assert!(
            p.membership_epoch >= 2,
            "the group was not re-formed: {p:?}"
        );
        assert_eq!(p.step, 12);
        assert_eq!(
            audit_exactly_once(&job_dir(&roots, &done).join("steps.jsonl"), 24),
            12
        );
    });
}
