//! Fault tolerance end to end: the real coordinator and `protodino worker` processes on
//! loopback, real SIGKILL / SIGSTOP / SIGCONT, real checkpoints. Every disturbed job must end
//! with the parameters of the undisturbed job (one process with the same global batch) and an
//! audit file showing every sample once per epoch.
//!
//! - one of three members killed mid-epoch (rank 1, and rank 0 — the checkpoint writer and the
//!   state source): the survivors heal in memory at world 2, nobody reloads from disk;
//! - a fourth worker registering mid-job joins at a step boundary and its replica hash matches;
//! - a member stopped with SIGSTOP is evicted, and after SIGCONT learns its epoch is stale and
//!   waits as a spare;
//! - every worker killed: the job restarts from its last checkpoint once workers return;
//! - the checkpoint writer killed in the middle of writing: the previous checkpoint stays intact
//!   and listed, and every listed checkpoint loads and matches its SHA-256.

use std::cell::RefCell;
use std::time::Instant;

use protodino_proto::v1::JobState;
use protodino_tests::cluster::{
    Coordinator, Roots, Worker, audit_exactly_once, get, job_dir, state, submit, wait_for,
};
use protodino_tests::faults::{
    BATCH, STEPS, assert_equal_to_undisturbed, assert_listed_checkpoints_load, failures, finish,
    job_spec, print_recoveries, process_of, record_state,
};
use protodino_tests::scenario::{MINUTES, runtime, step_of, wait_idle};

fn start_workers(
    roots: &Roots,
    coordinator: &Coordinator,
    names: &[&str],
    extra: &[&str],
) -> Vec<Worker> {
    names
        .iter()
        .map(|n| Worker::start_with(roots, &coordinator.url(), n, &[], extra))
        .collect()
}

/// A coordinator (with `coordinator_extra` flags) and `names` workers (with `worker_extra`),
/// all idle and described when it returns; the directory lives as long as the first value.
fn service(
    coordinator_extra: &[&str],
    names: &[&str],
    worker_extra: &[&str],
) -> (tempfile::TempDir, Roots, Coordinator, Vec<Worker>) {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let coordinator = Coordinator::start(&roots, "127.0.0.1:0", coordinator_extra);
    let workers = start_workers(&roots, &coordinator, names, worker_extra);
    wait_idle(&coordinator, names.len());
    (dir, roots, coordinator, workers)
}

const THREE: [&str; 3] = ["worker-a", "worker-b", "worker-c"];

fn kill_one_of_three(victim_rank: usize) {
    let (_dir, roots, coordinator, mut workers) = service(&[], &THREE, &[]);
    let seen = RefCell::new(Vec::new());
    runtime().block_on(async {
        let mut jobs = coordinator.jobs().await;
        let job = submit(&mut jobs, job_spec(2, 3)).await;
        let running = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "step 5", |j| {
            state(j) == JobState::Running && step_of(j) >= 5
        })
        .await;
        assert_eq!(running.workers.len(), 3, "{running:?}");
        let victim = process_of(&workers, &running.workers[victim_rank]);
        let killed_at = Instant::now();
        workers[victim].kill9();
        let healed = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "the recovery", |j| {
            record_state(&seen, j);
            failures(j).iter().any(|r| r.seconds >= 0.0)
        })
        .await;
        eprintln!(
            "kill -9 of rank {victim_rank} → next committed step: {:.2} s",
            killed_at.elapsed().as_secs_f64()
        );
        let done = finish(&mut jobs, &job.job_id, &seen).await;
        print_recoveries(&done);
        eprintln!("states: {:?}", seen.borrow());
        assert!(
            seen.borrow().contains(&JobState::Recovering),
            "{:?}",
            seen.borrow()
        );
        let p = done.progress.unwrap();
        assert_eq!((p.step, p.world_size), (STEPS, 2), "{p:?}");
        let r = failures(&healed)[0];
        assert_eq!(r.members_before.len(), 3);
        assert_eq!(r.members_after.len(), 2);
        assert!(!r.members_after.contains(&running.workers[victim_rank]));
        assert_eq!(r.resumed_from, "replica", "{r:?}");
        assert!(r.steps_redone <= 1, "{r:?}");
        assert_eq!(
            audit_exactly_once(&job_dir(&roots, &done).join("steps.jsonl"), BATCH as usize),
            STEPS as usize
        );
        assert_eq!(p.replica_mismatches, 0);
        assert_equal_to_undisturbed(&roots, &done);
    });
    // No survivor reloaded from disk.
    for (i, w) in workers.iter().enumerate() {
        let log = w.log_text();
        assert!(
            !log.contains("resumed from"),
            "worker {i} reloaded a checkpoint:\n{log}"
        );
    }
}

