//! `protodino replay --checkpoint CKPT --batch BATCH --config FILE [--out CKPT2]`: recompute
//! `{dino_loss, koleo_proto, total}` of a saved batch with a saved state, and with `--out` apply
//! one full optimiser step and write the resulting state. Schedule values come from the batch
//! file or the checkpoint's metadata unless a flag overrides them.

use std::path::PathBuf;

use anyhow::Result;
use protodino_config::TrainConfig;
use protodino_dino::{ReplayOverrides, replay};
use protodino_models::MultiCrop;

#[derive(clap::Args)]
pub struct ReplayArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// safetensors with `global_crops` [2, B, 3, G, G] and `local_crops` [L, B, 3, l, l].
    #[arg(long)]
    batch: PathBuf,
    #[arg(long, required = true)]
    config: Vec<PathBuf>,
    /// Apply one step and write the new state here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    epoch: Option<i64>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    momentum: Option<f64>,
    #[arg(long)]
    teacher_temp: Option<f64>,
    #[arg(long)]
    json: bool,
}

pub fn run(a: ReplayArgs) -> Result<()> {
    let cfg = TrainConfig::load(&a.config)?;
    let (model, head) = (cfg.model.clone(), cfg.head.clone());
    let overrides = ReplayOverrides {
        epoch: a.epoch,
        lr: a.lr,
        weight_decay: a.weight_decay,
        momentum: a.momentum,
        teacher_temp: a.teacher_temp,
    };
    let report = replay(
        cfg,
        &a.checkpoint,
        &a.batch,
        overrides,
        a.out.as_deref(),
        move |p, student| MultiCrop::new(p, &model, &head, student),
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "dino_loss {:.6}  koleo_proto {:.6}  total {:.6}{}",
            report.dino_loss,
            report.koleo_proto,
            report.total,
            if report.applied {
                "  (one step applied)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
