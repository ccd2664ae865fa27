//! Liveness and regrouping: expiry, lost members, survivors, checkpoints, re-attaching.

use protodino_proto::v1::{CheckpointRef, CheckpointReport, JobState};

use super::*;
use crate::store::LedgerRecord;

fn tick(w: &mut World) {
    w.apply(|c, now, s, ch| c.tick(now, s, ch)).0.unwrap();
}

#[test]
fn a_silent_worker_is_lost_after_the_timeout_and_may_register_again() {
    let mut w = World::new();
    w.register("a");
    w.register("b");
    // (time in ms, heartbeat from w-b?, state of w-a, state of w-b)
    let script: &[(u64, bool, &str, &str)] = &[
        (5_000, true, "idle", "idle"),
        (10_000, false, "idle", "idle"), // exactly the timeout: not yet
        (10_001, false, "lost", "idle"), // w-a silent for longer than 10 s
        (15_001, false, "lost", "lost"), // w-b's last heartbeat was at 5 s
    ];
    for (ms, beat, a, b) in script {
        w.at(*ms);
        if *beat {
            w.idle("w-b", "", 0, 0, &[]).unwrap();
        }
        tick(&mut w);
        assert_eq!(
            (w.worker_state("w-a"), w.worker_state("w-b")),
            (*a, *b),
            "at {ms} ms"
        );
    }
    assert_eq!(
        code(&w.idle("w-a", "", 0, 0, &[]).unwrap_err()),
        "NOT_FOUND"
    );
    // A lost worker's id is free again.
    let id = w
        .register_as(
            Registration {
                name: "a".into(),
                caps: caps("a"),
                worker_id: "w-a".into(),
                ..Default::default()
            },
            "w-new",
        )
        .unwrap();
    assert_eq!(id, "w-a");
    assert_eq!(w.worker_state("w-a"), "idle");
}

#[test]
fn a_lost_member_regroups_the_survivor_with_an_idle_worker() {
    let mut w = World::new();
    w.submit("job-a", 2, 2, 4, 16, 2);
    w.register("a");
    w.register("b");
    let (e, _) = w.start_group("job-a", &["w-a", "w-b"]);
    w.register("c");
    w.report("w-a", "job-a", e, 1, &[]).unwrap();
    w.report("w-b", "job-a", e, 1, &[]).unwrap();
    assert_eq!(w.state("job-a"), JobState::Running);

    // w-b goes silent; w-a and w-c keep beating.
    w.at(6_000);
    w.training("w-a", "job-a", e).unwrap();
    w.idle("w-c", "", 0, 0, &[]).unwrap();
    w.at(12_000);
    w.training("w-a", "job-a", e).unwrap();
    w.idle("w-c", "", 0, 0, &[]).unwrap();
    tick(&mut w);
    assert_eq!(w.worker_state("w-b"), "lost");
    assert_eq!(w.state("job-a"), JobState::Recovering);
    assert!(
        w.message("job-a").contains("w-b lost"),
        "{}",
        w.message("job-a")
    );
    assert_eq!(w.training("w-a", "job-a", e).unwrap(), stop());

    // The survivor stops with a replica of the watermark and is the new source.
    w.idle("w-a", "job-a", e, 1, &[5]).unwrap();
    let job = w.core.job("job-a").unwrap();
    assert_eq!(job.ledger.last_epoch, e + 1);
    assert_eq!(job.record.workers, ["w-a", "w-c"]);
    let a = w.assignment("w-c");
    assert_eq!((a.rank, a.state_source_rank, a.resume_step), (1, 0, 1));
    assert!(!a.resume_from_checkpoint);
    assert_eq!(
        w.core
            .job("job-a")
            .unwrap()
            .record
            .progress
            .unwrap()
            .membership_epoch,
        e + 1
    );
    // Recovering until the new group's first commit, which closes the record.
    assert_eq!(w.state("job-a"), JobState::Recovering);
    let a = w.assignment("w-a");
    assert_eq!(
        keep_going(),
        w.training("w-a", "job-a", a.membership_epoch).unwrap()
    );
    assert_eq!(
        keep_going(),
        w.training("w-c", "job-a", a.membership_epoch).unwrap()
    );
    w.at(13_500);
    w.report("w-a", "job-a", e + 1, 2, &[]).unwrap();
    let (ack, ch) = {
        let r = protodino_proto::v1::StepReport {
            worker_id: "w-c".into(),
            job_id: "job-a".into(),
            membership_epoch: e + 1,
            step: 2,
            sample_digest: w.digest("job-a", 2),
            ..Default::default()
        };
        w.apply(|c, now, _, ch| c.report_step(now, &r, ch))
    };
    assert!(!ack.unwrap().stop);
    assert_eq!(w.state("job-a"), JobState::Running);
    let r = &w.core.job("job-a").unwrap().record.recoveries;
    assert_eq!(r.len(), 1);
    let r = &r[0];
    assert_eq!(r.reason, "heartbeat_expired");
    assert_eq!(r.members_before, ["w-a", "w-b"]);
    assert_eq!(r.members_after, ["w-a", "w-c"]);
    assert_eq!((r.epoch_before, r.epoch_after), (e, e + 1));
    assert_eq!((r.resumed_from.as_str(), r.resume_step), ("replica", 1));
    assert_eq!(r.steps_redone, 0);
    // Detected at the tick of 12 s, first commit at 13.5 s.
    assert!((r.seconds - 1.5).abs() < 1e-6, "{}", r.seconds);
    assert_eq!(ch.recovered.len(), 1);
    let snap = w.core.snapshot();
    assert_eq!(snap.recoveries.by_reason["heartbeat_expired"], 1);
}

