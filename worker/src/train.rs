//! `protodino train`: DINO + KoLeo-proto training, in one process or as one rank of a
//! data-parallel group (`dist.rs`).
//!
//! Data (the `protodino-data` loader, prefetching on its own threads) → the DINO step
//! (`protodino-dino`, gradients and centre statistics all-reduced over the group) → collapse
//! figures (`protodino-analysis`) every `eval.analysis_every_steps` → periodic checkpoints with
//! retention → final report: losses, unique prototypes, k-NN. A run resumes from the newest
//! checkpoint in its output directory. In a group, rank 0 owns the output (records, checkpoints,
//! analysis, evaluation) and broadcasts its state to the others at the start, so every rank
//! starts from the same weights, fresh or resumed; the other ranks log to `<output>/rank-<R>/`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use protodino_analysis::{
    Assignment, Grouping, KnnOptions, UniqueAnalysis, UniqueOptions, UsageAccumulator, UsageReport,
    analyze_unique, knn_classify,
};
use protodino_config::TrainConfig;
use protodino_data::{Loader, MultiCropBatch, SharedDataset, epoch_permutation};
use protodino_dino::{Batch, DinoTrainer};
use protodino_models::{ForwardCtx, MultiCrop};
use serde_json::json;
use tch::{Kind, Tensor};

use crate::dist::{Dist, DistArgs};
use crate::report::Reporter;

pub type Trainer = DinoTrainer<MultiCrop>;

/// Build the trainer of a configuration (student and teacher `MultiCrop`s).
pub fn build_trainer(
    cfg: &TrainConfig,
    steps_per_epoch: i64,
    world_size: usize,
) -> Result<Trainer> {
    let (model, head) = (cfg.model.clone(), cfg.head.clone());
    Ok(DinoTrainer::new(
        cfg.clone(),
        steps_per_epoch,
        world_size,
        move |p, student| MultiCrop::new(p, &model, &head, student),
    )?)
}

/// A data-pipeline batch as the step's tensors (crop-major, `[B, 3, S, S]` per crop).
pub fn to_batch(b: &MultiCropBatch) -> Batch {
    let shape = |s: [usize; 5]| s.map(|d| d as i64);
    let global = Tensor::from_slice(&b.global_crops).view(shape(b.global_shape()));
    let local = if b.n_local > 0 {
        Tensor::from_slice(&b.local_crops)
            .view(shape(b.local_shape()))
            .unbind(0)
    } else {
        Vec::new()
    };
    Batch {
        global_crops: global.unbind(0),
        local_crops: local,
        sample_ids: b.sample_ids.clone(),
    }
}

