//! `protodino knn | linear | fewshot CHECKPOINT`: evaluate a checkpoint's teacher backbone on a
//! labelled data set (docs/algorithm.md §4). The model configuration comes from the checkpoint's
//! metadata, or from `--config` for checkpoints without one (converted official DINO weights).
//!
//! Features are extracted once with the evaluation transform (resize + centre crop); the linear
//! probe therefore trains on frozen features of un-augmented images, not on DINO's per-epoch
//! RandomResizedCrop + flip views (a documented, cheaper variant of §4.2).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use protodino_analysis::{
    FewShotOptions, KnnOptions, LinearProbeOptions, fewshot_eval, knn_classify, linear_probe,
};
use protodino_config::TrainConfig;
use protodino_data::{Loader, SharedDataset};

use crate::train::{Trainer, build_trainer, extract_features};

/// Which labelled sets to use: explicit train/test sets, or the configuration's evaluation sets.
pub struct EvalData {
    pub format: Option<protodino_config::DatasetFormat>,
    pub train: Option<PathBuf>,
    pub test: Option<PathBuf>,
    pub train_limit: usize,
    pub test_limit: usize,
}

/// The configuration stored in a checkpoint, else the given files.
pub fn checkpoint_config(checkpoint: &Path, config: &[PathBuf]) -> Result<TrainConfig> {
    if !config.is_empty() {
        return Ok(TrainConfig::load(config)?);
    }
    let metadata = protodino_dino::io::read_metadata(checkpoint)?;
    let meta = protodino_dino::checkpoint::read_meta(&metadata, checkpoint)?.context(
        "the checkpoint has no protodino metadata: pass --config with the model's configuration",
    )?;
    let cfg: TrainConfig =
        serde_json::from_value(meta.config).context("the checkpoint's configuration")?;
    cfg.validate()?;
    Ok(cfg)
}

/// A trainer holding the checkpoint's weights (only the teacher is used).
pub fn load_model(checkpoint: &Path, cfg: &TrainConfig) -> Result<Trainer> {
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads as i32);
    }
    let mut t = build_trainer(cfg, 1, 1)?;
    t.load_checkpoint(checkpoint)
        .with_context(|| format!("loading {}", checkpoint.display()))?;
    Ok(t)
}

fn datasets(cfg: &TrainConfig, d: &EvalData) -> Result<(SharedDataset, SharedDataset)> {
    match (&d.train, &d.test) {
        (Some(tr), Some(te)) => {
            let f = d.format.unwrap_or(cfg.data.format);
            Ok((
                protodino_data::open_dataset(f, tr)?,
                protodino_data::open_dataset(f, te)?,
            ))
        }
        (None, None) => protodino_data::open_eval(&cfg.data, &protodino_config::data_root())?
            .context("no labelled evaluation set: pass --train-set and --test-set"),
        _ => anyhow::bail!("--train-set and --test-set go together"),
    }
}

fn subset(n: usize, limit: usize) -> Vec<u64> {
    if limit == 0 || limit >= n {
        return (0..n as u64).collect();
    }
    (0..limit as u64)
        .map(|i| i * n as u64 / limit as u64)
        .collect()
}

pub enum Task {
    Knn {
        k: Vec<i64>,
        temperature: f64,
    },
    Linear {
        epochs: i64,
        lr: f64,
    },
    FewShot {
        shots: Vec<usize>,
        seeds: Vec<u64>,
        lambd: f64,
    },
}

pub fn run(
    checkpoint: &Path,
    config: &[PathBuf],
    data: EvalData,
    task: Task,
    json: bool,
) -> Result<()> {
    let cfg = checkpoint_config(checkpoint, config)?;
    let t = load_model(checkpoint, &cfg)?;
    let (train, test) = datasets(&cfg, &data)?;
    let mk = |ds: &SharedDataset| Loader::new(ds.clone(), &cfg.crops, &cfg.data, cfg.train.seed);
    let (ltr, lte) = (mk(&train)?, mk(&test)?);
    let (tr_ids, te_ids) = (
        subset(train.len(), data.train_limit),
        subset(test.len(), data.test_limit),
    );
    let probe = match &task {
        // ViT-B: last CLS + mean patch token; other ViTs: last 4 CLS (docs/algorithm.md §4.2).
        Task::Linear { .. } => Some(if cfg.model.arch == protodino_config::Arch::VitBase {
            (1, true)
        } else {
            (4, false)
        }),
        _ => None,
    };
    let (ftr, ytr) = extract_features(&t, &ltr, &tr_ids, probe)?;
    let (fte, yte) = extract_features(&t, &lte, &te_ids, probe)?;
    let report = match task {
        Task::Knn { k, temperature } => serde_json::to_value(knn_classify(
            &ftr,
            &ytr,
            &fte,
            &yte,
            &KnnOptions {
                ks: k,
                temperature,
                ..KnnOptions::default()
            },
        )?)?,
        Task::Linear { epochs, lr } => {
            let opts = LinearProbeOptions {
                epochs,
                lr,
                seed: cfg.train.seed,
                ..LinearProbeOptions::default()
            };
            serde_json::to_value(linear_probe(&ftr, &ytr, &fte, &yte, &opts)?)?
        }
        Task::FewShot {
            shots,
            seeds,
            lambd,
        } => {
            let opts = FewShotOptions {
                shots,
                seeds,
                lambd,
                ..FewShotOptions::default()
            };
            serde_json::to_value(fewshot_eval(&ftr, &ytr, &fte, &yte, &opts)?)?
        }
    };
    if json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