/// `w-a` and `w-b` keep training (heartbeats at 6 s and 11 s) while `w-c` is silent; the tick
/// at 11 s loses it.
fn silence_w_c(w: &mut World, e: i64) {
    for t in [6_000, 11_000] {
        w.at(t);
        for m in ["w-a", "w-b"] {
            w.training(m, "job-a", e).unwrap();
        }
    }
    tick(w);
}

/// Three members at step 1 of `job-a` (max world `max`), with `w-a`, `w-b`, `w-c`.
fn running_three(w: &mut World, max: i32) -> i64 {
    for n in ["a", "b", "c"] {
        w.register(n);
    }
    w.submit("job-a", 2, max, 12, 48, 2);
    let (e, _) = w.start_group("job-a", &["w-a", "w-b", "w-c"]);
    for m in ["w-a", "w-b", "w-c"] {
        w.report(m, "job-a", e, 1, &[]).unwrap();
    }
    assert_eq!(w.state("job-a"), JobState::Running);
    e
}

#[test]
fn a_worker_that_registers_mid_job_joins_at_the_next_step_boundary() {
    let mut w = World::new();
    let e = running_three(&mut w, 4);
    w.register("d");
    // The group is told to stop (a planned regroup, not a recovery) and re-forms with w-d.
    assert_eq!(w.state("job-a"), JobState::Rendezvous);
    assert!(
        w.message("job-a").contains("w-d joins (world 3 → 4)"),
        "{}",
        w.message("job-a")
    );
    let ack = w.report("w-a", "job-a", e, 2, &[]).unwrap();
    assert!(ack.stop);
    for m in ["w-b", "w-c"] {
        assert!(w.report(m, "job-a", e, 2, &[]).unwrap().stop);
    }
    assert_eq!(w.watermark("job-a"), 2);
    for m in ["w-a", "w-b", "w-c"] {
        w.idle(m, "job-a", e, 2, &[9]).unwrap();
    }
    let job = w.core.job("job-a").unwrap();
    assert_eq!(job.record.workers, ["w-a", "w-b", "w-c", "w-d"]);
    let a = w.assignment("w-d");
    assert_eq!(
        (a.rank, a.world_size, a.state_source_rank, a.resume_step),
        (3, 4, 0, 2)
    );
    assert!(!a.replicas_in_sync, "the newcomer needs the state");
    let r = &w.core.job("job-a").unwrap().record.recoveries[0];
    assert_eq!((r.reason.as_str(), r.members_after.len()), ("joined", 4));
    // At max_world_size a fifth worker stays idle.
    w.register("e");
    assert_eq!(w.worker_state("w-e"), "idle");
}

