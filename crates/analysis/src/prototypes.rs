//! Reading the prototype layer (the K rows of the DINO head's weight-normalised last layer) from
//! any set of named tensors, and turning it into effective, L2-normalised prototypes.
//!
//! Naming (docs/algorithm.md §3.3): a full protodino / official DINO checkpoint holds
//! `student.head.last_layer.weight_v` and `teacher.head.last_layer.weight_v` (each with an
//! optional `weight_g`); DDP adds `module.` either before or after the network name
//! (`student.module.head…`, `module.student.head…`); an exported head alone has a bare
//! `head.last_layer.weight_v` (or `last_layer.weight_v`). The effective prototype is
//! `w_k = g_k · v_k/‖v_k‖`, then `μ_k = w_k/‖w_k‖` (pitfall 13). Without `weight_g` (a frozen
//! `g = 1` that was not saved) `w_k = v_k/‖v_k‖`.
//!
//! DINO-vMF heads (`head.prototypes = "vmf"`, docs/algorithm.md §1.10) have the same names: the
//! weight-normalised layer with a trained `weight_g`, so `‖w_k‖ = |g_k|` is not 1. The unique
//! counts use the directions `μ_k` as for any head; the norms, which set the vMF concentrations
//! `κ_k = ‖w_k‖/τ`, are kept in [`Prototypes::norms`] and summarised by [`NormStats`].

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};

/// Which network's head to read. The teacher is the default (the convention of the collapse
/// analyses: the teacher's prototypes are what produce the pseudo-labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Head {
    #[default]
    Teacher,
    Student,
}

impl fmt::Display for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Head::Teacher => "teacher",
            Head::Student => "student",
        })
    }
}

impl std::str::FromStr for Head {
    type Err = AnalysisError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "teacher" => Ok(Head::Teacher),
            "student" => Ok(Head::Student),
            other => Err(AnalysisError::invalid(
                "head",
                format!("`{other}` is neither `teacher` nor `student`"),
            )),
        }
    }
}

/// Effective, L2-normalised prototypes of one head, in f64 (`[K, d]`), and their norms.
#[derive(Debug)]
pub struct Prototypes {
    /// `μ`, one unit row per prototype, f64 on the CPU.
    pub normalized: Tensor,
    /// `‖w_k‖` of the effective rows, `[K]` f64 (`|g_k|`; all 1 for a normalised head); the
    /// vMF concentration of prototype k at temperature τ is `‖w_k‖/τ`.
    pub norms: Tensor,
    /// Where they came from (for reports).
    pub source: PrototypeSource,
}

/// What was read: the tensor names and the head they belong to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrototypeSource {
    /// `teacher`, `student` or `bare` (a head saved without a network prefix).
    pub head: String,
    /// The name of the `weight_v` tensor used.
    pub weight_v: String,
    /// The name of the `weight_g` tensor used, if the file has one.
    pub weight_g: Option<String>,
    pub k: i64,
    pub dim: i64,
}

/// How a `…weight_v` name classifies after stripping `module.` components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Net(Head),
    Bare,
}

/// Classify a tensor name as a prototype layer: `Some(owner)` iff, with every `module`
/// component removed, it reads `[teacher|student.]head.last_layer.weight_v` or
/// `last_layer.weight_v`.
fn classify(name: &str) -> Option<Owner> {
    let parts: Vec<&str> = name.split('.').filter(|p| *p != "module").collect();
    match parts.as_slice() {
        [net, "head", "last_layer", "weight_v"] => match *net {
            "teacher" => Some(Owner::Net(Head::Teacher)),
            "student" => Some(Owner::Net(Head::Student)),
            _ => None,
        },
        ["head", "last_layer", "weight_v"] | ["last_layer", "weight_v"] => Some(Owner::Bare),
        _ => None,
    }
}

