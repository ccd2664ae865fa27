//! Weight files: safetensors with string metadata, written atomically, and loading named
//! tensors into a `VarStore` under the official PyTorch DINO names.
//!
//! The `safetensors` crate is used directly (tch pins an old version and writes no metadata).
//! A write goes to a temporary file in the target's directory, is fsynced, renamed over the
//! target and the directory is fsynced, so a crash leaves the old file or the new one, never a
//! torn one, and no temporary file survives a failed write.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tch::{Device, Kind, Tensor, nn};

/// Named tensors in file order, as [`load`] returns them.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Errors of reading, writing and loading weight files.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("tensor `{name}`: unsupported dtype {dtype}")]
    Dtype { name: String, dtype: String },
    #[error("tensor `{name}` is missing")]
    Missing { name: String },
    #[error("tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    Shape {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("tensor `{name}` matches no variable of the model")]
    Unknown { name: String },
    #[error("tensor `{name}` is given twice (with and without a `module.` prefix)")]
    Duplicate { name: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Atomic write (temporary file in the same directory, fsync, rename, fsync dir) of a safetensors
/// file with string metadata. Tensors are written from CPU contiguous copies, any float dtype kept.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), WeightsError> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let kind = t.kind();
        let dtype = dtype_of(kind).ok_or_else(|| WeightsError::Dtype {
            name: name.clone(),
            dtype: format!("{kind:?}"),
        })?;
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        host.push((name.as_str(), dtype, shape, bytes));
    }
    let format_err = |reason: String| WeightsError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let mut views = Vec::with_capacity(host.len());
    for (name, dtype, shape, bytes) in &host {
        let view = TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| format_err(format!("{name}: {e}")))?;
        views.push((*name, view));
    }
    let info: HashMap<String, String> = metadata.clone().into_iter().collect();
    let buf = safetensors::serialize(views, Some(info)).map_err(|e| format_err(e.to_string()))?;
    write_atomic(path, &buf)
}