#[test]
fn joins_wait_out_the_cooldown_after_a_failure() {
    let mut w = World::new();
    let e = running_three(&mut w, 3);
    silence_w_c(&mut w, e);
    assert_eq!(w.worker_state("w-c"), "lost");
    for m in ["w-a", "w-b"] {
        w.idle(m, "job-a", e, 1, &[9]).unwrap();
    }
    let e2 = e + 1;
    for m in ["w-a", "w-b"] {
        let a = w.assignment(m);
        assert_eq!(a.membership_epoch, e2);
        w.training(m, "job-a", e2).unwrap();
    }
    for m in ["w-a", "w-b"] {
        w.report(m, "job-a", e2, 2, &[]).unwrap();
    }
    assert_eq!(w.state("job-a"), JobState::Running);
    // w-c comes back as a fresh worker within the cooldown: it waits as a spare...
    w.at(20_000);
    w.register("c2");
    assert_eq!(w.state("job-a"), JobState::Running);
    assert_eq!(w.worker_state("w-c2"), "idle");
    // ...and joins once the cooldown since the failure (detected at 11 s) is over.
    w.at(11_000 + COOLDOWN.as_millis() as u64);
    for m in ["w-a", "w-b"] {
        w.training(m, "job-a", e2).unwrap();
    }
    w.idle("w-c2", "", 0, 0, &[]).unwrap();
    assert_eq!(w.state("job-a"), JobState::Rendezvous);
    assert!(
        w.message("job-a").contains("w-c2 joins (world 2 → 3)"),
        "{}",
        w.message("job-a")
    );
}

#[test]
fn without_a_surviving_replica_the_group_resumes_from_the_newest_checkpoint() {
    let mut w = World::new();
    w.submit("job-a", 1, 1, 4, 16, 2);
    w.register("a");
    let (e, _) = w.start_group("job-a", &["w-a"]);
    for s in 1..=3 {
        w.report("w-a", "job-a", e, s, &[]).unwrap();
    }
    for step in [1, 2, 4] {
        let r = checkpoint_report(e, step, 6, "ab");
        w.apply(|c, now, _, ch| c.report_checkpoint(now, &r, ch))
            .0
            .unwrap();
    }
    let steps: Vec<i64> = w
        .core
        .job("job-a")
        .unwrap()
        .record
        .checkpoints
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, [2, 4], "checkpoint_keep = 2");

    // The only member dies; a fresh worker takes over.
    w.register("b");
    w.at(11_000);
    w.idle("w-b", "", 0, 0, &[]).unwrap();
    tick(&mut w);
    let a = w.assignment("w-b");
    assert_eq!(a.membership_epoch, e + 1);
    // The watermark is 3: the checkpoint of step 4 holds uncommitted steps, step 2 is newest.
    assert!(a.resume_from_checkpoint);
    assert_eq!(a.resume_step, 2);
    assert_eq!(w.watermark("job-a"), 3, "the watermark never goes back");
    // Redone steps are acknowledged as committed; the next new one commits.
    assert_eq!(
        w.report("w-b", "job-a", e + 1, 3, &[])
            .unwrap()
            .committed_step,
        3
    );
    assert_eq!(
        w.report("w-b", "job-a", e + 1, 4, &[])
            .unwrap()
            .committed_step,
        4
    );
}