#[test]
fn a_member_killed_mid_epoch_is_healed_in_memory_and_the_job_ends_as_undisturbed() {
    kill_one_of_three(1);
}

#[test]
fn losing_rank_0_the_checkpoint_writer_and_state_source_is_an_ordinary_recovery() {
    kill_one_of_three(0);
}

#[test]
fn a_worker_registering_mid_job_joins_with_the_state_and_a_matching_hash() {
    let (_dir, roots, coordinator, _workers) = service(&["--hash-every-steps", "2"], &THREE, &[]);
    let seen = RefCell::new(Vec::new());
    runtime().block_on(async {
        let mut jobs = coordinator.jobs().await;
        let job = submit(&mut jobs, job_spec(2, 4)).await;
        wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "step 3", |j| {
            state(j) == JobState::Running && step_of(j) >= 3
        })
        .await;
        let late = Worker::start(&roots, &coordinator.url(), "worker-d", &[]);
        let late_id = late.worker_id();
        let joined = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "the join", |j| {
            j.workers.len() == 4 && state(j) == JobState::Running
        })
        .await;
        assert!(joined.workers.contains(&late_id), "{joined:?}");
        let done = finish(&mut jobs, &job.job_id, &seen).await;
        print_recoveries(&done);
        let p = done.progress.unwrap();
        assert_eq!((p.step, p.world_size), (STEPS, 4), "{p:?}");
        // Hashes are compared every 2 steps: the newcomer's replica matched at each.
        assert_eq!(p.replica_mismatches, 0, "{p:?}");
        let r = done
            .recoveries
            .iter()
            .find(|r| r.members_after.contains(&late_id) && !r.members_before.contains(&late_id))
            .unwrap_or_else(|| panic!("no join of {late_id}: {:?}", done.recoveries));
        assert_eq!(r.reason, "joined");
        assert_eq!(r.members_after.len(), r.members_before.len() + 1);
        assert_eq!(r.resumed_from, "replica");
        assert!(failures(&done).is_empty(), "{:?}", done.recoveries);
        assert_eq!(
            audit_exactly_once(&job_dir(&roots, &done).join("steps.jsonl"), BATCH as usize),
            STEPS as usize
        );
        assert_equal_to_undisturbed(&roots, &done);
        drop(late);
    });
}

