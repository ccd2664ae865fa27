//! Queueing, world sizes and rendezvous.

use protodino_proto::v1::JobState;

use super::*;
use crate::core::quorum::{Candidate, Holding, choose, world_size};

/// (min, max, global batch, idle) → world size, or the start of the reason.
type WorldCase = (i32, i32, u64, usize, Result<usize, &'static str>);

#[test]
fn world_size_is_as_large_as_allowed_and_shares_may_be_uneven() {
    let cases: &[WorldCase] = &[
        (1, 1, 8, 3, Ok(1)),
        (2, 4, 8, 4, Ok(4)),
        (2, 4, 8, 3, Ok(3)),
        (1, 4, 6, 4, Ok(4)),
        (1, 8, 12, 5, Ok(5)),
        // At most one member per sample.
        (1, 8, 3, 5, Ok(3)),
        (2, 2, 4, 1, Err("waiting for workers: 1 idle, needs 2")),
        (3, 3, 2, 5, Err("no group can form")),
        (1, 4, 7, 0, Err("waiting for workers: 0 idle, needs 1")),
    ];
    for (min, max, g, idle, want) in cases {
        let got = world_size(*min, *max, *g, *idle);
        match (want, &got) {
            (Ok(w), Ok(g)) => assert_eq!(w, g, "{min} {max} {g} {idle}"),
            (Err(start), Err(reason)) => assert!(reason.starts_with(start), "{reason}"),
            _ => panic!("({min}, {max}, {g}, {idle}): {got:?}, wanted {want:?}"),
        }
    }
}

fn cand(id: &str, old_rank: Option<usize>, holding: Holding) -> Candidate {
    Candidate {
        id: id.into(),
        old_rank,
        holding,
    }
}

#[test]
fn the_source_is_in_the_largest_class_of_equal_hashes() {
    let v = |h: u8| Holding::Valid {
        step: 4,
        hash: vec![h],
    };
    // (candidates, max world) → members in rank order (rank 0 is the source), from a replica?
    let cases: Vec<(Vec<Candidate>, i32, Vec<&str>, bool)> = vec![
        // Majority {b, c} with hash 2; old rank 0 (a) is the minority.
        (
            vec![
                cand("a", Some(0), v(1)),
                cand("b", Some(1), v(2)),
                cand("c", Some(2), v(2)),
            ],
            3,
            vec!["b", "c", "a"],
            true,
        ),
        // A tie between two classes of one: the lowest old rank wins.
        (
            vec![cand("a", Some(1), v(1)), cand("b", Some(0), v(2))],
            2,
            vec!["b", "a"],
            true,
        ),
        // Replicas first, then fresh workers, then holders of another job's replica.
        (
            vec![
                cand("x", None, Holding::Other),
                cand("f", None, Holding::Nothing),
                cand("s", Some(1), v(9)),
            ],
            3,
            vec!["s", "f", "x"],
            true,
        ),
        // No replica: fresh workers in id order, rank 0 starts from its own state.
        (
            vec![
                cand("b", None, Holding::Nothing),
                cand("a", None, Holding::Nothing),
            ],
            2,
            vec!["a", "b"],
            false,
        ),
        // The world is cut to max: the winner's class is kept.
        (
            vec![
                cand("a", Some(0), v(1)),
                cand("b", Some(1), v(2)),
                cand("c", Some(2), v(2)),
                cand("d", None, Holding::Nothing),
            ],
            2,
            vec!["b", "c"],
            true,
        ),
        // A replica one step past the others completed a step whose reports did not all
        // arrive: it is the newest state and wins over a larger class.
        (
            vec![
                cand("a", Some(0), v(1)),
                cand("b", Some(1), v(1)),
                cand(
                    "c",
                    Some(2),
                    Holding::Valid {
                        step: 5,
                        hash: vec![3],
                    },
                ),
            ],
            3,
            vec!["c", "a", "b"],
            true,
        ),
    ];
    for (candidates, max, want, from_replica) in cases {
        let q = choose(1, max, 12, candidates).unwrap();
        assert_eq!(q.members, want);
        assert_eq!(q.source_rank, 0);
        assert_eq!(q.source_step.is_some(), from_replica, "{want:?}");
        // In sync only when every member is of the winning class: here, the cut to max.
        assert_eq!(q.in_sync, want == ["b", "c"], "{want:?}");
    }
}

#[test]
fn fifo_queue_waits_for_the_head_and_says_why() {
    let mut w = World::new();
    w.submit("job-a", 2, 2, 4, 16, 1);
    w.submit("job-b", 1, 1, 4, 16, 1);
    w.register("a");
    assert_eq!(w.state("job-a"), JobState::Queued);
    assert_eq!(w.message("job-a"), "waiting for workers: 1 idle, needs 2");
    // The head holds back the job behind it, although that one could start.
    assert_eq!(w.state("job-b"), JobState::Queued);
    assert_eq!(w.message("job-b"), "queued: behind job-a");

    w.register("b");
    assert_eq!(w.state("job-a"), JobState::Rendezvous);
    assert_eq!(
        w.message("job-a"),
        "rendezvous: epoch 1, 2 workers (w-a, w-b), from the seed"
    );
    assert_eq!(w.core.job("job-a").unwrap().record.workers, ["w-a", "w-b"]);
    assert_eq!(w.message("job-b"), "waiting for workers: 0 idle, needs 1");

    w.register("c");
    assert_eq!(w.state("job-b"), JobState::Rendezvous);
    assert_eq!(w.core.job("job-b").unwrap().record.workers, ["w-c"]);
}

#[test]
fn rendezvous_hands_every_member_the_same_group() {
    let mut w = World::new();
    for n in ["a", "b", "c", "d"] {
        w.register(n);
    }
    // 4 idle workers, max 3.
    w.submit("job-a", 2, 3, 6, 60, 1);
    let members = w.core.job("job-a").unwrap().record.workers.clone();
    assert_eq!(members, ["w-a", "w-b", "w-c"]);
    assert_eq!(w.worker_state("w-d"), "idle");
    let a: Vec<_> = members.iter().map(|m| w.assignment(m)).collect();
    for (rank, x) in a.iter().enumerate() {
        assert_eq!(x.rank, rank as i32);
        assert_eq!(x.world_size, 3);
        assert_eq!(x.membership_epoch, 1);
        assert_eq!(x.peers, ["a:7000", "b:7000", "c:7000"]);
        assert_eq!(x.group_secret, vec![1u8; 32]);
        assert!(x.nccl_unique_id.is_empty());
        assert_eq!(x.total_steps, 10);
        assert_eq!(x.dataset_size, 60);
        assert_eq!(x.global_batch, 6);
        assert_eq!(x.hash_every_steps, 2);
        assert_eq!(x.checkpoint_dir, "jobs/job-a");
        assert_eq!(x.resume_step, 0);
        assert_eq!(x.state_source_rank, 0);
        assert!(!x.resume_from_checkpoint);
        assert!(!x.replicas_in_sync);
    }
    assert_eq!(w.worker_state("w-a"), "assigned");
    // A TRAINING heartbeat of the assigned session makes it training.
    assert_eq!(w.training("w-a", "job-a", 1).unwrap(), keep_going());
    assert_eq!(w.worker_state("w-a"), "training");
    // An assigned worker still idle gets its assignment again (the response may be lost).
    assert_eq!(w.assignment("w-b").rank, 1);
}

#[test]
fn unfinished_epochs_only_go_up() {
    let mut w = World::new();
    w.submit("job-a", 1, 1, 4, 16, 2);
    w.register("a");
    let (e1, _) = w.start_group("job-a", &["w-a"]);
    w.report("w-a", "job-a", e1, 1, &[]).unwrap();
    // The member goes idle mid-training: the group stops and re-forms under a higher epoch.
    w.idle("w-a", "job-a", e1, 1, &[7]).unwrap();
    let e2 = w.core.job("job-a").unwrap().ledger.last_epoch;
    assert!(e2 > e1, "{e2} > {e1}");
    let a = w.assignment("w-a");
    assert_eq!(a.membership_epoch, e2);
    assert_eq!(
        a.resume_step, 1,
        "resumes from its replica at the watermark"
    );
    assert_eq!(a.group_secret, vec![2u8; 32], "a fresh secret per epoch");
}
