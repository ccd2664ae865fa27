//! Shared support for the end-to-end scenarios under `tests/tests/`: locating the workspace's
//! binaries (built by cargo for this profile) and running them as real processes; [`cluster`]
//! runs the training service (coordinator + workers) for the service scenarios, [`scenario`]
//! holds their shared recipe and the undisturbed single-process reference.

pub mod cluster;
pub mod faults;
/// Network namespaces (a bridge, veth pairs, a private `/dev/shm`) for the partition scenario.
pub mod netns;
pub mod scenario;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// Path of a workspace binary, built for the profile of this test run.
///
/// The first call of a test process builds every binary of the workspace with one
/// `cargo build --workspace --bins --tests`. Cargo unifies dependency features over the packages
/// and targets a command selects, so this is the selection of `cargo test --workspace`: under
/// `cargo xtask test` every dependency is already built and only the executables are linked.
/// A `--package P --bin B` build per binary compiled the shared dependencies (tokio, tonic,
/// rustls, ...) again for every distinct selection.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BINARIES: OnceLock<Vec<WorkspaceBinary>> = OnceLock::new();
    let all = BINARIES.get_or_init(build_workspace_binaries);
    let found: Vec<&WorkspaceBinary> = all
        .iter()
        .filter(|b| b.package == package && b.bin == bin)
        .collect();
    match found.as_slice() {
        [one] => one.path.clone(),
        _ => panic!(
            "binary {package}/{bin}: {} matches among the workspace's binaries {:?}",
            found.len(),
            all.iter()
                .map(|b| format!("{}/{}", b.package, b.bin))
                .collect::<Vec<_>>()
        ),
    }
}

/// One binary target cargo built: its package, its name and the executable.
struct WorkspaceBinary {
    package: String,
    bin: String,
    path: PathBuf,
}

/// `cargo build --workspace --bins --tests` for this test run's profile; the executables of the
/// binary targets from cargo's JSON messages.
fn build_workspace_binaries() -> Vec<WorkspaceBinary> {
    let mut cmd = nested_cargo();
    cmd.args([
        "build",
        "--workspace",
        "--bins",
        "--tests",
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(repo_root());
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build --workspace --bins --tests failed"
    );
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        // `--tests` also builds each binary's unit-test harness: same target, `profile.test`.
        let is_bin = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bin"))
            && msg["profile"]["test"] == false;
        let (Some("compiler-artifact"), true, Some(exe)) =
            (msg["reason"].as_str(), is_bin, msg["executable"].as_str())
        else {
            continue;
        };
        bins.push(WorkspaceBinary {
            package: package_name(msg["package_id"].as_str().unwrap_or_default()),
            bin: msg["target"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            path: PathBuf::from(exe),
        });
    }
    bins
}

/// `cargo`, for a command started from inside a cargo run, without the variables cargo set for
/// this process (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, `OUT_DIR`, ...). Build scripts such as
/// ring's declare `rerun-if-env-changed` on some of them, and cargo compares its own environment:
/// a nested build that inherited the test crate's values rebuilt ring, rustls, tonic and every
/// crate above them, and the next build from a shell rebuilt them back.
pub fn nested_cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            );
        if set_by_cargo {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// The package name of a cargo package id: `path+file:///…/worker#protodino-worker@0.1.0`, or
/// `path+file:///…/xtask#0.1.0` when the directory is the package's name.
fn package_name(id: &str) -> String {
    let (path, fragment) = id.rsplit_once('#').unwrap_or((id, ""));
    match fragment.split_once('@') {
        Some((name, _)) => name.to_string(),
        None => path.rsplit('/').next().unwrap_or_default().to_string(),
    }
}

/// Run `protodino ARGS` in `cwd`; panics with its output if it fails.
pub fn protodino(cwd: &Path, args: &[&str]) -> Output {
    let out = Command::new(binary("protodino-worker", "protodino"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("start protodino");
    assert!(
        out.status.success(),
        "protodino {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The JSON lines a command printed on stdout.
pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}
