//! Job ends: success, failure, cancellation, and idempotent submission.

use protodino_proto::v1::{FailureKind, FailureReport, JobSpec, JobState, ResultReport};

use super::*;

fn result(w: &mut World, worker: &str, epoch: i64, json: &str) -> Result<(), Error> {
    let r = ResultReport {
        worker_id: worker.into(),
        job_id: "job-a".into(),
        membership_epoch: epoch,
        result: json.into(),
    };
    w.apply(|c, now, _, ch| c.report_result(now, &r, ch)).0
}

/// `job-a` with 4 steps on `w-a`, `w-b`.
fn running() -> (World, i64) {
    let mut w = World::new();
    w.submit("job-a", 2, 2, 4, 16, 1);
    w.register("a");
    w.register("b");
    let (e, _) = w.start_group("job-a", &["w-a", "w-b"]);
    (w, e)
}

#[test]
fn success_needs_every_step_and_rank_0s_result() {
    let (mut w, e) = running();
    for s in 1..=3 {
        w.report("w-a", "job-a", e, s, &[]).unwrap();
        w.report("w-b", "job-a", e, s, &[]).unwrap();
    }
    // Table: (worker, result) → code, before the last step commits.
    assert_eq!(
        code(&result(&mut w, "w-b", e, "{}").unwrap_err()),
        "FAILED_PRECONDITION"
    );
    assert_eq!(
        code(&result(&mut w, "w-a", e, "not json").unwrap_err()),
        "INVALID_ARGUMENT"
    );
    assert_eq!(
        code(&result(&mut w, "w-a", e - 1, "{}").unwrap_err()),
        "ABORTED"
    );
    // Rank 0's result can come before its peer's last report: the job waits for the step.
    w.report("w-a", "job-a", e, 4, &[]).unwrap();
    result(&mut w, "w-a", e, r#"{"knn_top1": 0.5}"#).unwrap();
    assert_eq!(w.state("job-a"), JobState::Running);
    // Rank 1 finishes its part and goes idle: that is the normal end, not a regroup.
    let ack = w.report("w-b", "job-a", e, 4, &[]).unwrap();
    assert!(ack.stop, "the job is final");
    assert_eq!(w.state("job-a"), JobState::Succeeded);
    let job = &w.core.job("job-a").unwrap().record;
    assert_eq!(job.result, r#"{"knn_top1": 0.5}"#);
    assert_eq!(job.message, "succeeded: 4 steps");
    assert_eq!(w.worker_state("w-a"), "idle");
    assert_eq!(w.worker_state("w-b"), "idle");
    // A retry of the same result is fine; another is not.
    result(&mut w, "w-a", e, r#"{"knn_top1": 0.5}"#).unwrap();
    assert_eq!(
        code(&result(&mut w, "w-a", e, "{}").unwrap_err()),
        "FAILED_PRECONDITION"
    );
}

#[test]
fn peers_finishing_before_rank_0s_report_just_go_idle() {
    let (mut w, e) = running();
    for s in 1..=4 {
        w.report("w-a", "job-a", e, s, &[]).unwrap();
        w.report("w-b", "job-a", e, s, &[]).unwrap();
    }
    assert!(
        w.message("job-a").contains("waiting for rank 0"),
        "{}",
        w.message("job-a")
    );
    w.idle("w-b", "job-a", e, 4, &[1]).unwrap();
    assert_eq!(w.worker_state("w-b"), "idle");
    assert_eq!(w.state("job-a"), JobState::Running, "no regroup at the end");
    result(&mut w, "w-a", e, "{}").unwrap();
    assert_eq!(w.state("job-a"), JobState::Succeeded);
    assert_eq!(
        w.idle("w-b", "job-a", e, 4, &[1]).unwrap(),
        stop(),
        "drop the replica"
    );
    assert_eq!(w.idle("w-b", "", 0, 0, &[]).unwrap(), keep_going());
}

#[test]
fn a_job_failure_fails_the_job_with_its_reason() {
    let (mut w, e) = running();
    let f = FailureReport {
        worker_id: "w-a".into(),
        job_id: "job-a".into(),
        membership_epoch: e,
        reason: "non-finite loss at step 3; replay batch in failures/step-3".into(),
        kind: FailureKind::Job as i32,
        ..Default::default()
    };
    let unspecified = FailureReport {
        kind: 0,
        ..f.clone()
    };
    let got = w
        .apply(|c, now, _, ch| c.report_failure(now, &unspecified, ch))
        .0;
    assert_eq!(code(&got.unwrap_err()), "INVALID_ARGUMENT");
    w.apply(|c, now, _, ch| c.report_failure(now, &f, ch))
        .0
        .unwrap();
    assert_eq!(w.state("job-a"), JobState::Failed);
    assert_eq!(w.message("job-a"), f.reason);
    assert_eq!(w.training("w-b", "job-a", e).unwrap(), stop());
    assert_eq!(w.worker_state("w-b"), "idle");
}

#[test]
fn cancel_frees_the_members_in_the_same_change() {
    let (mut w, e) = running();
    w.report("w-a", "job-a", e, 1, &[]).unwrap();
    let (job, ch) = w.apply(|c, _, _, ch| c.cancel("job-a", "", ch));
    assert_eq!(job.unwrap().state, JobState::Cancelled as i32);
    assert!(ch.jobs.contains("job-a") && ch.ledgers.contains("job-a"));
    assert_eq!(w.message("job-a"), "cancelled by the user");
    assert_eq!(
        (w.worker_state("w-a"), w.worker_state("w-b")),
        ("idle", "idle")
    );
    assert!(w.core.job("job-a").unwrap().ledger.pending.is_empty());
    // Every later call of the old group is told to stop.
    assert_eq!(w.training("w-a", "job-a", e).unwrap(), stop());
    let ack = w.report("w-b", "job-a", e, 1, &[]).unwrap();
    assert!(ack.stop);
    assert_eq!(ack.committed_step, 0, "nothing commits after a final state");
    assert_eq!(w.idle("w-a", "job-a", e, 1, &[1]).unwrap(), stop());
    assert_eq!(w.idle("w-a", "", 0, 0, &[]).unwrap(), keep_going());
    // Cancelling again: a valid request in the wrong state.
    let again = w.apply(|c, _, _, ch| c.cancel("job-a", "again", ch)).0;
    assert_eq!(code(&again.unwrap_err()), "FAILED_PRECONDITION");
    let unknown = w.apply(|c, _, _, ch| c.cancel("job-zz", "", ch)).0;
    assert_eq!(code(&unknown.unwrap_err()), "NOT_FOUND");

    // The freed workers take the next job.
    w.submit("job-b", 2, 2, 4, 16, 1);
    assert_eq!(w.state("job-b"), JobState::Rendezvous);
}

#[test]
fn an_idempotency_key_returns_the_first_job_or_names_the_conflict() {
    let mut w = World::new();
    let spec = |lr: f64| JobSpec {
        preset: "cpu-demo".into(),
        idempotency_key: "k-1".into(),
        optim: Some(protodino_proto::v1::OptimSpec {
            lr: Some(lr),
            ..Default::default()
        }),
        ..Default::default()
    };
    let new = |id: &str, s: JobSpec| {
        let plan = Plan::new(1, 16, 4, 1, 0).unwrap();
        NewJob::new(
            id.into(),
            s,
            "{}".into(),
            Ledger::new(plan, 1, 1, format!("jobs/{id}")),
            prost_types::Timestamp::default(),
        )
    };
    let (first, ch) = {
        let n = new("job-1", spec(1e-3));
        w.apply(|c, _, _, ch| c.submit(n, ch))
    };
    assert_eq!(ch.idempotency, [("k-1".to_string(), "job-1".to_string())]);
    let n = new("job-2", spec(1e-3));
    let again = w.apply(|c, _, _, ch| c.submit(n, ch)).0.unwrap();
    assert_eq!(again.job_id, first.unwrap().job_id);
    let n = new("job-3", spec(2e-3));
    let other = w.apply(|c, _, _, ch| c.submit(n, ch)).0;
    assert_eq!(code(&other.unwrap_err()), "ALREADY_EXISTS");
    assert_eq!(w.core.jobs().count(), 1);
}

/// Finished jobs beyond the newest `RETAIN_FINISHED` leave memory once retired; their
/// figures stay in the snapshot.
#[test]
fn finished_jobs_are_retired_with_their_figures() {
    use crate::core::RETAIN_FINISHED;
    let mut w = World::new();
    let n = RETAIN_FINISHED + 3;
    for i in 0..n {
        let id = format!("j{i:04}");
        w.submit(&id, 1, 1, 4, 16, 1);
        w.apply(|core, _, _, ch| core.cancel(&id, "", ch))
            .0
            .unwrap();
    }
    assert_eq!(
        w.core.jobs().count(),
        n,
        "nothing leaves before it is retired"
    );
    assert_eq!(w.core.retire(), 3);
    assert_eq!(w.core.jobs().count(), RETAIN_FINISHED);
    assert!(w.core.job("j0000").is_none() && w.core.job("j0003").is_some());
    let snap = w.core.snapshot();
    let cancelled = snap
        .jobs_by_state
        .iter()
        .find(|(s, _)| *s == JobState::Cancelled)
        .unwrap()
        .1;
    assert_eq!(cancelled, n as i64);
    assert_eq!(w.core.retire(), 0);
}

/// What `/metrics` takes from the core besides the states: the seconds from a group's
/// formation to its first commit, the committed samples, and the checkpoint records (a
/// repeated report adds none).
#[test]
fn the_snapshot_times_the_rendezvous_and_counts_samples_and_checkpoint_records() {
    let mut w = World::new();
    w.submit("job-a", 2, 2, 4, 16, 1);
    w.register("a");
    w.at(500);
    // The second idle worker: the group forms now.
    w.register("b");
    w.at(1_000);
    let (e, _) = w.start_group("job-a", &["w-a", "w-b"]);
    w.at(3_000);
    w.report("w-a", "job-a", e, 1, &[]).unwrap();
    // The histogram as `/metrics` shows it.
    let rendezvous = |w: &World| {
        let text = crate::metrics::render(&w.core.snapshot(), &Default::default()).unwrap();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .map(|v| v.parse::<f64>().unwrap())
        };
        (
            value("protodino_rendezvous_seconds_count"),
            value("protodino_rendezvous_seconds_sum"),
        )
    };
    assert_eq!(
        rendezvous(&w),
        (Some(0.0), Some(0.0)),
        "step 1 is not committed yet"
    );
    w.report("w-b", "job-a", e, 1, &[]).unwrap();
    assert_eq!(
        rendezvous(&w),
        (Some(1.0), Some(2.5)),
        "formed at 0.5 s, committed at 3 s"
    );
    w.at(4_000);
    for m in ["w-a", "w-b"] {
        w.report(m, "job-a", e, 2, &[]).unwrap();
    }
    assert_eq!(rendezvous(&w), (Some(1.0), Some(2.5)), "one group");
    let snap = w.core.snapshot();
    assert_eq!((snap.committed_steps, snap.committed_samples), (2, 8));

    let checkpoint = |w: &mut World, step: i64| {
        let r = checkpoint_report(e, step, 8, "cd");
        w.apply(|c, now, _, ch| c.report_checkpoint(now, &r, ch))
            .0
            .unwrap();
        w.core.snapshot().checkpoint_records
    };
    assert_eq!(checkpoint(&mut w, 2), 1);
    assert_eq!(checkpoint(&mut w, 2), 1, "the same report again");
    assert_eq!(checkpoint(&mut w, 1), 2);
}
