//! The Python reference environment for golden-value scripts and side-by-side benchmarks:
//! a virtualenv in the cache with the same torch as our libtorch (2.11.0), the matching
//! torchvision, and the few packages the reference scripts use. CI's test suite never needs it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
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
    // Pinned: scripts/vmf_log_normaliser.py's fixture is SciPy's `ive` and `quad`.
    "scipy==1.17.1",
    "scikit-learn",
    "pyinstrument",
];

/// The virtualenv's python, provisioned on demand.
pub fn ensure() -> Result<PathBuf> {
    let wheels = cache_root().join("wheels");
    let bin = virtualenv(
        "pyref",
        "the Python reference environment",
        REQUIREMENTS,
        &[OsStr::new("--find-links"), wheels.as_os_str()],
        |bin| {
            let s = Command::new(bin.join("python"))
                .args([
                    "-c",
                    "import torch, torchvision; assert torch.__version__.startswith('2.11.0')",
                ])
                .status()?;
            ensure!(
                s.success(),
                "the reference environment's torch is not 2.11.0"
            );
            Ok(())
        },
    )?;
    Ok(bin.join("python"))
}

/// A virtualenv `<cache>/<name>` with `requirements` installed (`pip_args` before them) and
/// `check(bin)` passed, provisioned once: a marker file holds the requirements it was made
/// with, so changing the list re-provisions it. Returns its `bin/`.
pub fn virtualenv(
    name: &str,
    what: &str,
    requirements: &[&str],
    pip_args: &[&OsStr],
    check: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let venv = cache_root().join(name);
    let bin = venv.join("bin");
    let marker = venv.join(".protodino-complete");
    let want = requirements.join("\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(bin);
    }
    if !bin.join("python").exists() {
        eprintln!("xtask: creating {what} {}", venv.display());
        let s = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("python3 -m venv")?;
        ensure!(s.success(), "python3 -m venv failed");
    }
    let s = Command::new(bin.join("python"))
        .args(["-m", "pip", "install", "--quiet"])
        .args(pip_args)
        .args(requirements)
        .status()
        .with_context(|| format!("pip install of {what}"))?;
    ensure!(s.success(), "pip install {requirements:?} failed");
    check(&bin)?;
    std::fs::write(&marker, want)?;
    Ok(bin)
}