/// Checkpoints of a run directory, oldest first (`checkpoint-<step>.safetensors`).
pub fn checkpoints(dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut out: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name
                .strip_prefix("checkpoint-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn save_checkpoint(trainer: &Trainer, dir: &Path, keep: usize) -> Result<PathBuf> {
    let path = dir.join(format!("checkpoint-{:08}.safetensors", trainer.step));
    trainer.save_checkpoint(&path)?;
    let all = checkpoints(dir);
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_file(old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(path)
}

/// Unique prototypes of the teacher head (the paper's convention): counts, NN statistics and
/// the greedy groups of every ε.
pub fn collapse_analysis(trainer: &Trainer, eps: &[f64]) -> Result<UniqueAnalysis> {
    let protos = tch::no_grad(|| {
        trainer
            .teacher
            .head
            .prototypes()
            .to_kind(Kind::Double)
            .to_device(tch::Device::Cpu)
    });
    let normalized = &protos / protos.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
    Ok(analyze_unique(
        &normalized,
        &UniqueOptions {
            eps: eps.to_vec(),
            ..UniqueOptions::default()
        },
    )?)
}

/// The fixed probe set of usage figures: `n` evenly spaced training images.
pub fn usage_ids(n_train: usize, n: usize) -> Vec<u64> {
    let n = n.min(n_train);
    (0..n as u64)
        .map(|i| i * n_train as u64 / n as u64)
        .collect()
}

/// Prototype usage of the teacher over `ids` (eval transform): `p(k|x)` is the training target
/// `softmax((z − c)/τ_t)` with the current centre and the final teacher temperature; groups are
/// the greedy unique-prototype groups at the headline ε (`eval.unique_eps[0]`).
pub fn usage_figures(
    trainer: &Trainer,
    loader: &Loader,
    ids: &[u64],
    analysis: &UniqueAnalysis,
) -> Result<UsageReport> {
    let cfg = &trainer.cfg;
    let k = cfg.head.out_dim;
    let mut acc = UsageAccumulator::new(
        k,
        Assignment::TeacherCentered {
            center: trainer
                .dino_loss
                .center
                .to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
                .reshape([k]),
            teacher_temp: cfg.loss.teacher_temp,
        },
    )?;
    for_each_eval_batch(trainer, loader, ids, |x, _| {
        let logits = tch::no_grad(|| {
            let f = trainer.teacher.backbone.forward(x, &ForwardCtx::eval());
            trainer.teacher.head.forward(&f, false)
        });
        Ok(acc.update(&logits.to_device(tch::Device::Cpu).to_kind(Kind::Float))?)
    })?;
    anyhow::ensure!(
        acc.n_samples() > 0,
        "no readable image for the usage figures"
    );
    let eps = analysis.report.counts[0].eps;
    Ok(acc.finish(Some(Grouping {
        eps,
        groups: &analysis.greedy_groups[0],
    }))?)
}

/// The collapse record of one analysis: unique counts, NN statistics and (when a probe set is
/// given) usage; with `mass`, the grouped MLCD `Π` sorted from the largest group down.
fn collapse_record(
    trainer: &Trainer,
    probe: Option<(&Loader, &[u64])>,
    mass: bool,
) -> Result<serde_json::Value> {
    let analysis = collapse_analysis(trainer, &trainer.cfg.eval.unique_eps)?;
    let mut rec = json!({ "head": "teacher", "report": &analysis.report });
    if let Some((loader, ids)) = probe {
        let usage = usage_figures(trainer, loader, ids, &analysis)?;
        rec["usage"] = serde_json::to_value(&usage)?;
        if mass && let Some(g) = &usage.grouped {
            let mut m = g.mass.clone();
            m.sort_by(|a, b| b.total_cmp(a));
            rec["usage"]["grouped"]["mass_sorted"] = json!(m);
        }
    }
    Ok(rec)
}

/// Run `f(images [n, 3, S, S] on the trainer's device, labels)` over `ids` in chunks of 256,
/// with the evaluation transform; unreadable records are left out.
pub fn for_each_eval_batch(
    trainer: &Trainer,
    loader: &Loader,
    ids: &[u64],
    mut f: impl FnMut(&Tensor, &[i64]) -> Result<()>,
) -> Result<()> {
    for chunk in ids.chunks(256) {
        let b = loader.eval_batch(chunk);
        let n = b.sample_ids.len() as i64;
        if n == 0 {
            continue;
        }
        let s = b.size as i64;
        let x = Tensor::from_slice(&b.images)
            .view([n, 3, s, s])
            .to_device(trainer.device);
        f(&x, &b.labels)?;
    }
    Ok(())
}

/// Teacher-backbone features of `ids` and their labels, L2-normalisation left to the caller:
/// `probe = None` → the DINO feature (CLS after the final norm), else
/// `forward_probe(n_last_blocks, avgpool)`. Returns `(features [N, D], labels [N])`.
pub fn extract_features(
    trainer: &Trainer,
    loader: &Loader,
    ids: &[u64],
    probe: Option<(i64, bool)>,
) -> Result<(Tensor, Tensor)> {
    let mut feats = Vec::new();
    let mut labels = Vec::new();
    let backbone = &trainer.teacher.backbone;
    for_each_eval_batch(trainer, loader, ids, |x, y| {
        let f = tch::no_grad(|| match probe {
            None => backbone.forward(x, &ForwardCtx::eval()),
            Some((k, avg)) => backbone.forward_probe(x, k, avg),
        });
        feats.push(f.to_device(tch::Device::Cpu));
        labels.extend_from_slice(y);
        Ok(())
    })?;
    anyhow::ensure!(!feats.is_empty(), "no readable evaluation image");
    Ok((Tensor::cat(&feats, 0), Tensor::from_slice(&labels)))
}

/// Weighted k-NN (k = `eval.knn_k`, T = `eval.knn_temperature`) on the teacher's features.
pub fn knn_eval(
    trainer: &Trainer,
    cfg: &TrainConfig,
    train: &SharedDataset,
    test: &SharedDataset,
    limits: (usize, usize),
) -> Result<protodino_analysis::KnnReport> {
    let mk = |ds: &SharedDataset| Loader::new(ds.clone(), &cfg.crops, &cfg.data, cfg.train.seed);
    let (train_loader, test_loader) = (mk(train)?, mk(test)?);
    let pick = |n: usize, limit: usize| -> Vec<u64> {
        let n = n as u64;
        if limit == 0 || limit as u64 >= n {
            return (0..n).collect();
        }
        // An evenly spaced subset: deterministic and class-balanced on shuffled sets.
        (0..limit as u64).map(|i| i * n / limit as u64).collect()
    };
    let train_ids = pick(train.len(), limits.0);
    let test_ids = pick(test.len(), limits.1);
    let (ftr, ltr) = extract_features(trainer, &train_loader, &train_ids, None)?;
    let (fte, lte) = extract_features(trainer, &test_loader, &test_ids, None)?;
    let opts = KnnOptions {
        ks: vec![cfg.eval.knn_k],
        temperature: cfg.eval.knn_temperature,
        ..KnnOptions::default()
    };
    Ok(knn_classify(&ftr, &ltr, &fte, &lte, &opts)?)
}

pub struct TrainArgs {
    pub config: Vec<PathBuf>,
    pub json: bool,
    pub max_steps: Option<i64>,
    pub output_dir: Option<PathBuf>,
    pub knn_train_limit: usize,
    pub knn_test_limit: usize,
    pub dist: DistArgs,
}

/// Sample ids of this rank's share of steps `first..last` of an epoch: the global batch of step
/// `s` is entries `s·b·W .. (s+1)·b·W` of the epoch permutation, and rank `R` takes every `W`-th
/// of them from `R` (official DINO's `DistributedSampler`, which deals the permutation out
/// round-robin, batched in order).
pub fn rank_batches(
    perm: &[u64],
    steps: std::ops::Range<usize>,
    b: usize,
    world: usize,
    rank: usize,
) -> Vec<Vec<u64>> {
    steps
        .map(|s| (0..b).map(|j| perm[(s * b + j) * world + rank]).collect())
        .collect()
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
    let steps_per_epoch = (n / (b * world)) as i64; // drop_last
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
        if leader {
            trainer.save_checkpoint(&scratch)?;
        }
        dist.broadcast_file(&scratch)?;
        if !leader {
            trainer
                .load_checkpoint(&scratch)
                .context("loading the state broadcast by rank 0")?;
        }
        std::fs::remove_file(&scratch)?;
    }
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
            format!(", {world} ranks ({} all-reduce), global batch {}", dist.transport(), b * world)
        } else {
            String::new()
        },
        if trainer.step > 0 { format!(", resumed at step {}", trainer.step) } else { String::new() }
    ));

    let mut skipped_total = 0usize;
    let mut last = None;
    let started = Instant::now();
    let start_step = trainer.step;
    let mut images_seen = 0usize;
    while trainer.step < total_steps {
        let epoch = trainer.step / steps_per_epoch;
        let first = (trainer.step % steps_per_epoch) as usize;
        let perm = epoch_permutation(cfg.train.seed, epoch as u64, n as u64);
        let last_in_epoch =
            (steps_per_epoch as usize).min(first + (total_steps - trainer.step) as usize);
        let steps = rank_batches(&perm, first..last_in_epoch, b, world, rank);
        let mut stream = loader.epoch(epoch as u64, steps);
        while let Some(mb) = stream.next() {
            let t0 = Instant::now();
            skipped_total += mb.skipped.len();
            for s in &mb.skipped {
                reporter.println(format!("skipped record: {s:?}"));
            }
            let batch = to_batch(&mb);
            // Global images: every rank takes the same share of each step.
            images_seen += mb.batch_size * world;
            stream.recycle(mb);
            let mut m = trainer.train_step(&batch, &dist)?;
            if world > 1 {
                // Each rank's losses are over its share; log those of the global batch.
                let mut v = [m.dino_loss, m.teacher_entropy, m.total];
                dist.mean(&mut v)?;
                [m.dino_loss, m.teacher_entropy, m.total] = v;
            }
            let step = trainer.step;
            let rate = images_seen as f64 / started.elapsed().as_secs_f64();
            reporter.set_step(
                step as u64,
                format!(
                    "epoch {epoch} loss {:.4} koleo {:.4} {:.1} img/s",
                    m.dino_loss, m.koleo_proto, rate
                ),
            );
            if step % cfg.train.log_every_steps == 0 || step == total_steps {
                let mut rec = serde_json::to_value(&m)?;
                rec["kind"] = json!("step");
                rec["step"] = json!(step);
                rec["epoch"] = json!(epoch);
                rec["step_seconds"] = json!(t0.elapsed().as_secs_f64());
                rec["images_per_second"] = json!(rate);
                rec["skipped_records"] = json!(skipped_total);
                reporter.record(&rec)?;
            }
            let analysis_due =
                cfg.eval.analysis_every_steps > 0 && step % cfg.eval.analysis_every_steps == 0;
            let checkpoint_due = cfg.train.checkpoint_every_steps > 0
                && step % cfg.train.checkpoint_every_steps == 0;
            if leader && analysis_due {
                let mut rec = collapse_record(&trainer, probe, false)?;
                let c0 = &rec["report"]["counts"][0];
                reporter.println(format!(
                    "step {step}: unique prototypes {} / {} at eps {} (teacher), KoLeo-proto {:.4}{}",
                    c0["greedy"],
                    cfg.head.out_dim,
                    c0["eps"],
                    rec["report"]["nn"]["koleo_proto"].as_f64().unwrap_or(f64::NAN),
                    match rec.get("usage") {
                        Some(u) => format!(
                            ", clusters used {}, usage entropy {:.3}",
                            u["used_clusters"],
                            u["mlcd"]["entropy"].as_f64().unwrap_or(f64::NAN)
                        ),
                        None => String::new(),
                    }
                ));
                rec["kind"] = json!("collapse");
                rec["step"] = json!(step);
                reporter.record(&rec)?;
            }
            if leader && checkpoint_due {
                save_checkpoint(&trainer, &out, cfg.train.checkpoint_keep as usize)?;
            }
            if analysis_due || checkpoint_due {
                dist.wait_for_leader()?;
            }
            last = Some(m);
            if trainer.step >= total_steps {
                break;
            }
        }
    }
    // The training loop's own time (data + steps + periodic analysis and checkpoints), without
    // the final checkpoint and evaluation below: the throughput figure benchmarks compare.
    let train_seconds = started.elapsed().as_secs_f64();
    reporter.finish();
    if !leader {
        // Rank 0 alone saves, analyses and evaluates the final state.
        reporter.record(&json!({
            "kind": "final",
            "rank": rank,
            "step": trainer.step,
            "train_seconds": train_seconds,
            "last_step": last,
        }))?;
        return Ok(());
    }
    let checkpoint = save_checkpoint(&trainer, &out, cfg.train.checkpoint_keep as usize)?;
    let collapse = collapse_record(&trainer, probe, true)?;
    let knn = match protodino_data::open_eval(&cfg.data, &data_root)? {
        Some((tr, te)) => Some(knn_eval(
            &trainer,
            &cfg,
            &tr,
            &te,
            (args.knn_train_limit, args.knn_test_limit),
        )?),
        None => None,
    };
    let steps_run = trainer.step - start_step;
    let report = json!({
        "kind": "final",
        "step": trainer.step,
        "steps_run": steps_run,
        "seconds": started.elapsed().as_secs_f64(),
        "train_seconds": train_seconds,
        "images_seen": images_seen,
        "images_per_second": images_seen as f64 / train_seconds.max(1e-9),
        "last_step": last,
        "collapse": collapse,
        "knn": knn,
        "skipped_records": skipped_total,
        "checkpoint": checkpoint,
    });
    reporter.record(&report)?;
    if !args.json {
        print_final(&report, &cfg);
    }
    Ok(())
}

