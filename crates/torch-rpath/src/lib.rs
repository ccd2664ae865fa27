//! Build-script helper for crates that link libtorch through `tch`.
//!
//! `torch-sys` finds libtorch at build time (`LIBTORCH`, or `LIBTORCH_USE_PYTORCH` for a Python
//! torch install) but leaves the run-time search to the user. Calling [`emit`] from a crate's
//! `build.rs` adds the same library directory as an rpath of every binary and test of that
//! crate, so nothing has to be exported to run them.
//!
//! With a CUDA libtorch (a directory holding `libtorch_cuda.so`, e.g. a PyTorch CUDA wheel
//! through `LIBTORCH_USE_PYTORCH=1`), [`emit`] also links `libtorch_cuda` with `--no-as-needed`:
//! nothing in `tch` calls into it directly, so the linker's default `--as-needed` would drop it and
//! libtorch would never register its CUDA backend (`tch::Cuda::is_available()` false). A CPU
//! libtorch has no such file and links exactly as before.

use std::path::PathBuf;
use std::process::Command;

/// The directory holding `libtorch_cpu.so`, resolved the way `torch-sys` resolves it.
pub fn libtorch_lib_dir() -> Option<PathBuf> {
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(python)
            .args([
                "-c",
                "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
            ])
            .output()
            .ok()?;
        let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
        return dir.is_dir().then_some(dir);
    }
    let root = PathBuf::from(std::env::var_os("LIBTORCH")?);
    let lib = std::fs::canonicalize(root.join("lib")).ok()?;
    lib.is_dir().then_some(lib)
}

/// Print the cargo instructions: an rpath to the libtorch directory, `libtorch_cuda` kept as a
/// dependency where it exists, and the variables to watch.
pub fn emit() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON");
    if let Some(dir) = libtorch_lib_dir() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
        if dir.join("libtorch_cuda.so").is_file() {
            println!(
                "cargo:rustc-link-arg=-Wl,-L{},--no-as-needed,-ltorch_cuda,--as-needed",
                dir.display()
            );
        }
    }
}
