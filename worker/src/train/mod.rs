//! Training: everything between the data pipeline, the DINO step and the collectives that both
//! `protodino train` (standalone or a static group) and the agent's sessions need.
//!
//! Module map (start with `step_loop`):
//! - `step_loop`    — the step loop over a [`StepSink`]: data plan → step → losses all-reduce
//!   with the stop vote → due work → sink; typed [`LoopError`]s;
//! - `policy`       — pure: what is due after a step (log, analysis, checkpoint, hash, end);
//! - `model`        — building the trainer (per-rank or per-job schedules), batches as tensors;
//! - `checkpoints`  — checkpoint files of a run directory, retention, SHA-256;
//! - `analysis`     — collapse figures: the background [`Analyst`] on prototype snapshots, and
//!   the final figures with usage;
//! - `features`     — teacher features and the k-NN evaluation;
//! - `final_report` — the typed [`FinalReport`] printed by `train` and sent by the agent;
//! - `hash`         — the replica hash (and the test-only perturbation hook);
//! - `reporter`     — progress bar and `metrics.jsonl`;
//! - `standalone`   — `protodino train` itself and its [`TerminalSink`].

pub mod analysis;
pub mod checkpoints;
pub mod features;
pub mod final_report;
pub mod hash;
pub mod model;
pub mod policy;
pub mod reporter;
pub mod standalone;
pub mod step_loop;
#[cfg(test)]
pub mod testing;

pub use analysis::CollapseRecord;
pub use checkpoints::{checkpoints, file_sha256, save_checkpoint};
pub use features::extract_features;
pub use final_report::{FinalInputs, FinalReport};
pub use hash::state_hash;
pub use model::{Trainer, build_job_trainer, build_trainer};
pub use policy::Cadence;
pub use standalone::{TrainArgs, run};
pub use step_loop::{LoopEnd, LoopError, LoopSpec, LoopStats, StepEvent, StepSink, run_steps};
