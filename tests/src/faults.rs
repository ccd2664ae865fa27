//! What the fault scenarios (`tests/tests/fault.rs`, `tests/tests/partition.rs`) share: the job
//! they disturb, the undisturbed run it must end equal to, and how a recovery is followed and
//! reported.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use protodino_proto::v1::{Job, JobSpec, JobState, Recovery};

use crate::cluster::{
    JobClient, Roots, Worker, job_dir, load_f32, spec, state, wait_for, worst_relative,
    worst_relative_l2,
};
use crate::scenario::{BASE, MINUTES, single_process, without_key_bias};

/// Global batch of the scenarios: 6 + 5 + 5 samples at world 3, 8 + 8 at world 2.
pub const BATCH: i32 = 16;
pub const STEPS: i64 = 20;
/// What a disturbed run may differ from the undisturbed one by, per tensor: relative in norm,
/// and per element relative to the tensor's largest element (Adam normalises the summation
/// noise of near-zero gradient entries up to a step's size, so single elements of the last
/// layer carry it most: 0.3e-5 to 1.8e-5 measured in these scenarios).
pub const TOLERANCE_L2: f64 = 1e-5;
pub const TOLERANCE_MAX: f64 = 5e-5;

/// The recipe at world `min..=max`.
pub fn job_spec(min: i32, max: i32) -> JobSpec {
    let mut s = spec(BASE, max, BATCH, STEPS);
    s.min_world_size = Some(min);
    s
}

/// The undisturbed run (one process, the same global batch), trained once per test binary.
pub fn reference() -> &'static BTreeMap<String, Vec<f32>> {
    static REFERENCE: OnceLock<BTreeMap<String, Vec<f32>>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        single_process(dir.path(), "", BATCH as usize, STEPS as usize)
    })
}

/// The job's final checkpoint against the undisturbed run.
pub fn assert_equal_to_undisturbed(roots: &Roots, job: &Job) {
    let path = job_dir(roots, job).join(format!("checkpoint-{STEPS:08}.safetensors"));
    let got = without_key_bias(load_f32(&path));
    let (l2, l2_name) = worst_relative_l2(reference(), &got);
    let (worst, name) = worst_relative(reference(), &got);
    eprintln!(
        "{}: against the undisturbed run, worst relative difference in norm {l2:.3e} \
         ({l2_name}), per element {worst:.3e} ({name})",
        job.job_id
    );
    assert!(l2 < TOLERANCE_L2, "{l2_name} differs by {l2:e} in norm");
    assert!(worst < TOLERANCE_MAX, "{name} differs by {worst:e}");
}

/// Every listed checkpoint exists, loads, and matches its SHA-256.
pub fn assert_listed_checkpoints_load(roots: &Roots, job: &Job) {
    use sha2::Digest;
    assert!(!job.checkpoints.is_empty(), "{job:?}");
    for c in &job.checkpoints {
        let path = roots.checkpoint_root.join(&c.uri);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&bytes)),
            c.sha256,
            "{}",
            c.uri
        );
        assert!(!load_f32(&path).is_empty(), "{} holds no tensors", c.uri);
    }
}

/// Appends `job`'s state to `seen` when it changed.
pub fn record_state(seen: &RefCell<Vec<JobState>>, job: &Job) {
    let s = state(job);
    if seen.borrow().last() != Some(&s) {
        seen.borrow_mut().push(s);
    }
}

/// Follows the job to SUCCEEDED, recording every state it passed through.
pub async fn finish(jobs: &mut JobClient, id: &str, seen: &RefCell<Vec<JobState>>) -> Job {
    wait_for(jobs, id, 5 * MINUTES, "success", |j| {
        record_state(seen, j);
        state(j) == JobState::Succeeded
    })
    .await
}

/// The index in `workers` of the process with coordinator id `id`.
pub fn process_of(workers: &[Worker], id: &str) -> usize {
    workers
        .iter()
        .position(|w| w.worker_id() == id)
        .unwrap_or_else(|| panic!("no worker process registered as {id}"))
}

pub fn print_recoveries(job: &Job) {
    for r in &job.recoveries {
        eprintln!(
            "{}: recovery {} epoch {} → {} ({} → {} members) from {} at step {}, {} step(s) \
             redone, {:.2} s: {}",
            job.job_id,
            r.reason,
            r.epoch_before,
            r.epoch_after,
            r.members_before.len(),
            r.members_after.len(),
            r.resumed_from,
            r.resume_step,
            r.steps_redone,
            r.seconds,
            r.detail
        );
    }
}

/// The failure recoveries of a job (joins left out).
pub fn failures(job: &Job) -> Vec<&Recovery> {
    job.recoveries
        .iter()
        .filter(|r| r.reason != "joined")
        .collect()
}
