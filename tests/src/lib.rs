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
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static CACHE: OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = format!("{package}/{bin}");
    if let Some(p) = cache.lock().unwrap().get(&key) {
        return p.clone();
    }
    let built = escargot::CargoBuild::new()
        .manifest_path(repo_root().join("Cargo.toml"))
        .package(package)
        .bin(bin)
        .current_release()
        .run()
        .unwrap_or_else(|e| panic!("building {key}: {e}"));
    let path = built.path().to_path_buf();
    cache.lock().unwrap().insert(key, path.clone());
    path
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
