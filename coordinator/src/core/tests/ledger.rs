//! The exactly-once ledger: commits, duplicates, digests, epochs, replica hashes.

use protodino_proto::v1::{JobState, StepReport};

use super::*;

/// `job-a` (global batch 4 over 16 images: 4 steps an epoch, 2 epochs) training on `w-a`, `w-b`.
fn two_members() -> (World, i64) {
    let mut w = World::new();
    w.submit("job-a", 2, 2, 4, 16, 2);
    w.register("a");
    w.register("b");
    let (epoch, members) = w.start_group("job-a", &["w-a", "w-b"]);
    assert_eq!(members, ["w-a", "w-b"]);
    (w, epoch)
}

#[test]
fn a_step_commits_when_every_member_reported_it_in_order() {
    let (mut w, e) = two_members();
    // (worker, step) → watermark after the report.
    let script: &[(&str, i64, u64)] = &[
        ("w-a", 1, 0),
        ("w-a", 2, 0), // ahead of its peer: recorded, nothing commits
        ("w-b", 2, 0), // step 2 complete, but step 1 is not: steps commit in order
        ("w-b", 1, 2), // now 1 and 2 commit together
        ("w-b", 3, 2),
        ("w-a", 3, 3),
    ];
    for (worker, step, want) in script {
        let ack = w.report(worker, "job-a", e, *step, &[]).unwrap();
        assert_eq!(ack.committed_step, *want as i64, "{worker} step {step}");
        assert!(!ack.stop);
        assert_eq!(w.watermark("job-a"), *want);
    }
    assert_eq!(w.state("job-a"), JobState::Running);
    let p = w.core.job("job-a").unwrap().record.progress.unwrap();
    assert_eq!(p.step, 3);
    assert_eq!(p.committed_samples, 12);
    assert_eq!(p.total_steps, 8);
    assert_eq!(p.world_size, 2);
    assert_eq!(p.membership_epoch, e);
    assert_eq!(p.dino_loss, 8.0, "rank 0's loss of step 3");
    assert_eq!(p.images_per_second, 8.0, "4 samples in 0.5 s");
    assert_eq!(w.message("job-a"), "running: step 3/8");
}

#[test]
fn duplicates_are_no_ops_and_replays_below_the_watermark_are_acknowledged() {
    let (mut w, e) = two_members();
    w.report("w-a", "job-a", e, 1, &[]).unwrap();
    let (again, ch) = {
        let r = StepReport {
            worker_id: "w-a".into(),
            job_id: "job-a".into(),
            membership_epoch: e,
            step: 1,
            sample_digest: w.digest("job-a", 1),
            ..Default::default()
        };
        w.apply(|c, now, _, ch| c.report_step(now, &r, ch))
    };
    assert_eq!(again.unwrap().committed_step, 0);
    assert!(!ch.is_durable(), "a duplicate writes nothing");
    w.report("w-b", "job-a", e, 1, &[]).unwrap();
    assert_eq!(w.watermark("job-a"), 1);
    // Both again, after the commit: acknowledged, nothing changes.
    assert_eq!(
        w.report("w-b", "job-a", e, 1, &[]).unwrap().committed_step,
        1
    );
    assert_eq!(w.watermark("job-a"), 1);
}

#[test]
fn bad_reports_are_refused_with_their_code() {
    let (mut w, e) = two_members();
    w.register("c");
    let mut wrong = StepReport {
        worker_id: "w-a".into(),
        job_id: "job-a".into(),
        membership_epoch: e,
        step: 1,
        sample_digest: w.digest("job-a", 2), // the digest of another step
        ..Default::default()
    };
    let err = |w: &mut World, r: &StepReport| {
        let r = r.clone();
        code(
            &w.apply(|c, now, _, ch| c.report_step(now, &r, ch))
                .0
                .unwrap_err(),
        )
    };
    assert_eq!(err(&mut w, &wrong), "FAILED_PRECONDITION");
    wrong.sample_digest = vec![0; 5];
    assert_eq!(err(&mut w, &wrong), "INVALID_ARGUMENT");
    // Table: (worker, job, epoch, step) → code.
    let cases: &[(&str, &str, i64, i64, &str)] = &[
        ("w-a", "job-a", e, 9, "INVALID_ARGUMENT"), // beyond total_steps
        ("w-a", "job-a", e, 0, "INVALID_ARGUMENT"), // steps count from 1
        ("w-a", "job-a", e - 1, 1, "ABORTED"),      // stale epoch
        ("w-a", "job-a", e + 1, 1, "ABORTED"),      // never formed
        ("w-c", "job-a", e, 1, "FAILED_PRECONDITION"), // not a member
        ("w-zz", "job-a", e, 1, "NOT_FOUND"),       // not registered
        ("w-a", "job-zz", e, 1, "NOT_FOUND"),       // no such job
    ];
    for (worker, job, epoch, step, want) in cases {
        let digest = w.digest("job-a", (*step).clamp(1, 8) as u64);
        let r = StepReport {
            worker_id: worker.to_string(),
            job_id: job.to_string(),
            membership_epoch: *epoch,
            step: *step,
            sample_digest: digest,
            ..Default::default()
        };
        assert_eq!(
            err(&mut w, &r),
            *want,
            "{worker} {job} epoch {epoch} step {step}"
        );
    }
    assert_eq!(w.watermark("job-a"), 0);
    assert!(w.core.job("job-a").unwrap().ledger.pending.is_empty());
}