#[test]
fn a_stopped_member_is_evicted_and_after_sigcont_waits_as_a_spare() {
    // Joins only after a minute: the woken worker stays a spare for the rest of the job.
    let (_dir, roots, coordinator, workers) = service(
        &["--join-cooldown-ms", "60000"],
        &THREE,
        &["--collective-timeout-ms", "2000"],
    );
    let seen = RefCell::new(Vec::new());
    let victim = runtime().block_on(async {
        let mut jobs = coordinator.jobs().await;
        let job = submit(&mut jobs, job_spec(2, 3)).await;
        let running = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "step 4", |j| {
            state(j) == JobState::Running && step_of(j) >= 4
        })
        .await;
        let victim_id = running.workers[1].clone();
        let index = process_of(&workers, &victim_id);
        let victim = &workers[index];
        let stopped_at = Instant::now();
        victim.signal(libc::SIGSTOP);
        let healed = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "the eviction", |j| {
            failures(j).iter().any(|r| r.seconds >= 0.0)
        })
        .await;
        eprintln!(
            "SIGSTOP → next committed step at world {}: {:.2} s",
            healed.workers.len(),
            stopped_at.elapsed().as_secs_f64()
        );
        assert!(!healed.workers.contains(&victim_id), "{healed:?}");
        victim.signal(libc::SIGCONT);
        let done = finish(&mut jobs, &job.job_id, &seen).await;
        print_recoveries(&done);
        let p = done.progress.unwrap();
        assert_eq!((p.step, p.world_size), (STEPS, 2), "{p:?}");
        assert_eq!(p.replica_mismatches, 0);
        assert_eq!(
            audit_exactly_once(&job_dir(&roots, &done).join("steps.jsonl"), BATCH as usize),
            STEPS as usize
        );
        assert_equal_to_undisturbed(&roots, &done);
        index
    });
    // The woken worker learned that its epoch was gone and registered again: with the two
    // others it is one of three idle workers.
    wait_idle(&coordinator, 3);
    let log = workers[victim].log_text();
    assert!(
        log.matches("registered as").count() >= 2,
        "the stopped worker did not register again:\n{log}"
    );
}

#[test]
fn with_every_worker_killed_the_job_restarts_from_its_checkpoint_and_ends_as_undisturbed() {
    let (_dir, roots, coordinator, mut first) = service(&[], &THREE, &[]);
    let seen = RefCell::new(Vec::new());
    runtime().block_on(async {
        let mut jobs = coordinator.jobs().await;
        let mut s = job_spec(2, 3);
        s.checkpoint_every_steps = Some(5);
        let job = submit(&mut jobs, s).await;
        let before = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "a checkpoint", |j| {
            step_of(j) >= 7 && !j.checkpoints.is_empty()
        })
        .await;
        for w in &mut first {
            w.kill9();
        }
        let after_kill = get(&mut jobs, &job.job_id).await;
        let second = start_workers(
            &roots,
            &coordinator,
            &["worker-d", "worker-e", "worker-f"],
            &[],
        );
        let done = finish(&mut jobs, &job.job_id, &seen).await;
        print_recoveries(&done);
        let p = done.progress.unwrap();
        assert_eq!(p.step, STEPS);
        for c in &before.checkpoints {
            assert!(done.checkpoints.iter().any(|d| d.step >= c.step));
        }
        let restart = failures(&done)
            .into_iter()
            .find(|r| r.resumed_from == "checkpoint")
            .unwrap_or_else(|| panic!("no restart from a checkpoint: {:?}", done.recoveries));
        let watermark = step_of(&after_kill);
        assert!(
            restart.resume_step <= watermark && restart.resume_step >= 5,
            "{restart:?}"
        );
        assert!(
            restart.steps_redone >= watermark - restart.resume_step,
            "{restart:?}"
        );
        assert_eq!(
            audit_exactly_once(&job_dir(&roots, &done).join("steps.jsonl"), BATCH as usize),
            STEPS as usize
        );
        assert_listed_checkpoints_load(&roots, &done);
        assert_equal_to_undisturbed(&roots, &done);
        drop(second);
    });
}