#[test]
fn checkpoints_outside_the_job_directory_or_from_other_ranks_are_refused() {
    let mut w = World::new();
    w.submit("job-a", 2, 2, 4, 16, 2);
    w.register("a");
    w.register("b");
    let (e, _) = w.start_group("job-a", &["w-a", "w-b"]);
    let cases: &[(&str, &str, &str, &str)] = &[
        ("w-a", "jobs/job-a/c.safetensors", "ab", "INVALID_ARGUMENT"), // bad sha256
        ("w-a", "jobs/job-b/c.safetensors", "", "INVALID_ARGUMENT"),
        ("w-a", "jobs/job-a/../job-b/c", "", "INVALID_ARGUMENT"),
        ("w-a", "/jobs/job-a/c", "", "INVALID_ARGUMENT"),
        ("w-a", "jobs/job-a", "", "INVALID_ARGUMENT"),
        ("w-b", "jobs/job-a/c.safetensors", "", "FAILED_PRECONDITION"), // rank 1
    ];
    for (worker, uri, sha, want) in cases {
        let sha = if sha.is_empty() {
            "0f".repeat(32)
        } else {
            sha.to_string()
        };
        let r = CheckpointReport {
            worker_id: worker.to_string(),
            job_id: "job-a".into(),
            membership_epoch: e,
            checkpoint: Some(CheckpointRef {
                step: 1,
                epoch: 0,
                uri: uri.to_string(),
                sha256: sha,
            }),
        };
        let got = w.apply(|c, now, _, ch| c.report_checkpoint(now, &r, ch)).0;
        assert_eq!(code(&got.unwrap_err()), *want, "{worker} {uri}");
    }
}

/// What a restart hands the core: every record through its stored form.
fn restart(w: &World) -> World {
    let jobs = w
        .core
        .jobs()
        .map(|e| {
            let stored = LedgerRecord::from(&e.ledger);
            (
                e.record.clone(),
                Some(stored.into_ledger(&e.record.job_id).unwrap()),
            )
        })
        .collect();
    let mut ch = Changes::default();
    let core = Core::restore(
        w.core.config().clone(),
        w.now,
        jobs,
        Default::default(),
        Default::default(),
        &mut ch,
    );
    World {
        core,
        t0: w.t0,
        now: w.now,
        drawn: 100,
    }
}

fn rejoin(w: &mut World, id: &str, job: &str, epoch: i64, step: i64) -> String {
    w.register_as(
        Registration {
            name: id.into(),
            caps: caps(id),
            worker_id: id.into(),
            job_id: job.into(),
            membership_epoch: epoch,
            committed_step: step,
        },
        "w-fresh",
    )
    .unwrap()
}

#[test]
fn members_re_attach_after_a_restart_and_pending_reports_commit() {
    let mut w = World::new();
    w.submit("job-a", 2, 2, 4, 16, 2);
    w.register("a");
    w.register("b");
    let (e, _) = w.start_group("job-a", &["w-a", "w-b"]);
    w.report("w-a", "job-a", e, 1, &[]).unwrap();
    w.report("w-b", "job-a", e, 1, &[]).unwrap();
    w.report("w-a", "job-a", e, 2, &[]).unwrap();

    let mut w = restart(&w);
    assert_eq!(w.state("job-a"), JobState::Running);
    assert_eq!(w.watermark("job-a"), 1);
    assert_eq!(
        code(&w.training("w-a", "job-a", e).unwrap_err()),
        "NOT_FOUND"
    );
    assert_eq!(rejoin(&mut w, "w-a", "job-a", e, 2), "w-a");
    assert_eq!(rejoin(&mut w, "w-b", "job-a", e, 1), "w-b");
    assert_eq!(w.worker_state("w-a"), "training");
    assert_eq!(w.training("w-a", "job-a", e).unwrap(), keep_going());
    // w-a's report of step 2 survived the restart: w-b's completes it.
    assert_eq!(
        w.report("w-b", "job-a", e, 2, &[]).unwrap().committed_step,
        2
    );
    assert_eq!(
        w.core.job("job-a").unwrap().ledger.last_epoch,
        e,
        "same group"
    );
}