#[test]
fn stale_training_heartbeats_are_aborted_idle_ones_never() {
    let (mut w, e) = two_members();
    assert_eq!(
        code(&w.training("w-a", "job-a", e - 1).unwrap_err()),
        "ABORTED"
    );
    assert_eq!(
        code(&w.training("w-a", "job-a", e + 3).unwrap_err()),
        "ABORTED"
    );
    // An idle heartbeat naming an old epoch describes a replica: never ABORTED.
    w.register("c");
    assert_eq!(
        w.idle("w-c", "job-a", e - 1, 0, &[1]).unwrap(),
        keep_going()
    );
    assert_eq!(
        code(&w.training("w-zz", "job-a", e).unwrap_err()),
        "NOT_FOUND"
    );
    assert_eq!(
        w.training("w-a", "job-zz", 1).unwrap(),
        stop(),
        "unknown job: drop it"
    );
}

#[test]
fn a_hash_mismatch_resyncs_from_the_majority() {
    let mut w = World::new();
    w.submit("job-a", 3, 3, 6, 60, 1);
    for n in ["a", "b", "c"] {
        w.register(n);
    }
    let (e, members) = w.start_group("job-a", &["w-a", "w-b", "w-c"]);
    assert_eq!(members, ["w-a", "w-b", "w-c"]);
    for m in &members {
        w.report(m, "job-a", e, 1, &[]).unwrap();
    }
    // Step 2 carries hashes: rank 0 disagrees with the two others.
    w.report("w-a", "job-a", e, 2, &[0xaa]).unwrap();
    w.report("w-b", "job-a", e, 2, &[0xbb]).unwrap();
    let ack = w.report("w-c", "job-a", e, 2, &[0xbb]).unwrap();
    assert_eq!(ack.committed_step, 2, "the step itself commits");
    assert!(ack.stop, "the group is told to stop");
    let job = &w.core.job("job-a").unwrap().record;
    assert_eq!(job.progress.unwrap().replica_mismatches, 1);
    assert_eq!(job.state, JobState::Recovering as i32);
    assert!(job.message.contains("w-a=aa"), "{}", job.message);
    assert!(job.message.contains("w-b=bb"), "{}", job.message);
    assert_eq!(w.training("w-b", "job-a", e).unwrap(), stop());

    // They stop together after step 3 (the stop vote), whose reports still commit.
    for m in &members {
        w.report(m, "job-a", e, 3, &[]).unwrap();
    }
    assert_eq!(w.watermark("job-a"), 3);
    w.idle("w-a", "job-a", e, 3, &[0xa3]).unwrap();
    w.idle("w-b", "job-a", e, 3, &[0xb3]).unwrap();
    assert_eq!(
        w.core.job("job-a").unwrap().ledger.last_epoch,
        e,
        "w-c still runs"
    );
    w.idle("w-c", "job-a", e, 3, &[0xb3]).unwrap();

    let job = w.core.job("job-a").unwrap();
    assert_eq!(job.ledger.last_epoch, e + 1);
    assert_eq!(
        job.record.workers,
        ["w-b", "w-c", "w-a"],
        "the majority's lowest rank first"
    );
    let a = w.assignment("w-a");
    assert_eq!(a.state_source_rank, 0);
    assert_eq!(a.rank, 2);
    assert_eq!(a.resume_step, 3);
    assert!(!a.resume_from_checkpoint);
}

#[test]
fn a_stopping_group_waits_for_reports_still_on_their_way() {
    let (mut w, e) = two_members();
    w.report("w-a", "job-a", e, 1, &[]).unwrap();
    w.report("w-b", "job-a", e, 1, &[]).unwrap();
    w.report("w-b", "job-a", e, 2, &[]).unwrap();
    // w-a fails a peer; both end after step 2, but w-a's report of step 2 is late.
    let f = protodino_proto::v1::FailureReport {
        worker_id: "w-a".into(),
        job_id: "job-a".into(),
        membership_epoch: e,
        kind: protodino_proto::v1::FailureKind::PeerLost as i32,
        reason: "ring timed out".into(),
        ..Default::default()
    };
    w.apply(|c, now, _, ch| c.report_failure(now, &f, ch))
        .0
        .unwrap();
    assert_eq!(w.state("job-a"), JobState::Recovering);
    w.idle("w-a", "job-a", e, 2, &[1]).unwrap();
    w.idle("w-b", "job-a", e, 2, &[1]).unwrap();
    assert_eq!(
        w.core.job("job-a").unwrap().ledger.last_epoch,
        e,
        "step 2 can still commit"
    );
    assert!(
        w.message("job-a").starts_with("regrouping"),
        "{}",
        w.message("job-a")
    );
    let ack = w.report("w-a", "job-a", e, 2, &[]).unwrap();
    assert_eq!(ack.committed_step, 2);
    assert!(ack.stop);
    // Now nothing more can commit: the next group forms, from the replicas at step 2.
    let job = w.core.job("job-a").unwrap();
    assert_eq!(job.ledger.last_epoch, e + 1);
    assert_eq!(job.ledger.membership.as_ref().unwrap().resume_step, 2);
}
