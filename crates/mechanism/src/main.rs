//! `protodino-mechanism`: train only a DINO head on frozen features and watch its prototypes
//! (docs/mechanism.md). Two feature sources: `synthetic` (clusters on the sphere) and `real`
//! (Fashion-MNIST crops through a protodino backbone, cached). Writes one JSON record per run
//! into the output directory and prints a short table.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use protodino_mechanism::encoder::{RealSpec, cached};
use protodino_mechanism::experiment::{DEFAULT_EPS, MechanismOptions, run};
use protodino_mechanism::synthetic::{SyntheticSpec, generate};
use protodino_mechanism::table::{analysis_table, run_table};

#[derive(Parser, Debug)]
#[command(
    name = "protodino-mechanism",
    about = "Train only a DINO head (MLP + bottleneck + weight-normalised prototypes) on frozen features \
             with the product's loss, centring, KoLeo-proto, AdamW, schedules and EMA teacher; report \
             unique prototypes, NN statistics, KoLeo-proto, displacement, target sharpness and usage \
             of both heads"
)]
struct Cli {
    #[command(subcommand)]
    source: Source,
}

#[derive(Subcommand, Debug)]
enum Source {
    /// Synthetic clustered features: C clusters on the unit sphere, two noisy views per sample.
    Synthetic {
        #[arg(long, default_value_t = 16)]
        clusters: i64,
        #[arg(long, default_value_t = 128)]
        dim: i64,
        #[arg(long, default_value_t = 4096)]
        samples: i64,
        /// Noise norm around a cluster centre, relative to the centre's.
        #[arg(long, default_value_t = 0.5)]
        spread: f64,
        /// Noise norm of a view around its sample.
        #[arg(long, default_value_t = 0.2)]
        view_noise: f64,
        /// Largest over smallest class size (1 = balanced, >1 = long-tailed).
        #[arg(long, default_value_t = 1.0)]
        imbalance: f64,
        /// Seed of the features (the run's --seed seeds the head).
        #[arg(long, default_value_t = 0)]
        data_seed: i64,
        #[command(flatten)]
        common: Common,
    },
    /// Real frozen features: two augmented global crops of Fashion-MNIST images through the
    /// teacher backbone of a protodino checkpoint (or a seeded random one), cached.
    Real {
        /// A protodino checkpoint (its stored configuration builds the encoder).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Encoder configuration files without a checkpoint.
        #[arg(long = "encoder-config", default_value = "configs/cpu-demo.toml")]
        encoder_config: Vec<PathBuf>,
        /// Images, evenly spaced over the training set (0 = all).
        #[arg(long, default_value_t = 3200)]
        images: usize,
        /// The feature cache (safetensors); made when absent. Default:
        /// <out>/features-<random|checkpoint-stem>-<images>.safetensors.
        #[arg(long)]
        features_cache: Option<PathBuf>,
        /// Data set root (default: where `cargo xtask data` provisions them).
        #[arg(long)]
        data_root: Option<PathBuf>,
        /// Centre and scale every feature dimension, then L2-normalise the rows (after the
        /// cache: the cache holds the raw features).
        #[arg(long)]
        standardize: bool,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args, Debug)]
