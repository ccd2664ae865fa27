//! The Python reference environment for golden-value scripts and side-by-side benchmarks:
//! a virtualenv in the cache with the same torch as our libtorch (2.11.0), the matching
//! torchvision, and the few packages the reference scripts use. CI's test suite never needs it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::cache_root;

/// Pinned requirements; changing the list re-provisions the environment.
pub const REQUIREMENTS: &[&str] = &[
    "torch==2.11.0",
    "torchvision==0.26.0",
    "pillow",
    "numpy",
    "safetensors",
    "scipy",
    "scikit-learn",
    "pyinstrument",
];

/// The virtualenv's python, provisioned on demand.
pub fn ensure() -> Result<PathBuf> {
    let venv = cache_root().join("pyref");
    let python = venv.join("bin/python");
    let marker = venv.join(".protodino-complete");
    let want = REQUIREMENTS.join("\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(python);
    }
    if !python.exists() {
        eprintln!(
            "xtask: creating the Python reference environment {}",
            venv.display()
        );
        let s = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("python3 -m venv")?;
        ensure!(s.success(), "python3 -m venv failed");
    }
    let wheels = cache_root().join("wheels");
    let s = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--find-links"])
        .arg(&wheels)
        .args(REQUIREMENTS)
        .status()
        .context("pip install of the reference environment")?;
    ensure!(s.success(), "pip install {REQUIREMENTS:?} failed");
    let s = Command::new(&python)
        .args([
            "-c",
            "import torch, torchvision; assert torch.__version__.startswith('2.11.0')",
        ])
        .status()?;
    ensure!(
        s.success(),
        "the reference environment's torch is not 2.11.0"
    );
    std::fs::write(&marker, want)?;
    Ok(python)
}
