//! `protodino`: the command-line interface of protodino. `main` only parses arguments and
//! dispatches; each command lives in its own module.
//!
//! Module map:
//! - `train/` — training: the step loop over a sink shared by `train` and the agent, the pure
//!   "what is due" policy, checkpoints, collapse analysis (background on rank 0), evaluation,
//!   the typed final report, the replica hash; `protodino train` itself (`train/standalone.rs`),
//!   in one process or as one rank of a static data-parallel group;
//! - `agent/` — `protodino worker`: registers with the coordinator, heartbeats, keeps an
//!   ordered report queue, reconnects, and runs each assignment as a training session on its own
//!   OS thread (`agent/session.rs`), with its `/metrics`;
//! - `dist.rs` — the data-parallel group over `protodino-collectives` (the ring's reducer, state
//!   broadcast, the losses all-reduce with the stop vote); `nccl.rs` — the CUDA reducer;
//! - `client.rs` — the user side of the job API (`submit`, `status`, `list`, `watch`, `cancel`,
//!   `checkpoints`);
//! - `prototypes.rs` — unique-prototype analysis of any checkpoint;
//! - `replay.rs` — recompute or re-apply one step of a saved batch;
//! - `eval.rs` — `knn`, `linear`, `fewshot`: evaluation of a checkpoint's teacher.

mod agent;
mod client;
mod dist;
mod eval;
mod nccl;
mod prototypes;
mod replay;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use protodino_analysis::Head;

#[derive(Parser)]
#[command(
    name = "protodino",
    version,
    about = "DINO + KoLeo-proto self-supervised training"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct EvalArgs {
    /// A protodino checkpoint (or converted official DINO weights with --config).
    checkpoint: PathBuf,
    /// Model configuration for checkpoints without protodino metadata.
    #[arg(long)]
    config: Vec<PathBuf>,
    /// Labelled training set (default: the configuration's evaluation sets).
    #[arg(long)]
    train_set: Option<PathBuf>,
    /// Labelled test set.
    #[arg(long)]
    test_set: Option<PathBuf>,
    /// Format of --train-set/--test-set: image_folder, file_list or shards.
    #[arg(long, value_parser = parse_format)]
    format: Option<protodino_config::DatasetFormat>,
    /// Use an evenly spaced subset of at most this many training images (0 = all).
    #[arg(long, default_value_t = 0)]
    train_limit: usize,
    /// Use an evenly spaced subset of at most this many test images (0 = all).
    #[arg(long, default_value_t = 0)]
    test_limit: usize,
    #[arg(long)]
    json: bool,
}

fn parse_format(s: &str) -> Result<protodino_config::DatasetFormat, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("unknown format {s:?}"))
}

