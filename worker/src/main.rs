//! `protodino`: the command-line interface of protodino.

use anyhow::Result;
use clap::{Parser, Subcommand};

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

#[derive(Subcommand)]
enum Cmd {
    /// Print the versions of protodino and the libtorch it runs on, and run one tensor op.
    Version {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Version { json } => {
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
        }
    }
    Ok(())
}