/// Pick the `weight_v` (and matching `weight_g`) of `head` from named tensors.
///
/// The requested network's layer wins; if the file has no network-prefixed layer at all but
/// exactly one bare head, that one is used (and reported as `bare`). Asking for the teacher of a
/// file that only holds a student (or the reverse) is an error, never a silent substitution.
pub fn select_prototype_layer(
    named: &[(String, Tensor)],
    head: Head,
) -> Result<(PrototypeSource, &Tensor, Option<&Tensor>)> {
    let mut wanted = Vec::new();
    let mut bare = Vec::new();
    let mut all = Vec::new();
    for (i, (name, _)) in named.iter().enumerate() {
        match classify(name) {
            Some(Owner::Net(h)) => {
                all.push(name.as_str());
                if h == head {
                    wanted.push(i);
                }
            }
            Some(Owner::Bare) => {
                all.push(name.as_str());
                bare.push(i);
            }
            None => {}
        }
    }
    let has_net_layer = all.len() > bare.len();
    let (chosen, owner) = match (wanted.as_slice(), bare.as_slice()) {
        ([one], _) => (*one, head.to_string()),
        ([], [one]) if !has_net_layer => (*one, "bare".to_string()),
        ([], _) => {
            return Err(AnalysisError::NoPrototypeLayer {
                head: head.to_string(),
                available: all.join(", "),
            });
        }
        (many, _) => {
            return Err(AnalysisError::AmbiguousPrototypeLayer {
                head: head.to_string(),
                candidates: many
                    .iter()
                    .map(|&i| named[i].0.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    };
    let v_name = &named[chosen].0;
    let g_name = format!("{}weight_g", &v_name[..v_name.len() - "weight_v".len()]);
    let g = named.iter().find(|(n, _)| *n == g_name).map(|(_, t)| t);
    let v = &named[chosen].1;
    let size = v.size();
    if size.len() != 2 {
        return Err(AnalysisError::Shape(format!(
            "`{v_name}` must be [K, d], found {size:?}"
        )));
    }
    let source = PrototypeSource {
        head: owner,
        weight_v: v_name.clone(),
        weight_g: g.map(|_| g_name),
        k: size[0],
        dim: size[1],
    };
    Ok((source, v, g))
}

/// Effective prototypes `g ⊙ v/‖v‖_row` (or `v/‖v‖_row` without `g`), then L2-normalised,
/// computed in f64. `g` may be `[K, 1]` (PyTorch `weight_norm`) or `[K]`. A negative `g_k` flips
/// the direction of prototype k, as it does in the forward pass.
pub fn effective_prototypes(weight_v: &Tensor, weight_g: Option<&Tensor>) -> Result<Tensor> {
    l2_normalize_rows(&effective_rows(weight_v, weight_g)?)
}

/// The effective rows `w = g ⊙ v/‖v‖_row` (or `v/‖v‖_row` without `g`), not normalised, f64
/// on the CPU.
pub fn effective_rows(weight_v: &Tensor, weight_g: Option<&Tensor>) -> Result<Tensor> {
    let size = weight_v.size();
    if size.len() != 2 || size[0] == 0 || size[1] == 0 {
        return Err(AnalysisError::Shape(format!(
            "weight_v must be a non-empty [K, d] matrix, found {size:?}"
        )));
    }
    let v = weight_v
        .f_to_kind(Kind::Double)?
        .f_to_device(tch::Device::Cpu)?;
    let direction = l2_normalize_rows(&v)?;
    let w = match weight_g {
        None => direction,
        Some(g) => {
            if g.numel() as i64 != size[0] {
                return Err(AnalysisError::Shape(format!(
                    "weight_g has {} elements, weight_v has {} rows",
                    g.numel(),
                    size[0]
                )));
            }
            let g = g
                .f_to_kind(Kind::Double)?
                .f_to_device(tch::Device::Cpu)?
                .f_reshape([size[0], 1])?;
            direction.f_mul(&g)?
        }
    };
    Ok(w)
}

/// Summary of the prototype norms `‖w_k‖` (the vMF concentrations times τ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormStats {
    pub min: f64,
    pub p05: f64,
    pub median: f64,
    pub mean: f64,
    pub p95: f64,
    pub max: f64,
    /// Every norm is 1 within 1e-5 (a normalised head: one common concentration `1/τ`).
    pub unit: bool,
}

impl NormStats {
    /// The statistics of a `[K]` tensor of norms (K ≥ 1).
    pub fn of(norms: &Tensor) -> Result<NormStats> {
        let mut v = Vec::<f64>::try_from(norms.f_to_kind(Kind::Double)?.f_flatten(0, -1)?)?;
        if v.is_empty() {
            return Err(AnalysisError::Shape("no prototype norms".into()));
        }
        v.sort_by(f64::total_cmp);
        let q = |p| crate::stats::quantile_sorted(&v, p);
        Ok(NormStats {
            min: v[0],
            p05: q(0.05),
            median: q(0.5),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p95: q(0.95),
            max: v[v.len() - 1],
            unit: v.iter().all(|x| (x - 1.0).abs() <= 1e-5),
        })
    }
}

impl fmt::Display for NormStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unit {
            return write!(
                f,
                "prototype norms: all 1 (normalised; κ = 1/τ for every prototype)"
            );
        }
        write!(
            f,
            "prototype norms |w_k| (vMF κ_k = |w_k|/τ): min {:.4}, p05 {:.4}, median {:.4}, \
             mean {:.4}, p95 {:.4}, max {:.4}",
            self.min, self.p05, self.median, self.mean, self.p95, self.max
        )
    }
}

/// `x / max(‖x‖₂, 1e-12)` row-wise (F.normalize semantics).
pub fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .f_norm_scalaropt_dim(2.0, [1i64].as_slice(), true)?
        .f_clamp_min(1e-12)?;
    Ok(x.f_div(&norm)?)
}