#[derive(Subcommand)]
enum Cmd {
    /// Train DINO + KoLeo-proto, alone or as one rank of a data-parallel group (--world > 1,
    /// group secret in PROTODINO_GROUP_SECRET).
    Train {
        /// Configuration files, layered over configs/default.toml (then PROTODINO__* variables).
        #[arg(long, required = true)]
        config: Vec<PathBuf>,
        /// Stop after this many steps (overrides train.max_steps).
        #[arg(long)]
        max_steps: Option<i64>,
        /// Output directory (overrides train.output_dir).
        #[arg(long)]
        output_dir: Option<PathBuf>,
        /// k-NN on at most this many training images of the evaluation set (0 = all; default
        /// eval.knn_train_images).
        #[arg(long)]
        knn_train_limit: Option<usize>,
        /// k-NN on at most this many test images (0 = all; default eval.knn_test_images).
        #[arg(long)]
        knn_test_limit: Option<usize>,
        /// JSON lines on stdout instead of a progress bar.
        #[arg(long)]
        json: bool,
        /// Ranks of the data-parallel group (1: train alone).
        #[arg(long, default_value_t = 1)]
        world: usize,
        /// This process's rank, 0..world; rank 0 owns checkpoints, analysis and evaluation.
        #[arg(long, default_value_t = 0)]
        rank: usize,
        /// Every rank's address host:port, in rank order (comma separated).
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
        /// Listen here instead of on this rank's entry of --peers (e.g. 0.0.0.0:29500).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Serve a coordinator: register, take assignments and train them (the training service's
    /// worker agent; join token in --join-token-file or PROTODINO_JOIN_TOKEN).
    Worker(agent::AgentArgs),
    #[command(flatten)]
    Client(client::ClientCmd),
    /// Unique prototypes, nearest-neighbour statistics and norms of a checkpoint's prototype
    /// layers (protodino's or a converted official DINO / iBOT checkpoint).
    Prototypes {
        checkpoint: PathBuf,
        /// Thresholds ε (comma separated).
        #[arg(long, value_delimiter = ',', default_value = "0.01,0.025,0.05,0.1")]
        eps: Vec<f64>,
        /// teacher or student.
        #[arg(long, default_value = "teacher")]
        head: Head,
        /// last_layer (DINO / CLS prototypes), last_layer2 (iBOT patch prototypes) or all (every
        /// prototype layer the head has, each reported on its own).
        #[arg(long, default_value = "all")]
        layer: protodino_analysis::prototypes::LayerSelection,
        /// One JSON line per layer.
        #[arg(long)]
        json: bool,
    },
    /// Recompute {dino_loss, koleo_proto, total} of a saved batch; with --out apply one step.
    Replay(replay::ReplayArgs),
    /// Weighted k-NN of a checkpoint's teacher features.
    Knn {
        #[command(flatten)]
        data: EvalArgs,
        #[arg(long, value_delimiter = ',', default_value = "10,20,100,200")]
        k: Vec<i64>,
        #[arg(long, default_value_t = 0.07)]
        temperature: f64,
    },
    /// Linear probe on frozen teacher features.
    Linear {
        #[command(flatten)]
        data: EvalArgs,
        #[arg(long, default_value_t = 100)]
        epochs: i64,
        #[arg(long, default_value_t = 0.001)]
        lr: f64,
    },
    /// Few-shot logistic regression (1/2/5 images per class, 3 seeds).
    Fewshot {
        #[command(flatten)]
        data: EvalArgs,
        #[arg(long, value_delimiter = ',', default_value = "1,2,5")]
        shots: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
        seeds: Vec<u64>,
        #[arg(long, default_value_t = 0.00025)]
        lambd: f64,
    },
    /// Versions of protodino and libtorch, and one tensor op as a smoke test.
    Version {
        #[arg(long)]
        json: bool,
    },
}

fn eval_cmd(a: EvalArgs, task: eval::Task) -> Result<()> {
    let data = eval::EvalData {
        format: a.format,
        train: a.train_set,
        test: a.test_set,
        train_limit: a.train_limit,
        test_limit: a.test_limit,
    };
    eval::run(&a.checkpoint, &a.config, data, task, a.json)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Train {
            config,
            max_steps,
            output_dir,
            knn_train_limit,
            knn_test_limit,
            json,
            world,
            rank,
            peers,
            listen,
        } => train::run(train::TrainArgs {
            config,
            json,
            max_steps,
            output_dir,
            knn_train_limit,
            knn_test_limit,
            dist: dist::DistArgs {
                world,
                rank,
                peers,
                listen,
            },
        }),
        Cmd::Worker(args) => agent::run(args),
        Cmd::Client(cmd) => client::run(cmd),
        Cmd::Prototypes {
            checkpoint,
            eps,
            head,
            layer,
            json,
        } => prototypes::run(&checkpoint, eps, head, layer, json),
        Cmd::Replay(args) => replay::run(args),
        Cmd::Knn {
            data,
            k,
            temperature,
        } => eval_cmd(data, eval::Task::Knn { k, temperature }),
        Cmd::Linear { data, epochs, lr } => eval_cmd(data, eval::Task::Linear { epochs, lr }),
        Cmd::Fewshot {
            data,
            shots,
            seeds,
            lambd,
        } => eval_cmd(
            data,
            eval::Task::FewShot {
                shots,
                seeds,
                lambd,
            },
        ),
        Cmd::Version { json } => version(json),
    }
}

fn version(json: bool) -> Result<()> {
    let x = tch::Tensor::arange(4, (tch::Kind::Float, tch::Device::Cpu));
    let sum = x.sum(tch::Kind::Float).double_value(&[]);
    anyhow::ensure!(sum == 6.0, "libtorch smoke op gave {sum}");
    let info = serde_json::json!({
        "protodino": env!("CARGO_PKG_VERSION"),
        "cuda_available": tch::Cuda::is_available(),
        "threads": tch::get_num_threads(),
    });
    if json {
        println!("{info}");
    } else {
        println!(
            "protodino {} (libtorch smoke op ok, cuda: {}, threads: {})",
            env!("CARGO_PKG_VERSION"),
            info["cuda_available"],
            info["threads"]
        );
    }
    Ok(())
}