/// Read every tensor (on the CPU, in its stored dtype) and the string metadata of a safetensors
/// file. Tensors come back in the file's order (sorted by data offset).
pub fn load(path: &Path) -> Result<(NamedTensors, BTreeMap<String, String>), WeightsError> {
    let io_err = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let format_err = |reason: String| WeightsError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let buf = std::fs::read(path).map_err(io_err)?;
    let (_, header) = SafeTensors::read_metadata(&buf).map_err(|e| format_err(e.to_string()))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let st = SafeTensors::deserialize(&buf).map_err(|e| format_err(e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| WeightsError::Dtype {
            name: name.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        out.push((name, t));
    }
    Ok((out, metadata))
}

/// Copy named tensors into a VarStore's variables under `prefix` (e.g. "student."), accepting a DDP
/// "module." prefix; a missing or mis-shaped tensor is an error naming it.
///
/// Strict like PyTorch's `load_state_dict(strict=True)` within the prefix: every variable of `vs`
/// (parameters and buffers such as BatchNorm running statistics) must be given, and a tensor
/// whose name starts with `prefix` but matches no variable is an error ([`WeightsError::Unknown`]).
/// Tensors outside the prefix (e.g. `teacher.*` when loading `student.`) are ignored. A `module.`
/// component is accepted before the prefix or right after it (`module.student.x`,
/// `student.module.x`), the two layouts official DINO checkpoints end up with. Values are
/// converted to each variable's dtype and device.
pub fn load_into(
    vs: &nn::VarStore,
    prefix: &str,
    tensors: &[(String, Tensor)],
) -> Result<(), WeightsError> {
    let unused = load_into_inner(vs, prefix, tensors)?;
    match unused.into_iter().next() {
        Some(name) => Err(WeightsError::Unknown { name }),
        None => Ok(()),
    }
}

/// [`load_into`] that tolerates tensors under the prefix that match no variable (like
/// `strict=False` for unexpected keys, e.g. loading only a backbone from a full checkpoint);
/// returns their names. Missing or mis-shaped variables are still errors.
pub fn load_into_partial(
    vs: &nn::VarStore,
    prefix: &str,
    tensors: &[(String, Tensor)],
) -> Result<Vec<String>, WeightsError> {
    load_into_inner(vs, prefix, tensors)
}

/// The variable name a file tensor maps to under `prefix`, or None when it lies outside it.
fn strip_name<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let name = name.strip_prefix("module.").unwrap_or(name);
    let rest = name.strip_prefix(prefix)?;
    Some(rest.strip_prefix("module.").unwrap_or(rest))
}

fn load_into_inner(
    vs: &nn::VarStore,
    prefix: &str,
    tensors: &[(String, Tensor)],
) -> Result<Vec<String>, WeightsError> {
    let mut by_name: HashMap<&str, &Tensor> = HashMap::new();
    let mut unused = Vec::new();
    let variables = vs.variables();
    for (name, t) in tensors {
        let Some(key) = strip_name(name, prefix) else {
            continue;
        };
        if by_name.insert(key, t).is_some() {
            return Err(WeightsError::Duplicate {
                name: format!("{prefix}{key}"),
            });
        }
        if !variables.contains_key(key) {
            unused.push(name.clone());
        }
    }
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    for name in &names {
        let full = format!("{prefix}{name}");
        let src = by_name
            .get(name.as_str())
            .ok_or_else(|| WeightsError::Missing { name: full.clone() })?;
        let var = &variables[*name];
        if src.size() != var.size() {
            return Err(WeightsError::Shape {
                name: full,
                expected: var.size(),
                found: src.size(),
            });
        }
    }
    tch::no_grad(|| -> Result<(), WeightsError> {
        for name in names {
            let mut var = variables[name].shallow_clone();
            let src = by_name[name.as_str()]
                .to_device(var.device())
                .to_kind(var.kind());
            var.f_copy_(&src)?;
        }
        Ok(())
    })?;
    Ok(unused)
}

/// The variables of `vs` as `(prefix + name, tensor)` pairs sorted by name (parameters and
/// buffers), ready for [`save`]. The tensors share storage with the variables.
pub fn named_tensors(vs: &nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (format!("{prefix}{name}"), t))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Names of buffers (BatchNorm running statistics): state that is saved and loaded but neither
/// trained nor averaged by the EMA teacher (docs/algorithm.md §1.8 step 8).
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A test hook for the crash-safety tests: when this variable names the file being written, the
/// process writes half of it to the temporary file, fsyncs, and SIGKILLs itself, leaving on disk
/// exactly what a writer killed mid-write leaves.
pub const KILL_WRITING_ENV: &str = "PROTODINO_TEST_KILL_WRITING";

fn kill_while_writing(file_name: &str, f: &mut std::fs::File, bytes: &[u8]) {
    static TARGET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let target = TARGET.get_or_init(|| std::env::var(KILL_WRITING_ENV).ok());
    if target.as_deref() == Some(file_name) {
        let _ = f.write_all(&bytes[..bytes.len() / 2]);
        let _ = f.sync_all();
        // SAFETY: kill(2) on this very process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Write `bytes` to `path` through a fsynced temporary file in the same directory and a rename;
/// the directory is fsynced afterwards so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| WeightsError::Io { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| WeightsError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(
        ".{file_name}.tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        kill_while_writing(&file_name, &mut f, bytes);
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        let d = std::fs::File::open(&dir).map_err(io_err(&dir))?;
        d.sync_all().map_err(io_err(&dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::strip_name;

    #[test]
    fn module_prefix_is_stripped_before_or_after_the_prefix() {
        assert_eq!(strip_name("student.a.b", "student."), Some("a.b"));
        assert_eq!(strip_name("module.student.a", "student."), Some("a"));
        assert_eq!(strip_name("student.module.a", "student."), Some("a"));
        assert_eq!(strip_name("module.backbone.x", ""), Some("backbone.x"));
        assert_eq!(strip_name("teacher.a", "student."), None);
    }
}