#[test]
fn a_restored_member_that_comes_back_without_its_session_regroups() {
    let mut w = World::new();
    w.submit("job-a", 2, 2, 4, 16, 2);
    w.register("a");
    w.register("b");
    let (e, _) = w.start_group("job-a", &["w-a", "w-b"]);
    w.report("w-a", "job-a", e, 1, &[]).unwrap();
    w.report("w-b", "job-a", e, 1, &[]).unwrap();
    let mut w = restart(&w);
    rejoin(&mut w, "w-a", "job-a", e, 1);
    // w-b restarted too and lost its session: its old id is free, but the group is gone.
    assert_eq!(rejoin(&mut w, "w-b", "", 0, 0), "w-b");
    assert_eq!(w.state("job-a"), JobState::Recovering);
    w.idle("w-b", "", 0, 0, &[]).unwrap();
    assert_eq!(w.training("w-a", "job-a", e).unwrap(), stop());
    w.idle("w-a", "job-a", e, 1, &[3]).unwrap();
    let job = w.core.job("job-a").unwrap();
    assert_eq!(job.ledger.last_epoch, e + 1);
    assert_eq!(job.record.workers, ["w-a", "w-b"]);
}

#[test]
fn an_id_in_use_gets_a_new_one_and_a_restored_member_that_never_returns_expires() {
    let mut w = World::new();
    w.submit("job-a", 1, 1, 4, 16, 2);
    w.register("a");
    let (e, _) = w.start_group("job-a", &["w-a"]);
    assert_eq!(
        rejoin(&mut w, "w-a", "job-a", e, 0),
        "w-fresh",
        "w-a is alive"
    );

    let mut w = restart(&w);
    w.at(10_001);
    tick(&mut w);
    assert_eq!(w.worker_state("w-a"), "lost");
    assert_eq!(w.state("job-a"), JobState::Rendezvous);
}

#[test]
fn a_registered_worker_joins_a_group_only_once_a_heartbeat_described_its_replica() {
    let mut w = World::new();
    w.submit("job-a", 2, 2, 4, 16, 2);
    w.register("a");
    w.register("b");
    let (e, _) = w.start_group("job-a", &["w-a", "w-b"]);
    w.report("w-a", "job-a", e, 1, &[]).unwrap();
    w.report("w-b", "job-a", e, 1, &[]).unwrap();
    // w-b dies; w-a stops with its replica; the job waits for a second worker.
    w.at(6_000);
    w.training("w-a", "job-a", e).unwrap();
    w.at(12_000);
    w.training("w-a", "job-a", e).unwrap();
    tick(&mut w);
    w.idle("w-a", "job-a", e, 1, &[9]).unwrap();
    assert!(
        w.message("job-a")
            .starts_with("waiting for workers: 1 idle"),
        "{}",
        w.message("job-a")
    );

    // After a restart, a fresh worker and w-a (idle, so no session to re-attach) register.
    let mut w = restart(&w);
    w.register("c");
    assert_eq!(rejoin(&mut w, "w-a", "", 0, 0), "w-a");
    assert_eq!(
        w.core.job("job-a").unwrap().ledger.last_epoch,
        e,
        "no group before w-a says what it holds"
    );
    w.idle("w-a", "job-a", e, 1, &[9]).unwrap();
    assert_eq!(w.core.job("job-a").unwrap().record.workers, ["w-a", "w-c"]);
    let a = w.assignment("w-c");
    assert_eq!(a.membership_epoch, e + 1);
    assert_eq!(
        a.resume_step, 1,
        "from w-a's replica, not a checkpoint or the seed"
    );
    assert!(!a.resume_from_checkpoint);
}

