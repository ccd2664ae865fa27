//! `cargo xtask convert IN OUT [flags]`: an official DINO / iBOT `.pth` checkpoint to protodino's
//! safetensors format, by `scripts/convert_official.py` in the Python reference environment
//! (provisioned on first use; docs/checkpoints.md).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Args;

use crate::{pyref, repo_root};

/// Arguments of `cargo xtask convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// The official checkpoint (.pth): a full DINO or iBOT checkpoint, or a bare state dict.
    pub input: PathBuf,
    /// The protodino checkpoint to write (.safetensors).
    pub output: PathBuf,
    /// Flags of the converter: `--prefix teacher|student[.module…]` for a bare state dict,
    /// `--allow-pickle` for trusted files that weights_only loading refuses.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub flags: Vec<OsString>,
}

/// The converter's script in the repository.
pub fn script() -> PathBuf {
    repo_root().join("scripts/convert_official.py")
}

/// Run the converter on `args` with the reference environment's python. A refusal has been
/// explained by the script on stderr, so xtask then exits with the script's status and adds
/// nothing.
pub fn convert(args: ConvertArgs) -> Result<()> {
    let python = pyref::ensure()?;
    let status = Command::new(&python)
        .arg(script())
        .arg(&args.input)
        .arg(&args.output)
        .args(&args.flags)
        .status()
        .with_context(|| format!("starting {}", python.display()))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