struct Common {
    /// K prototypes.
    #[arg(long, default_value_t = 1024)]
    k: i64,
    /// KoLeo-proto weight (0: not in the loss; always measured).
    #[arg(long, default_value_t = 0.0)]
    lambda: f64,
    /// Training steps (rounded up to whole passes over the samples).
    #[arg(long, default_value_t = 1000)]
    steps: i64,
    #[arg(long, default_value_t = 256)]
    batch: i64,
    /// Base learning rate per 256 samples (scaled by batch/256).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-6)]
    min_lr: f64,
    #[arg(long, default_value_t = 2)]
    warmup_epochs: i64,
    #[arg(long, default_value_t = 0.04)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.4)]
    weight_decay_end: f64,
    #[arg(long, default_value_t = 3.0)]
    clip_grad: f64,
    #[arg(long, default_value_t = 0)]
    freeze_last_layer: i64,
    /// Teacher EMA momentum at the start (cosine to 1).
    #[arg(long, default_value_t = 0.99)]
    momentum: f64,
    #[arg(long, default_value_t = 0.04)]
    teacher_temp: f64,
    /// Teacher temperature at epoch 0 (linear to --teacher-temp over the warm-up epochs).
    #[arg(long)]
    warmup_teacher_temp: Option<f64>,
    #[arg(long, default_value_t = 0)]
    warmup_teacher_temp_epochs: i64,
    #[arg(long, default_value_t = 0.1)]
    student_temp: f64,
    #[arg(long, default_value_t = 0.9)]
    center_momentum: f64,
    #[arg(long, default_value_t = 512)]
    hidden_dim: i64,
    #[arg(long, default_value_t = 256)]
    bottleneck_dim: i64,
    #[arg(long, default_value_t = 3)]
    nlayers: i64,
    /// Seed of the head's initialisation and of the sample order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Log a step record every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: i64,
    /// Analyse both heads every N steps (and at steps 0 and last; 0 = only those).
    #[arg(long, default_value_t = 100)]
    analysis_every: i64,
    /// Samples of the usage probe (0 = all).
    #[arg(long, default_value_t = 2048)]
    probe: i64,
    /// Unique-prototype thresholds (the first groups the grouped MLCD).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_EPS.to_vec())]
    eps: Vec<f64>,
    /// libtorch intra-op threads.
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// Output directory of the JSON record.
    #[arg(long, default_value = "runs/mechanism")]
    out: PathBuf,
    /// Name of the record (default: <source>-k<K>-lambda<λ>-seed<seed>).
    #[arg(long)]
    name: Option<String>,
    /// Print only the final table (no per-analysis lines).
    #[arg(long)]
    quiet: bool,
}

impl Common {
    fn options(&self) -> MechanismOptions {
        MechanismOptions {
            k: self.k,
            lambda: self.lambda,
            steps: self.steps,
            batch: self.batch,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_epochs: self.warmup_epochs,
            weight_decay: self.weight_decay,
            weight_decay_end: self.weight_decay_end,
            clip_grad: self.clip_grad,
            freeze_last_layer: self.freeze_last_layer,
            momentum: self.momentum,
            teacher_temp: self.teacher_temp,
            warmup_teacher_temp: self.warmup_teacher_temp.unwrap_or(self.teacher_temp),
            warmup_teacher_temp_epochs: self.warmup_teacher_temp_epochs,
            student_temp: self.student_temp,
            center_momentum: self.center_momentum,
            hidden_dim: self.hidden_dim,
            bottleneck_dim: self.bottleneck_dim,
            nlayers: self.nlayers,
            seed: self.seed,
            log_every: self.log_every,
            analysis_every: self.analysis_every,
            probe: self.probe,
            eps: self.eps.clone(),
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let (features, common, source) = match &cli.source {
        Source::Synthetic {
            clusters,
            dim,
            samples,
            spread,
            view_noise,
            imbalance,
            data_seed,
            common,
        } => {
            tch::set_num_threads(common.threads);
            let spec = SyntheticSpec {
                clusters: *clusters,
                dim: *dim,
                samples: *samples,
                spread: *spread,
                view_noise: *view_noise,
                imbalance: *imbalance,
                seed: *data_seed,
            };
            (generate(&spec)?, common, "synthetic")
        }
        Source::Real {
            checkpoint,
            encoder_config,
            images,
            features_cache,
            data_root,
            standardize,
            common,
        } => {
            tch::set_num_threads(common.threads);
            let spec = RealSpec {
                checkpoint: checkpoint.clone(),
                config: encoder_config.clone(),
                images: *images,
                data_root: data_root
                    .clone()
                    .unwrap_or_else(protodino_config::data_root),
            };
            let cache = features_cache.clone().unwrap_or_else(|| {
                let enc = checkpoint
                    .as_ref()
                    .and_then(|c| c.file_stem())
                    .map_or("random".to_string(), |s| s.to_string_lossy().into_owned());
                common
                    .out
                    .join(format!("features-{enc}-{images}.safetensors"))
            });
            let raw = cached(&spec, &cache)?;
            let set = if *standardize {
                raw.standardized()?
            } else {
                raw
            };
            (set, common, "real")
        }
    };
    let opts = common.options();
    let quiet = common.quiet;
    let record = run(&features, &opts, |a| {
        if !quiet {
            print!("{}", analysis_table(a, opts.k));
        }
    })?;
    std::fs::create_dir_all(&common.out)
        .with_context(|| format!("creating {}", common.out.display()))?;
    let name = common.name.clone().unwrap_or_else(|| {
        format!(
            "{source}-k{}-lambda{}-seed{}",
            opts.k, opts.lambda, opts.seed
        )
    });
    let path = common.out.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\n== protodino-mechanism ==\n{}", run_table(&record));
    println!("record: {}", path.display());
    Ok(())
}
