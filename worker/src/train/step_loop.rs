//! The step loop shared by `protodino train` and the agent's sessions: the data plan's batches
//! (this member's share of each global batch, prefetched by the loader) → the DINO step (tensors
//! reduced over the group) → one small all-reduce of the logged losses carrying the stop vote →
//! what the [policy](super::policy) says is due (background collapse analysis and checkpoints on
//! rank 0, a barrier around checkpoints) → the [`StepSink`], which decides what a step means to
//! the outside world (a progress bar and `metrics.jsonl`, or reports to the coordinator).
//!
//! Each step is timed by phase with `Instant` only (the wait for the loader's batch here, the
//! trainer's own phases in `DinoTrainer::last_timings`) and counts the bytes its all-reduces
//! carried, for the agent's `/metrics`; nothing is synchronised for it.
//!
//! The loop ends after the planned last step ([`LoopEnd::Finished`]) or after the step in which
//! any member voted to stop ([`LoopEnd::Stopped`]; every member ends after that same step, so
//! none is left blocked in an all-reduce its peers abandoned). Failures are typed
//! ([`LoopError`]): a non-finite loss (nothing was changed), a collective failure (with whether
//! the replica is still whole) or anything else.

use std::path::Path;
use std::time::Instant;

use protodino_collectives::CollectiveError;
use protodino_data::{DataPlan, Loader, member_share};
use protodino_dino::{DinoError, NonFiniteLoss, Reducer, StepMetrics};
use serde_json::json;

use super::analysis::{Analyst, CollapseRecord, prototype_snapshot};
use super::checkpoints::save_checkpoint;
use super::model::{Trainer, to_batch_for};
use super::policy::{Cadence, Due, due};
use crate::dist::Dist;

/// What the loop trains: the plan, how far, how often the periodic work comes.
pub struct LoopSpec<'a> {
    pub plan: DataPlan,
    /// The loop ends once the trainer has completed this many steps.
    pub total_steps: i64,
    pub cadence: Cadence,
    pub loader: &'a Loader,
    /// Where rank 0 writes checkpoints, keeping the newest `checkpoint_keep`.
    pub checkpoint_dir: &'a Path,
    pub checkpoint_keep: usize,
}

/// The phases of a step in the order they happen: the wait for this member's share of the batch,
/// then the trainer's phases ([`protodino_dino::StepTimings`]); `all_reduce` includes the losses'
/// all-reduce that carries the stop vote.
pub const PHASES: [&str; 6] = [
    "data_wait",
    "forward",
    "backward",
    "all_reduce",
    "optimizer",
    "ema",
];

/// One completed step, as every member saw it.
pub struct StepEvent<'a> {
    /// Completed steps (the step just done is `step - 1`).
    pub step: i64,
    /// Epoch of the step just done.
    pub epoch: i64,
    /// The step's global batch (every member's share together).
    pub global_ids: &'a [u64],
    /// The step's metrics, losses averaged over the group (the global batch's).
    pub metrics: &'a StepMetrics,
    pub step_seconds: f64,
    /// Global images per second since the loop started.
    pub images_per_second: f64,
    pub skipped_total: usize,
    pub due: Due,
    /// Greedy unique prototypes of the latest finished analysis (-1: none yet).
    pub unique_prototypes: i64,
    /// Seconds of each of [`PHASES`], in that order.
    pub phase_seconds: [f64; 6],
    /// Bytes of the buffers the step all-reduced, by transport: the step's tensors through the
    /// reducer, then the losses and the stop vote through the ring (0 in a world of one).
    pub all_reduce_bytes: [(&'static str, u64); 2],
}

impl StepEvent<'_> {
    /// The `metrics.jsonl` record of the step (`kind = "step"`).
    pub fn record(&self) -> serde_json::Value {
        let mut rec = serde_json::to_value(self.metrics).unwrap_or_else(|_| json!({}));
        rec["kind"] = json!("step");
        rec["step"] = json!(self.step);
        rec["epoch"] = json!(self.epoch);
        rec["step_seconds"] = json!(self.step_seconds);
        rec["images_per_second"] = json!(self.images_per_second);
        rec["skipped_records"] = json!(self.skipped_total);
        rec
    }
}

