//! `protodino train`: DINO + KoLeo-proto training in one process, or as one rank of a static
//! data-parallel group (`--world/--rank/--peers`, see `dist.rs`), with no coordinator.
//!
//! The configuration fixes the data plan (`G = batch_size_per_worker × world`); the run resumes
//! from the newest checkpoint in its output directory. In a group, rank 0 owns the output
//! (records, checkpoints, analysis, evaluation) and broadcasts its state to the others at the
//! start, so every rank starts from the same weights, fresh or resumed; the other ranks log to
//! `<output>/rank-<R>/`. Steps go through the shared loop (`step_loop.rs`) with a
//! [`TerminalSink`]: a progress bar (or JSON lines with `--json`) and `metrics.jsonl`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use protodino_config::TrainConfig;
use protodino_data::{DataPlan, Loader};
use serde_json::json;

use super::analysis::{CollapseRecord, usage_ids};
use super::checkpoints::{checkpoints, save_checkpoint};
use super::final_report::{FinalInputs, FinalReport};
use super::model::{Trainer, build_trainer};
use super::policy::Cadence;
use super::reporter::Reporter;
use super::step_loop::{LoopSpec, StepEvent, StepSink, run_steps};
use crate::dist::{Dist, DistArgs, tensor_reducer};

pub struct TrainArgs {
    pub config: Vec<PathBuf>,
    pub json: bool,
    pub max_steps: Option<i64>,
    pub output_dir: Option<PathBuf>,
    /// k-NN image limits (None: the configuration's `eval.knn_*_images`).
    pub knn_train_limit: Option<usize>,
    pub knn_test_limit: Option<usize>,
    pub dist: DistArgs,
}

/// The terminal and `metrics.jsonl` of a standalone run.
pub struct TerminalSink<'a> {
    pub reporter: &'a mut Reporter,
}

impl StepSink for TerminalSink<'_> {
    fn on_step(&mut self, _: &mut Trainer, ev: &StepEvent<'_>) -> Result<()> {
        self.reporter.set_step(
            ev.step as u64,
            format!(
                "epoch {} loss {:.4} koleo {:.4} {:.1} img/s",
                ev.epoch, ev.metrics.dino_loss, ev.metrics.koleo_proto, ev.images_per_second
            ),
        );
        if ev.due.log {
            self.reporter.record(&ev.record())?;
        }
        Ok(())
    }

    fn on_collapse(&mut self, rec: &CollapseRecord) -> Result<()> {
        self.reporter.println(rec.summary());
        self.reporter.record(&rec.to_json())?;
        Ok(())
    }

    fn on_checkpoint(&mut self, _: &Trainer, _: &Path, _: f64) -> Result<()> {
        Ok(())
    }

    fn note(&mut self, line: String) {
        self.reporter.println(line);
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut cfg = TrainConfig::load(&args.config)?;
    if let Some(m) = args.max_steps {
        cfg.train.max_steps = m;
    }
    if let Some(d) = &args.output_dir {
        cfg.train.output_dir = d.display().to_string();
    }
    cfg.validate()?;
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads as i32);
    }
    let dist = Dist::join(&args.dist)?;
    let (world, rank, leader) = (dist.world, dist.rank, dist.is_leader());
    let run_dir = PathBuf::from(&cfg.train.output_dir);
    let out = if leader {
        run_dir.clone()
    } else {
        run_dir.join(format!("rank-{rank}"))
    };
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&cfg.to_json())?,
    )?;

    let data_root = protodino_config::data_root();
    let train_set = protodino_data::open_train(&cfg.data, &data_root).with_context(|| {
        format!(
            "opening the training set (run `cargo xtask data` to provision {})",
            data_root.display()
        )
    })?;
    let n = train_set.len();
    let b = cfg.train.batch_size_per_worker as usize;
    let plan = DataPlan {
        seed: cfg.train.seed,
        dataset_size: n as u64,
        global_batch: (b * world) as u64,
    };
    let steps_per_epoch = plan.steps_per_epoch() as i64; // drop_last
    anyhow::ensure!(
        steps_per_epoch > 0,
        "{n} training images are fewer than one global batch of {world} x {b}"
    );
    let total_steps = {
        let all = steps_per_epoch * cfg.train.epochs;
        if cfg.train.max_steps > 0 {
            all.min(cfg.train.max_steps)
        } else {
            all
        }
    };
    let loader = Loader::new(train_set.clone(), &cfg.crops, &cfg.data, cfg.train.seed)?;
    let mut trainer = build_trainer(&cfg, steps_per_epoch, world)?;
    trainer.set_failure_dir(out.join("failures"));
    if leader && let Some((_, latest)) = checkpoints(&out).pop() {
        trainer
            .load_checkpoint(&latest)
            .with_context(|| format!("resuming from {}", latest.display()))?;
    }
    if world > 1 {
        // Every rank starts from rank 0's state (fresh or resumed): same weights, optimiser,
        // centre and step, whatever each process initialised on its own.
        let scratch = out.join(format!(".state-rank-{rank}.safetensors"));
        dist.sync_state(&mut trainer, &scratch, 0)
            .context("starting from rank 0's state")?;
    }
    let reducer = tensor_reducer(&dist, trainer.device, &[])?;
    let probe_ids = usage_ids(n, cfg.eval.usage_images as usize);
    let probe = (!probe_ids.is_empty()).then_some((&loader, probe_ids.as_slice()));
    let mut reporter = Reporter::new(&out, total_steps as u64, args.json)?;
    if !leader {
        reporter = reporter.silent();
    }
    reporter.println(format!(
        "protodino train: {n} images, {steps_per_epoch} steps/epoch, {total_steps} steps, K = {}, λ = {}, output {}{}{}",
        cfg.head.out_dim,
        cfg.koleo.weight,
        out.display(),
        if world > 1 {
            let transport = match reducer.name() {
                "nccl" => "nccl",
                _ => dist.transport(),
            };
            format!(", {world} ranks ({transport} all-reduce), global batch {}", b * world)
        } else {
            String::new()
        },
        if trainer.step > 0 { format!(", resumed at step {}", trainer.step) } else { String::new() }
    ));

    let spec = LoopSpec {
        plan,
        total_steps,
        cadence: Cadence::of(&cfg),
        loader: &loader,
        checkpoint_dir: &out,
        checkpoint_keep: cfg.train.checkpoint_keep as usize,
    };
    let started = Instant::now();
    let (_, stats) = run_steps(
        &mut trainer,
        &dist,
        reducer.as_reducer(),
        &spec,
        &mut TerminalSink {
            reporter: &mut reporter,
        },
    )?;
    reporter.finish();
    if !leader {
        // Rank 0 alone saves, analyses and evaluates the final state.
        reporter.record(&json!({
            "kind": "final",
            "rank": rank,
            "step": trainer.step,
            "train_seconds": stats.train_seconds,
            "last_step": stats.last,
        }))?;
        return Ok(());
    }
    let checkpoint = save_checkpoint(&trainer, &out, cfg.train.checkpoint_keep as usize)?;
    let inputs = FinalInputs {
        probe,
        data_root: &data_root,
        knn_limits: (
            args.knn_train_limit
                .unwrap_or(cfg.eval.knn_train_images as usize),
            args.knn_test_limit
                .unwrap_or(cfg.eval.knn_test_images as usize),
        ),
    };
    let report = FinalReport::evaluate(
        &trainer,
        &inputs,
        &stats,
        checkpoint.display().to_string(),
        started,
    )?;
    reporter.record(&serde_json::to_value(&report)?)?;
    if !args.json {
        report.print();
    }
    Ok(())
}