fn print_final(r: &serde_json::Value, cfg: &TrainConfig) {
    println!("\n== protodino: final report (step {}) ==", r["step"]);
    if let Some(m) = r["last_step"].as_object() {
        println!(
            "DINO loss {:.4}   KoLeo-proto {:.4}   total {:.4}",
            m["dino_loss"].as_f64().unwrap_or(f64::NAN),
            m["koleo_proto"].as_f64().unwrap_or(f64::NAN),
            m["total"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "unique prototypes (teacher head, K = {}):",
        cfg.head.out_dim
    );
    for c in r["collapse"]["report"]["counts"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "  eps {:<6} greedy {:>6}  connected components {:>6}",
            c["eps"], c["greedy"], c["connected_components"]
        );
    }
    if let Some(u) = r["collapse"].get("usage") {
        println!(
            "prototype usage over {} training images: {} clusters used, MLCD entropy {:.3} (effective {:.1}), grouped at eps {}: {} of {} groups used",
            u["n_samples"],
            u["used_clusters"],
            u["mlcd"]["entropy"].as_f64().unwrap_or(f64::NAN),
            u["mlcd"]["effective_number"].as_f64().unwrap_or(f64::NAN),
            u["grouped"]["eps"],
            u["grouped"]["used_groups"],
            u["grouped"]["groups"]
        );
    }
    let nn = &r["collapse"]["report"]["nn"];
    println!(
        "prototype NN distance: mean {:.4}, min {:.4}",
        nn["mean"].as_f64().unwrap_or(f64::NAN),
        nn["min"].as_f64().unwrap_or(f64::NAN)
    );
    if let Some(k) = r["knn"].as_object() {
        for res in k["results"].as_array().into_iter().flatten() {
            println!(
                "k-NN (k = {}, T = {}): top-1 {:.2}%  top-5 {:.2}%  ({} train / {} test images)",
                res["k"],
                k["temperature"],
                res["top1"].as_f64().unwrap_or(f64::NAN),
                res["top5"].as_f64().unwrap_or(f64::NAN),
                k["n_train"],
                k["n_test"]
            );
        }
    } else {
        println!("k-NN: no labelled evaluation set configured");
    }
    println!(
        "{:.1} images/s; skipped records: {}; checkpoint {}",
        r["images_per_second"].as_f64().unwrap_or(0.0),
        r["skipped_records"],
        r["checkpoint"]
    );
}