/// Read all tensors of a safetensors file with the project's one reader
/// (`protodino_models::weights::load`; dtypes kept, metadata ignored here).
pub fn read_named_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    protodino_models::weights::load(path)
        .map(|(tensors, _metadata)| tensors)
        .map_err(|e| AnalysisError::ReadWeights {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

impl Prototypes {
    /// Effective normalised prototypes of `head` from named tensors (a loaded checkpoint).
    pub fn from_named(named: &[(String, Tensor)], head: Head) -> Result<Prototypes> {
        let (source, v, g) = select_prototype_layer(named, head)?;
        let w = effective_rows(v, g)?;
        Ok(Prototypes {
            normalized: l2_normalize_rows(&w)?,
            norms: w.f_norm_scalaropt_dim(2.0, [1i64].as_slice(), false)?,
            source,
        })
    }

    /// Read a safetensors file (a full checkpoint or just a head) and take `head`'s prototypes.
    pub fn load(path: &Path, head: Head) -> Result<Prototypes> {
        Prototypes::from_named(&read_named_tensors(path)?, head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_accepts_ddp_and_bare_names() {
        use Owner::*;
        let t = Some(Net(Head::Teacher));
        let s = Some(Net(Head::Student));
        assert_eq!(classify("teacher.head.last_layer.weight_v"), t);
        assert_eq!(classify("student.module.head.last_layer.weight_v"), s);
        assert_eq!(classify("module.student.head.last_layer.weight_v"), s);
        assert_eq!(classify("head.last_layer.weight_v"), Some(Bare));
        assert_eq!(classify("module.head.last_layer.weight_v"), Some(Bare));
        assert_eq!(classify("last_layer.weight_v"), Some(Bare));
        assert_eq!(classify("teacher.head.last_layer2.weight_v"), None);
        assert_eq!(classify("teacher.head.last_layer.weight_g"), None);
        assert_eq!(classify("teacher.head.mlp.0.weight"), None);
        assert_eq!(classify("other.head.last_layer.weight_v"), None);
    }
}