#[test]
fn survivors_past_the_watermark_resume_from_their_step_and_commit_it() {
    let mut w = World::new();
    let e = running_three(&mut w, 3);
    // Step 2 completed on every member, but w-c died before reporting it.
    w.report("w-a", "job-a", e, 2, &[]).unwrap();
    w.report("w-b", "job-a", e, 2, &[]).unwrap();
    assert_eq!(w.watermark("job-a"), 1);
    silence_w_c(&mut w, e);
    assert_eq!(w.state("job-a"), JobState::Recovering);
    for m in ["w-a", "w-b"] {
        w.idle(m, "job-a", e, 2, &[7]).unwrap();
    }
    assert_eq!(w.watermark("job-a"), 2);
    let a = w.assignment("w-b");
    assert_eq!((a.resume_step, a.world_size), (2, 2));
    assert!(a.replicas_in_sync, "both survivors hold step 2 with hash 7");
    assert!(!a.resume_from_checkpoint);
    let job = w.core.job("job-a").unwrap();
    assert_eq!(job.record.progress.unwrap().step, 2);
    let r = &job.record.recoveries[0];
    assert_eq!(
        (r.resumed_from.as_str(), r.resume_step, r.steps_redone),
        ("replica", 2, 0)
    );
}

#[test]
fn a_silent_member_of_a_stopping_group_is_lost_after_the_stop_grace() {
    let mut w = World::new();
    let e = running_three(&mut w, 3);
    // w-c died; w-a saw its peer go and reports it at 1 s. w-a and w-b keep beating.
    w.at(1_000);
    let f = protodino_proto::v1::FailureReport {
        worker_id: "w-a".into(),
        job_id: "job-a".into(),
        membership_epoch: e,
        last_committed_step: 1,
        reason: "peer rank 2 disconnected".into(),
        kind: protodino_proto::v1::FailureKind::PeerLost as i32,
        ..Default::default()
    };
    w.apply(|c, now, _, ch| c.report_failure(now, &f, ch))
        .0
        .unwrap();
    for m in ["w-a", "w-b"] {
        w.idle(m, "job-a", e, 1, &[4]).unwrap();
    }
    tick(&mut w);
    assert_eq!(w.worker_state("w-c"), "training", "within the grace");
    // Last heard of at 0 s: lost once silent for longer than the grace, long before the
    // heartbeat timeout.
    w.at(STOP_GRACE.as_millis() as u64 + 100);
    for m in ["w-a", "w-b"] {
        w.idle(m, "job-a", e, 1, &[4]).unwrap();
    }
    tick(&mut w);
    assert_eq!(w.worker_state("w-c"), "lost");
    let job = w.core.job("job-a").unwrap();
    assert_eq!(job.record.workers, ["w-a", "w-b"]);
    assert_eq!(job.ledger.last_epoch, e + 1);
}

#[test]
fn an_assignment_lost_on_its_way_lapses_when_the_group_stops() {
    let mut w = World::new();
    w.register("a");
    w.register("b");
    w.submit("job-a", 2, 2, 4, 16, 1);
    // Both assignments go out; w-b's response is lost (it never starts the session).
    let a = w.assignment("w-a");
    let _lost = w.assignment("w-b");
    w.training("w-a", "job-a", a.membership_epoch).unwrap();
    // w-a cannot form the group without w-b and reports it.
    let f = protodino_proto::v1::FailureReport {
        worker_id: "w-a".into(),
        job_id: "job-a".into(),
        membership_epoch: a.membership_epoch,
        reason: "forming the group: w-b never connected".into(),
        kind: protodino_proto::v1::FailureKind::PeerLost as i32,
        ..Default::default()
    };
    w.apply(|c, now, _, ch| c.report_failure(now, &f, ch))
        .0
        .unwrap();
    w.idle("w-a", "job-a", a.membership_epoch, 0, &[]).unwrap();
    // w-b, still idle without a session, is told to keep going (not INTERNAL), is idle, and
    // the group re-forms with both.
    assert_eq!(w.idle("w-b", "", 0, 0, &[]).unwrap(), keep_going());
    tick(&mut w);
    let job = w.core.job("job-a").unwrap();
    assert_eq!(
        job.ledger.last_epoch,
        a.membership_epoch + 1,
        "{}",
        job.record.message
    );
    assert_eq!(job.record.workers.len(), 2);
}
