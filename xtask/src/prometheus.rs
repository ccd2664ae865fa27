//! A real Prometheus server and promtool for the metrics test, from Debian's `prometheus`
//! package without installing it: `apt-get download` fetches the `.deb` into
//! `<cache>/prometheus/` (after `apt-get update` only when the first try fails) and
//! `dpkg-deb -x` unpacks it next to it, so nothing outside the cache changes and a second run
//! downloads nothing. The two binaries' paths go to the tests through environment variables.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::cache_root;

/// Environment variable naming the `prometheus` server executable for the tests.
pub const PROMETHEUS_ENV: &str = "PROTODINO_PROMETHEUS";
/// Environment variable naming the `promtool` executable for the tests.
pub const PROMTOOL_ENV: &str = "PROTODINO_PROMTOOL";

/// The package whose binaries are used.
const PACKAGE: &str = "prometheus";

/// The provisioned binaries.
pub struct Binaries {
    pub prometheus: PathBuf,
    pub promtool: PathBuf,
}

/// `<cache>/prometheus`: the downloaded `.deb` and its unpacked tree `root/`.
fn dir() -> PathBuf {
    cache_root().join("prometheus")
}

fn binaries(root: &Path) -> Binaries {
    Binaries {
        prometheus: root.join("usr/bin/prometheus"),
        promtool: root.join("usr/bin/promtool"),
    }
}

/// The version line `bin --version` prints (both tools print it on stdout or stderr).
fn version(bin: &Path) -> Result<String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} --version failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.contains("version"))
        .with_context(|| format!("{} --version printed no version: {text}", bin.display()))?;
    Ok(line.trim().to_string())
}

/// Both binaries answer `--version`.
fn check(b: &Binaries) -> Result<(String, String)> {
    Ok((version(&b.prometheus)?, version(&b.promtool)?))
}

/// The package file in `dir`, if one was downloaded.
fn downloaded(dir: &Path) -> Option<PathBuf> {
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{PACKAGE}_")) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    debs.pop()
}

fn apt_get(dir: &Path, args: &[&str]) -> Result<bool> {
    eprintln!("xtask: apt-get {} (in {})", args.join(" "), dir.display());
    let status = Command::new("apt-get")
        .args(args)
        .current_dir(dir)
        .status()
        .context("running apt-get (Debian's package tool is needed for the Prometheus test)")?;
    Ok(status.success())
}

/// Downloads the package into `dir` (the package lists are refreshed only when the download
/// fails without them).
fn download(dir: &Path) -> Result<PathBuf> {
    if !apt_get(dir, &["download", PACKAGE])? {
        ensure!(
            apt_get(dir, &["update"])?,
            "apt-get update failed; cannot download {PACKAGE}"
        );
        ensure!(
            apt_get(dir, &["download", PACKAGE])?,
            "apt-get download {PACKAGE} failed"
        );
    }
    downloaded(dir).with_context(|| {
        format!(
            "apt-get download {PACKAGE} succeeded but left no {PACKAGE}_*.deb in {}",
            dir.display()
        )
    })
}

/// The binaries, provisioned on demand (and checked with `--version`).
pub fn ensure() -> Result<Binaries> {
    let dir = dir();
    let root = dir.join("root");
    let bins = binaries(&root);
    if bins.prometheus.exists()
        && bins.promtool.exists()
        && let Ok((server, tool)) = check(&bins)
    {
        eprintln!("xtask: {server}; {tool} (cached)");
        return Ok(bins);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let deb = match downloaded(&dir) {
        Some(d) => d,
        None => download(&dir)?,
    };
    // Unpack next to the final tree and move it into place, so an interrupted run never
    // leaves a half-unpacked tree that looks provisioned.
    let partial = dir.join("root.partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&partial)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        // A broken download is fetched again next time.
        let _ = std::fs::remove_file(&deb);
        bail!("dpkg-deb -x {} failed with {status}", deb.display());
    }
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::rename(&partial, &root)?;
    let (server, tool) = check(&bins)?;
    eprintln!("xtask: {server}; {tool} (unpacked from {})", deb.display());
    Ok(bins)
}