/// What happens after each step besides the training math.
pub trait StepSink {
    /// After every completed step, on every member (before a due checkpoint). May change the
    /// replica only in test hooks.
    fn on_step(&mut self, trainer: &mut Trainer, ev: &StepEvent<'_>) -> anyhow::Result<()>;
    /// A background analysis finished (rank 0; `rec.step` is the step it describes).
    fn on_collapse(&mut self, rec: &CollapseRecord) -> anyhow::Result<()>;
    /// Rank 0 wrote a periodic checkpoint, in `write_seconds`.
    fn on_checkpoint(
        &mut self,
        trainer: &Trainer,
        path: &Path,
        write_seconds: f64,
    ) -> anyhow::Result<()>;
    /// A line for a human (a skipped record, a skipped analysis).
    fn note(&mut self, line: String);
    /// This member's stop vote, cast after every step.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopEnd {
    /// The planned last step is done.
    Finished,
    /// A member voted to stop; every member ended after the same step.
    Stopped,
}

/// What the loop did.
#[derive(Debug, Clone, Default)]
pub struct LoopStats {
    pub start_step: i64,
    pub last: Option<StepMetrics>,
    /// Global images (every member's share) of the steps run.
    pub images_seen: usize,
    pub skipped_total: usize,
    /// The loop's own time (data, steps, periodic work).
    pub train_seconds: f64,
}

/// A failed loop.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The step's loss was not finite; the replica is as before the step.
    #[error("{}", describe_non_finite(.0))]
    NonFinite(Box<NonFiniteLoss>),
    /// A collective failed. `replica_valid` is false when the failure came after the step had
    /// started changing the replica (the centre all-reduce follows the optimiser step and EMA).
    #[error("{during}: {source}")]
    Collective {
        during: &'static str,
        source: CollectiveError,
        replica_valid: bool,
    },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// `non-finite loss at step S (…); replay with <batch> from <checkpoint>`.
pub fn describe_non_finite(n: &NonFiniteLoss) -> String {
    let base = DinoError::NonFiniteLoss(Box::new(n.clone())).to_string();
    match (&n.batch, &n.checkpoint) {
        (Some(b), Some(c)) => format!(
            "{base}; replay batch saved as {} (state before the step: {})",
            b.display(),
            c.display()
        ),
        _ => format!("{base}; no replay batch could be saved"),
    }
}

fn collective(during: &'static str, replica_valid: bool) -> impl Fn(CollectiveError) -> LoopError {
    move |source| LoopError::Collective {
        during,
        source,
        replica_valid,
    }
}

/// Runs steps from `trainer.step` to `spec.total_steps` as member `dist.rank` of `dist.world`,
/// the step's tensors reduced by `reducer`.
pub fn run_steps(
    trainer: &mut Trainer,
    dist: &Dist,
    reducer: &dyn Reducer,
    spec: &LoopSpec<'_>,
    sink: &mut dyn StepSink,
) -> Result<(LoopEnd, LoopStats), LoopError> {
    let (world, rank, leader) = (dist.world, dist.rank, dist.is_leader());
    let plan = &spec.plan;
    let spe = plan.steps_per_epoch() as i64;
    if spe == 0 {
        return Err(anyhow::anyhow!(
            "{} training images are fewer than one global batch of {}",
            plan.dataset_size,
            plan.global_batch
        )
        .into());
    }
    let started = Instant::now();
    let mut stats = LoopStats {
        start_step: trainer.step,
        ..LoopStats::default()
    };
    let mut analyst = Analyst::new(trainer.cfg.eval.unique_eps.clone());
    let mut unique = -1i64;
    while trainer.step < spec.total_steps {
        let epoch = trainer.step / spe;
        let end = ((epoch + 1) * spe).min(spec.total_steps);
        let perm = plan.permutation(epoch as u64);
        let globals: Vec<Vec<u64>> = (trainer.step..end)
            .map(|s| plan.global_ids_in(&perm, s as u64))
            .collect();
        let shares = globals
            .iter()
            .map(|g| member_share(g, world, rank))
            .collect();
        let mut stream = spec.loader.epoch(epoch as u64, shares);
        for global in &globals {
            let waited = Instant::now();
            let mb = stream.next().ok_or_else(|| {
                anyhow::anyhow!("the data stream of epoch {epoch} ended before its last step")
            })?;
            let data_wait = waited.elapsed().as_secs_f64();
            let t0 = Instant::now();
            stats.skipped_total += mb.skipped.len();
            for s in &mb.skipped {
                sink.note(format!("skipped record: {s:?}"));
            }
            let batch = to_batch_for(&mb, &trainer.cfg);
            stream.recycle(mb);
            let mut m = match trainer.train_step(&batch, reducer) {
                Ok(m) => m,
                Err(DinoError::NonFiniteLoss(n)) => return Err(LoopError::NonFinite(n)),
                // Every collective of a step precedes its updates: the replica is whole.
                Err(DinoError::Collective(source)) => {
                    return Err(LoopError::Collective {
                        during: "the step's all-reduce",
                        source,
                        replica_valid: true,
                    });
                }
                Err(e) => return Err(anyhow::Error::from(e).into()),
            };
            // Each member's losses are over its share; log those of the global batch, and
            // count the stop vote in the same all-reduce.
            let mut v = [m.dino_loss, m.teacher_entropy, m.total];
            let voted = Instant::now();
            let stop = dist
                .mean_and_vote(&mut v, m.sample_share, sink.stop_requested())
                .map_err(collective("step-metrics all-reduce", true))?;
            let vote_seconds = voted.elapsed().as_secs_f64();
            [m.dino_loss, m.teacher_entropy, m.total] = v;
            let t = trainer.last_timings;
            let phase_seconds = [
                data_wait,
                t.forward,
                t.backward,
                t.all_reduce + vote_seconds,
                t.optimizer,
                t.ema,
            ];
            // The vote's all-reduce: the logged values and the vote, as f32.
            let vote_bytes = if world > 1 {
                ((v.len() + 1) * std::mem::size_of::<f32>()) as u64
            } else {
                0
            };
            stats.images_seen += global.len();
            let step = trainer.step;
            let d = due(step, spec.total_steps, &spec.cadence);
            if leader && d.analysis {
                let snapshot = prototype_snapshot(trainer);
                if !analyst.submit(step, snapshot)? {
                    sink.note(format!(
                        "step {step}: collapse analysis skipped (earlier ones still running)"
                    ));
                }
            }
            for rec in analyst.poll()? {
                unique = rec.unique_prototypes();
                sink.on_collapse(&rec)?;
            }
            let ev = StepEvent {
                step,
                epoch,
                global_ids: global,
                metrics: &m,
                step_seconds: t0.elapsed().as_secs_f64(),
                images_per_second: stats.images_seen as f64
                    / started.elapsed().as_secs_f64().max(1e-9),
                skipped_total: stats.skipped_total,
                due: d,
                unique_prototypes: unique,
                phase_seconds,
                all_reduce_bytes: [
                    (reducer.transport(), t.all_reduce_bytes),
                    (dist.transport(), vote_bytes),
                ],
            };
            sink.on_step(trainer, &ev)?;
            if d.checkpoint {
                if leader {
                    let written = Instant::now();
                    let path = save_checkpoint(trainer, spec.checkpoint_dir, spec.checkpoint_keep)?;
                    sink.on_checkpoint(trainer, &path, written.elapsed().as_secs_f64())?;
                }
                // The others wait out the save with a long deadline, so their next all-reduce
                // does not count it against its own.
                dist.wait_for_leader()
                    .map_err(collective("checkpoint barrier", true))?;
            }
            stats.last = Some(m);
            if stop {
                stats.train_seconds = started.elapsed().as_secs_f64();
                return Ok((LoopEnd::Stopped, stats));
            }
        }
    }
    stats.train_seconds = started.elapsed().as_secs_f64();
    for rec in analyst.finish()? {
        sink.on_collapse(&rec)?;
    }
    Ok((LoopEnd::Finished, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::hash::state_hash;
    use crate::train::model::build_trainer;
    use crate::train::testing::{noise_images, tiny_config};
    use protodino_collectives::{GroupOptions, GroupSpec, RingGroup, bind_listener};

    /// Records the steps it saw (with their phase times and all-reduce bytes) and votes to
    /// stop from the step after `stop_after`.
    struct Recorder {
        steps: Vec<i64>,
        phases: Vec<[f64; 6]>,
        bytes: Vec<[(&'static str, u64); 2]>,
        stop_after: Option<i64>,
        stop: bool,
    }

    impl Recorder {
        fn new(stop_after: Option<i64>) -> Self {
            Self {
                steps: Vec::new(),
                phases: Vec::new(),
                bytes: Vec::new(),
                stop_after,
                stop: false,
            }
        }
    }

    impl StepSink for Recorder {
        fn on_step(&mut self, _: &mut Trainer, ev: &StepEvent<'_>) -> anyhow::Result<()> {
            self.steps.push(ev.step);
            self.phases.push(ev.phase_seconds);
            self.bytes.push(ev.all_reduce_bytes);
            if self.stop_after == Some(ev.step) {
                self.stop = true;
            }
            Ok(())
        }
        fn on_collapse(&mut self, _: &CollapseRecord) -> anyhow::Result<()> {
            Ok(())
        }
        fn on_checkpoint(&mut self, _: &Trainer, _: &Path, _: f64) -> anyhow::Result<()> {
            Ok(())
        }
        fn note(&mut self, _: String) {}
        fn stop_requested(&self) -> bool {
            self.stop
        }
    }

    /// 32 images, global batch 8: 4 steps per epoch, 8 planned.
    fn plan() -> DataPlan {
        DataPlan {
            seed: tiny_config().train.seed,
            dataset_size: 32,
            global_batch: 8,
        }
    }

    fn run_member(trainer: &mut Trainer, dist: &Dist, sink: &mut Recorder) -> (LoopEnd, LoopStats) {
        let cfg = tiny_config();
        let loader = Loader::new(noise_images(32), &cfg.crops, &cfg.data, cfg.train.seed).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spec = LoopSpec {
            plan: plan(),
            total_steps: 8,
            cadence: Cadence::default(),
            loader: &loader,
            checkpoint_dir: dir.path(),
            checkpoint_keep: 1,
        };
        run_steps(trainer, dist, dist, &spec, sink).unwrap()
    }

    #[test]
    fn a_member_alone_ends_after_the_step_it_voted_in_or_at_the_plan_end() {
        let cfg = tiny_config();
        let mut t = build_trainer(&cfg, 4, 2).unwrap();
        let mut sink = Recorder::new(Some(2));
        let (end, stats) = run_member(&mut t, &Dist::solo(), &mut sink);
        assert_eq!(end, LoopEnd::Stopped);
        assert_eq!(sink.steps, vec![1, 2, 3], "the vote of step 3 ends it");
        assert_eq!((t.step, stats.images_seen), (3, 24));
        for (phases, bytes) in sink.phases.iter().zip(&sink.bytes) {
            // The forward, backward and optimiser always take time; nothing moves alone.
            assert!(phases.iter().all(|s| (0.0..60.0).contains(s)), "{phases:?}");
            assert!(
                phases[1] > 0.0 && phases[2] > 0.0 && phases[4] > 0.0,
                "{phases:?}"
            );
            assert_eq!(bytes.map(|b| b.1), [0, 0], "{bytes:?}");
        }

        let mut sink = Recorder::new(None);
        let (end, _) = run_member(&mut t, &Dist::solo(), &mut sink);
        assert_eq!(end, LoopEnd::Finished);
        assert_eq!(
            sink.steps,
            (4..=8).collect::<Vec<_>>(),
            "resumes at its step"
        );
    }

    #[test]
    fn one_members_stop_vote_ends_both_after_the_same_step_with_equal_replicas() {
        let cfg = tiny_config();
        // Built one after the other: the initial weights come from libtorch's global seed.
        let mut trainers = [
            build_trainer(&cfg, 4, 2).unwrap(),
            build_trainer(&cfg, 4, 2).unwrap(),
        ];
        let options = GroupOptions::default;
        let listeners = [
            bind_listener("127.0.0.1:0", &options()).unwrap(),
            bind_listener("127.0.0.1:0", &options()).unwrap(),
        ];
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        type Seen = (Vec<i64>, Vec<[(&'static str, u64); 2]>);
        let results: Vec<(Seen, LoopEnd, i64, [u8; 32])> = std::thread::scope(|s| {
            let handles: Vec<_> = trainers
                .iter_mut()
                .zip(listeners)
                .enumerate()
                .map(|(rank, (trainer, listener))| {
                    let peers = peers.clone();
                    s.spawn(move || {
                        let spec = GroupSpec {
                            rank,
                            world: 2,
                            peers,
                            secret: b"stop-vote-test".to_vec(),
                        };
                        let group = RingGroup::connect(&spec, listener, options()).unwrap();
                        let dist = Dist::from_group(group, std::time::Duration::from_secs(60));
                        // Rank 1 alone wants to stop, from the step after step 2.
                        let mut sink = Recorder::new((rank == 1).then_some(2));
                        let (end, _) = run_member(trainer, &dist, &mut sink);
                        let seen = (sink.steps, sink.bytes);
                        (seen, end, trainer.step, state_hash(trainer).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for ((steps, bytes), end, step, _) in &results {
            assert_eq!(*end, LoopEnd::Stopped);
            assert_eq!(steps, &vec![1, 2, 3]);
            assert_eq!(*step, 3);
            // Both ranks share this host: every all-reduce goes through shared memory, the
            // step's tensors (gradients and more) and the 3 losses with the vote (16 bytes).
            for [(grads_via, grads), (vote_via, vote)] in bytes {
                assert_eq!((*grads_via, *vote_via), ("shm", "shm"));
                assert!(*grads > 1000, "{grads}");
                assert_eq!(*vote, 16);
            }
        }
        assert_eq!(results[0].0.1, results[1].0.1, "both ranks moved the same");
        assert_eq!(
            results[0].3, results[1].3,
            "the replicas stay bit-identical"
        );
    }
}

#[cfg(test)]
mod non_finite_tests {
    use super::*;
    use crate::train::model::build_trainer;
    use crate::train::testing::{noise_images, tiny_config};

    struct Quiet;

    impl StepSink for Quiet {
        fn on_step(&mut self, _: &mut Trainer, _: &StepEvent<'_>) -> anyhow::Result<()> {
            Ok(())
        }
        fn on_collapse(&mut self, _: &CollapseRecord) -> anyhow::Result<()> {
            Ok(())
        }
        fn on_checkpoint(&mut self, _: &Trainer, _: &Path, _: f64) -> anyhow::Result<()> {
            Ok(())
        }
        fn note(&mut self, _: String) {}
    }

    #[test]
    fn a_non_finite_loss_is_typed_and_names_the_step_and_the_replay_batch() {
        let cfg = tiny_config();
        let dir = tempfile::tempdir().unwrap();
        let mut t = build_trainer(&cfg, 4, 1).unwrap();
        t.set_failure_dir(dir.path().join("failures"));
        let before = crate::train::state_hash(&t).unwrap();
        // A NaN in the student's head makes the first loss NaN.
        let (_, w) = protodino_dino::params::named_parameters(&t.student_vs)
            .into_iter()
            .find(|(n, _)| n.contains("head"))
            .unwrap();
        tch::no_grad(|| {
            let _ = w.shallow_clone().fill_(f64::NAN);
        });
        let poisoned = crate::train::state_hash(&t).unwrap();
        assert_ne!(before, poisoned);
        let loader = Loader::new(noise_images(32), &cfg.crops, &cfg.data, 0).unwrap();
        let spec = LoopSpec {
            plan: DataPlan {
                seed: 0,
                dataset_size: 32,
                global_batch: 8,
            },
            total_steps: 8,
            cadence: Cadence::default(),
            loader: &loader,
            checkpoint_dir: dir.path(),
            checkpoint_keep: 1,
        };
        let err = run_steps(
            &mut t,
            &Dist::solo(),
            &protodino_dino::LocalReducer,
            &spec,
            &mut Quiet,
        )
        .expect_err("a NaN loss fails the loop");
        let LoopError::NonFinite(n) = &err else {
            panic!("not typed as non-finite: {err}");
        };
        assert_eq!(n.step, 0);
        assert!(n.batch.as_ref().is_some_and(|b| b.exists()), "{n:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("step 0") && msg.contains("replay batch saved as"),
            "{msg}"
        );
        assert_eq!(t.step, 0, "nothing was applied");
        assert_eq!(crate::train::state_hash(&t).unwrap(), poisoned);
    }
}