#[test]
fn a_checkpoint_writer_killed_mid_write_leaves_the_previous_checkpoint_intact_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let coordinator = Coordinator::start(&roots, "127.0.0.1:0", &["--join-cooldown-ms", "0"]);
    // worker-a trains alone first, so it is rank 0 (the writer) once worker-b has joined; it
    // dies half-way through writing the checkpoint of step 10.
    let writer = Worker::start(
        &roots,
        &coordinator.url(),
        "worker-a",
        &[(
            "PROTODINO_TEST_KILL_WRITING",
            "checkpoint-00000010.safetensors",
        )],
    );
    wait_idle(&coordinator, 1);
    let seen = RefCell::new(Vec::new());
    runtime().block_on(async {
        let mut jobs = coordinator.jobs().await;
        let mut s = job_spec(1, 2);
        s.checkpoint_every_steps = Some(5);
        let job = submit(&mut jobs, s).await;
        wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "step 1", |j| {
            step_of(j) >= 1
        })
        .await;
        let _other = Worker::start(&roots, &coordinator.url(), "worker-b", &[]);
        let joined = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "the join", |j| {
            j.workers.len() == 2 && state(j) == JobState::Running
        })
        .await;
        assert_eq!(joined.workers[0], writer.worker_id(), "{joined:?}");
        // The writer dies writing the checkpoint of step 10; the checkpoint of step 5 is still
        // listed and loads.
        let recovering = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "the recovery", |j| {
            !failures(j).is_empty()
        })
        .await;
        assert!(
            recovering.checkpoints.iter().any(|c| c.step == 5),
            "{:?}",
            recovering.checkpoints
        );
        assert_listed_checkpoints_load(&roots, &recovering);
        let done = finish(&mut jobs, &job.job_id, &seen).await;
        print_recoveries(&done);
        // The writer is gone, and left its torn temporary file behind.
        let torn: Vec<String> = std::fs::read_dir(job_dir(&roots, &done))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with(".checkpoint-00000010.safetensors.tmp"))
            .collect();
        assert_eq!(torn.len(), 1, "no torn file from the killed writer");
        let r = failures(&done);
        assert!(!r.is_empty(), "{:?}", done.recoveries);
        assert_eq!(r[0].members_before[0], joined.workers[0]);
        assert_eq!(done.progress.as_ref().unwrap().world_size, 1);
        assert_listed_checkpoints_load(&roots, &done);
        assert!(done.checkpoints.iter().any(|c| c.step == STEPS));
        assert_equal_to_undisturbed(&roots, &done);
    });
}

/// Waits until `text` appears in the worker's log.
fn wait_log(w: &Worker, text: &str) {
    let deadline = Instant::now() + 2 * MINUTES;
    while !w.log_text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "{} never logged {text:?}:\n{}",
            w.name,
            w.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn workers_stop_after_the_coordinator_grace_and_resume_from_their_replicas() {
    let (_dir, roots, mut coordinator, workers) = service(
        &[],
        &["worker-a", "worker-b"],
        &["--coordinator-grace-ms", "1500"],
    );
    let addr = coordinator.addr.clone();
    let rt = runtime();
    let job_id = rt.block_on(async {
        let mut jobs = coordinator.jobs().await;
        let job = submit(&mut jobs, job_spec(2, 2)).await;
        wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "step 3", |j| {
            step_of(j) >= 3
        })
        .await;
        job.job_id
    });
    coordinator.kill9();
    // Past the grace both sessions stop at a step boundary and keep their replicas.
    for w in &workers {
        wait_log(w, "(--coordinator-grace-ms)");
        wait_log(w, "Stopped at step");
    }
    let coordinator = Coordinator::start(&roots, &addr, &[]);
    let seen = RefCell::new(Vec::new());
    rt.block_on(async {
        let mut jobs = coordinator.jobs().await;
        let done = finish(&mut jobs, &job_id, &seen).await;
        print_recoveries(&done);
        assert_eq!(step_of(&done), STEPS);
        assert!(
            done.recoveries.iter().any(|r| r.resumed_from == "replica"),
            "{:?}",
            done.recoveries
        );
        assert!(
            done.recoveries
                .iter()
                .all(|r| r.resumed_from != "checkpoint"),
            "{:?}",
            done.recoveries
        );
        assert_eq!(
            audit_exactly_once(&job_dir(&roots, &done).join("steps.jsonl"), BATCH as usize),
            STEPS as usize
        );
        assert_equal_to_undisturbed(&roots, &done);
    });
}
