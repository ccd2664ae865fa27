//! Provision libtorch 2.11.0 for CPU builds from the PyPI wheels, with no manual step.
//!
//! 1. `pip download` the `torch==2.11.0` wheel; read its metadata for the pinned `cuda-toolkit`
//!    version, then that package's metadata for the `nvidia-cuda-runtime` and `nvidia-cuda-cupti`
//!    pins, and download those two wheels (no URL is written down anywhere).
//! 2. Extract `torch/lib` (CPU libraries only) and `torch/include`, plus `libcudart.so.13` and
//!    `libcupti.so.13`, which `libtorch_cpu.so` lists as needed, into a temporary directory.
//! 3. Drop `libtorch_cuda.so` from `libtorch.so`'s needed list (a CPU-only libtorch never loads it), write
//!    `build-version`, check with `ldd` that every library resolves, then rename the directory
//!    into place: an interrupted run leaves only a temporary directory that the next run removes.
//! 4. Point the repository's `.libtorch` link (read by `.cargo/config.toml`) at it.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::{cache_root, repo_root};

pub const TORCH_VERSION: &str = "2.11.0";

/// Libraries of the wheel that a CPU build needs (everything else is CUDA or Python).
const CPU_LIBS: &[&str] = &[
    "libc10.so",
    "libtorch.so",
    "libtorch_cpu.so",
    "libtorch_global_deps.so",
    "libgomp.so.1",
    "libshm.so",
];

/// The provisioned directory for this version.
pub fn install_dir() -> PathBuf {
    cache_root().join(format!("libtorch-{TORCH_VERSION}-cpu"))
}

/// What the build will use: a user-chosen libtorch, or ours (provisioned on demand).
pub fn ensure() -> Result<PathBuf> {
    let ours = repo_root().join(".libtorch");
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        eprintln!("xtask: LIBTORCH_USE_PYTORCH is set: using the Python torch install");
        return Ok(PathBuf::new());
    }
    if let Some(user) = std::env::var_os("LIBTORCH").map(PathBuf::from)
        && user != ours
    {
        ensure!(
            user.join("lib").is_dir(),
            "LIBTORCH={} has no lib/ directory",
            user.display()
        );
        eprintln!("xtask: using LIBTORCH={}", user.display());
        return Ok(user);
    }
    let dir = install_dir();
    if !dir.join(".protodino-complete").exists() {
        provision(&dir)?;
    }
    link(&dir, &ours)?;
    Ok(dir)
}

fn link(target: &Path, link: &Path) -> Result<()> {
    if fs::read_link(link).ok().as_deref() == Some(target) {
        return Ok(());
    }
    let tmp = link.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, link).with_context(|| format!("linking {}", link.display()))?;
    Ok(())
}

pub fn pip_download(spec: &str, dest: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dest)?;
    let before: Vec<_> = wheel_files(dest)?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
        ])
        .arg(dest)
        .arg(spec)
        .status()
        .context(
            "running `python3 -m pip` (python3 with pip is needed to fetch the torch wheel)",
        )?;
    ensure!(status.success(), "pip download {spec} failed");
    let name = spec
        .split(['=', '<', '>', '['])
        .next()
        .unwrap()
        .replace('-', "_")
        .to_lowercase();
    let version = spec
        .split("==")
        .nth(1)
        .map(|v| v.trim_end_matches(".*").to_string());
    let mut matches: Vec<PathBuf> = wheel_files(dest)?
        .into_iter()
        .filter(|p| {
            let f = p.file_name().unwrap().to_string_lossy().to_lowercase();
            f.starts_with(&format!("{name}-"))
                && version
                    .as_ref()
                    .is_none_or(|v| f.starts_with(&format!("{name}-{v}")))
        })
        .collect();
    matches.sort_by_key(|p| !before.contains(p));
    matches.pop().with_context(|| {
        format!(
            "pip reported success but no wheel for {spec} is in {}",
            dest.display()
        )
    })
}

fn wheel_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "whl"))
        .collect())
}

/// `Requires-Dist` lines of a wheel's METADATA.
pub fn requires_dist(wheel: &Path) -> Result<Vec<String>> {
    let mut zip = zip::ZipArchive::new(fs::File::open(wheel)?)?;
    let name = (0..zip.len())
        .filter_map(|i| zip.by_index(i).ok().map(|f| f.name().to_string()))
        .find(|n| n.ends_with(".dist-info/METADATA"))
        .context("wheel without METADATA")?;
    let mut text = String::new();
    zip.by_name(&name)?.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("Requires-Dist: "))
        .map(str::to_string)
        .collect())
}

/// The `==version` pin of `package` in a list of requirements (ignoring environment markers).
fn pin(reqs: &[String], package: &str) -> Result<String> {
    reqs.iter()
        .find_map(|r| {
            let (head, _) = r.split_once(';').unwrap_or((r, ""));
            let head = head.trim();
            let base = head.split(['[', '=', '<', '>', ' ']).next()?;
            if base != package {
                return None;
            }
            Some(head.split("==").nth(1)?.trim().to_string())
        })
        .with_context(|| format!("no `{package}==` pin in the wheel metadata"))
}

fn provision(dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap();
    fs::create_dir_all(parent)?;
    // Remove what an interrupted run left.
    for e in fs::read_dir(parent)?.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with(&format!(
            "{}.tmp-",
            dir.file_name().unwrap().to_string_lossy()
        )) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let wheels = cache_root().join("wheels");
    eprintln!("xtask: fetching torch=={TORCH_VERSION} and its CUDA runtime/CUPTI wheels");
    let torch = pip_download(&format!("torch=={TORCH_VERSION}"), &wheels)?;
    let toolkit_version = pin(&requires_dist(&torch)?, "cuda-toolkit")?;
    let toolkit = pip_download(&format!("cuda-toolkit=={toolkit_version}"), &wheels)?;
    let toolkit_reqs = requires_dist(&toolkit)?;
    let runtime = pip_download(
        &format!(
            "nvidia-cuda-runtime=={}",
            pin(&toolkit_reqs, "nvidia-cuda-runtime")?
        ),
        &wheels,
    )?;
    let cupti = pip_download(
        &format!(
            "nvidia-cuda-cupti=={}",
            pin(&toolkit_reqs, "nvidia-cuda-cupti")?
        ),
        &wheels,
    )?;

    let tmp = parent.join(format!(
        "{}.tmp-{}",
        dir.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    fs::create_dir_all(tmp.join("lib"))?;
    eprintln!("xtask: extracting libtorch into {}", dir.display());
    extract(&torch, &tmp, |name| {
        if let Some(rest) = name.strip_prefix("torch/include/") {
            return Some(PathBuf::from("include").join(rest));
        }
        let file = name.strip_prefix("torch/lib/")?;
        CPU_LIBS
            .contains(&file)
            .then(|| PathBuf::from("lib").join(file))
    })?;
    for (wheel, lib) in [(&runtime, "libcudart.so.13"), (&cupti, "libcupti.so.13")] {
        let n = extract(wheel, &tmp, |name| {
            name.ends_with(&format!("/{lib}"))
                .then(|| PathBuf::from("lib").join(lib))
        })?;
        ensure!(n == 1, "{} holds no {lib}", wheel.display());
    }
    let libtorch = tmp.join("lib/libtorch.so");
    let mut bytes = fs::read(&libtorch)?;
    crate::elf::remove_needed(&mut bytes, "libtorch_cuda.so")?;
    fs::write(&libtorch, bytes)?;
    fs::write(tmp.join("build-version"), format!("{TORCH_VERSION}\n"))?;
    verify(&tmp)?;
    fs::write(
        tmp.join(".protodino-complete"),
        format!(
            "torch {TORCH_VERSION} from {}\n",
            torch.file_name().unwrap().to_string_lossy()
        ),
    )?;
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::rename(&tmp, dir)?;
    eprintln!(
        "xtask: libtorch {TORCH_VERSION} (CPU) ready, {} MiB",
        dir_size(dir)? >> 20
    );
    Ok(())
}

/// Extract the members that `map` names into `root`; returns how many were written.
fn extract(wheel: &Path, root: &Path, map: impl Fn(&str) -> Option<PathBuf>) -> Result<usize> {
    let mut zip = zip::ZipArchive::new(fs::File::open(wheel)?)
        .with_context(|| format!("reading {}", wheel.display()))?;
    let mut n = 0;
    for i in 0..zip.len() {
        let mut f = zip.by_index(i)?;
        if f.is_dir() {
            continue;
        }
        let Some(rel) = map(f.name()) else { continue };
        let out = root.join(rel);
        fs::create_dir_all(out.parent().unwrap())?;
        let mut w = fs::File::create(&out)?;
        std::io::copy(&mut f, &mut w)?;
        n += 1;
    }
    Ok(n)
}

/// Every needed library of the CPU set must resolve (inside `lib/` or on the system).
fn verify(dir: &Path) -> Result<()> {
    for lib in ["libtorch.so", "libtorch_cpu.so", "libc10.so"] {
        let path = dir.join("lib").join(lib);
        let out = Command::new("ldd")
            .arg(&path)
            .env("LD_LIBRARY_PATH", dir.join("lib"))
            .output()
            .context("running ldd")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(missing) = text.lines().find(|l| l.contains("not found")) {
            bail!("{}: {}", path.display(), missing.trim());
        }
    }
    let needed = crate::elf::needed(&fs::read(dir.join("lib/libtorch.so"))?)?;
    ensure!(
        !needed.iter().any(|n| n.contains("cuda")),
        "libtorch.so still needs {needed:?}"
    );
    Ok(())
}

pub fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = fs::symlink_metadata(e.path())?;
        total += if m.is_dir() {
            dir_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(total)
}
