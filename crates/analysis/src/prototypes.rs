//! Reading the prototype layers of a head (the K rows of each weight-normalised last layer) from
//! any set of named tensors, and turning them into effective, L2-normalised prototypes.
//!
//! Layers (docs/algorithm.md §3.3, docs/checkpoints.md): every head has `head.last_layer` — the
//! DINO prototypes, iBOT's [CLS] prototypes; an iBOT head whose patch head is not shared also
//! has `head.last_layer2`, the patch-token prototypes ([`Layer`]). A shared iBOT head saves the
//! same tensors under both names, which the report points out ([`PrototypeSource::same_as`]).
//!
//! Naming: a full protodino checkpoint, or an official DINO / iBOT checkpoint converted by
//! `scripts/convert_official.py`, holds `student.head.<layer>.weight_v` and
//! `teacher.head.<layer>.weight_v` (each with an optional `weight_g`); DDP adds `module.` either
//! before or after the network name (`student.module.head…`, `module.student.head…`); an
//! exported head or a backbone+head state dict holds a bare `head.<layer>.weight_v` (or
//! `<layer>.weight_v`). The effective prototype is `w_k = g_k · v_k/‖v_k‖`, then
//! `μ_k = w_k/‖w_k‖` (pitfall 13). Without `weight_g` (a frozen `g = 1` that was not saved)
//! `w_k = v_k/‖v_k‖`.
//!
//! DINO-vMF heads (`head.prototypes = "vmf"`, docs/algorithm.md §1.10) have the same names: the
//! weight-normalised layer with a trained `weight_g`, so `‖w_k‖ = |g_k|` is not 1. The unique
//! counts use the directions `μ_k` as for any head; the norms, which set the vMF concentrations
//! `κ_k = ‖w_k‖/τ`, are kept in [`Prototypes::norms`] and summarised by [`NormStats`].
//!
//! A missing layer is an error that names the tensor looked for and summarises what the file
//! holds ([`describe_names`]).

use std::collections::BTreeMap;
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

/// One prototype layer of a head, named by its module (`head.<layer>`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// `last_layer`: the DINO prototypes; iBOT's [CLS] prototypes.
    #[default]
    LastLayer,
    /// `last_layer2`: iBOT's patch-token prototypes (a head that is not shared).
    LastLayer2,
}

impl Layer {
    /// Every layer, in report order.
    pub const ALL: [Layer; 2] = [Layer::LastLayer, Layer::LastLayer2];

    /// The module name inside the head.
    pub fn module_name(self) -> &'static str {
        match self {
            Layer::LastLayer => "last_layer",
            Layer::LastLayer2 => "last_layer2",
        }
    }

    /// What the layer's prototypes classify, for reports.
    pub fn role(self) -> &'static str {
        match self {
            Layer::LastLayer => "CLS prototypes",
            Layer::LastLayer2 => "iBOT patch prototypes",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.module_name())
    }
}

impl std::str::FromStr for Layer {
    type Err = AnalysisError;
    fn from_str(s: &str) -> Result<Self> {
        Layer::ALL
            .into_iter()
            .find(|l| l.module_name() == s)
            .ok_or_else(|| {
                AnalysisError::invalid(
                    "layer",
                    format!("`{s}` is neither `last_layer` nor `last_layer2`"),
                )
            })
    }
}

/// Which layers to read: one, or every prototype layer the head has (the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerSelection {
    #[default]
    All,
    Only(Layer),
}

impl fmt::Display for LayerSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerSelection::All => f.write_str("all"),
            LayerSelection::Only(l) => l.fmt(f),
        }
    }
}

impl std::str::FromStr for LayerSelection {
    type Err = AnalysisError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(LayerSelection::All),
            other => other.parse().map(LayerSelection::Only).map_err(|_| {
                AnalysisError::invalid(
                    "layer",
                    format!("`{other}` is none of `last_layer`, `last_layer2`, `all`"),
                )
            }),
        }
    }
}

/// Effective, L2-normalised prototypes of one layer, in f64 (`[K, d]`), and their norms.
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

/// What was read: the tensor names, the head and the layer they belong to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrototypeSource {
    /// `teacher`, `student` or `bare` (a head saved without a network prefix).
    pub head: String,
    /// Which of the head's prototype layers.
    #[serde(default)]
    pub layer: Layer,
    /// The name of the `weight_v` tensor used.
    pub weight_v: String,
    /// The name of the `weight_g` tensor used, if the file has one.
    pub weight_g: Option<String>,
    pub k: i64,
    pub dim: i64,
    /// For `last_layer2`: the `weight_v` of `last_layer` when both layers hold the same tensors
    /// (an iBOT head with `shared_head`, saved under both names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_as: Option<String>,
}

/// How a `…weight_v` name classifies after stripping `module.` components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Net(Head),
    Bare,
}

/// Classify a tensor name as a prototype layer: `Some((owner, layer))` iff, with every
/// `module` component removed, it reads `[teacher|student.]head.<layer>.weight_v` or
/// `<layer>.weight_v`.
fn classify(name: &str) -> Option<(Owner, Layer)> {
    let parts: Vec<&str> = name.split('.').filter(|p| *p != "module").collect();
    let (owner, layer) = match parts.as_slice() {
        [net, "head", layer, "weight_v"] => match *net {
            "teacher" => (Owner::Net(Head::Teacher), *layer),
            "student" => (Owner::Net(Head::Student), *layer),
            _ => return None,
        },
        ["head", layer, "weight_v"] | [layer, "weight_v"] => (Owner::Bare, *layer),
        _ => return None,
    };
    Some((owner, layer.parse().ok()?))
}

/// One prototype layer picked from named tensors: where it came from and its two tensors.
#[derive(Debug)]
pub struct SelectedLayer<'a> {
    pub source: PrototypeSource,
    pub weight_v: &'a Tensor,
    pub weight_g: Option<&'a Tensor>,
}

/// Every prototype layer among named tensors, classified once.
struct Candidates<'a> {
    named: &'a [(String, Tensor)],
    /// (index into `named`, owner, layer) of every `…weight_v` that names a prototype layer.
    found: Vec<(usize, Owner, Layer)>,
}

impl<'a> Candidates<'a> {
    fn new(named: &'a [(String, Tensor)]) -> Self {
        let found = named
            .iter()
            .enumerate()
            .filter_map(|(i, (n, _))| classify(n).map(|(o, l)| (i, o, l)))
            .collect();
        Candidates { named, found }
    }

    /// The `weight_v` index of `head`'s `layer`: the network-prefixed one, or — in a file with
    /// no network-prefixed layer at all — the single bare one. `Ok(None)` when absent.
    fn find(&self, head: Head, layer: Layer) -> Result<Option<(usize, String)>> {
        let has_net = self
            .found
            .iter()
            .any(|(_, o, _)| matches!(o, Owner::Net(_)));
        let (want, owner) = if has_net {
            (Owner::Net(head), head.to_string())
        } else {
            (Owner::Bare, "bare".to_string())
        };
        let hits: Vec<usize> = self
            .found
            .iter()
            .filter(|(_, o, l)| *o == want && *l == layer)
            .map(|(i, _, _)| *i)
            .collect();
        match hits.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some((*one, owner))),
            many => Err(AnalysisError::AmbiguousPrototypeLayer {
                head: head.to_string(),
                candidates: many
                    .iter()
                    .map(|&i| self.named[i].0.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The error for a missing layer: the tensor looked for, the prototype layers present
    /// and a summary of everything the file holds.
    fn missing(&self, head: Head, layer: Layer) -> AnalysisError {
        let mut present: Vec<&str> = self
            .found
            .iter()
            .map(|(i, _, _)| self.named[*i].0.as_str())
            .collect();
        present.sort_unstable();
        let present = if present.is_empty() {
            "none".to_string()
        } else {
            present.join(", ")
        };
        let names: Vec<&str> = self.named.iter().map(|(n, _)| n.as_str()).collect();
        let contents = describe_names(&names);
        match layer {
            Layer::LastLayer => AnalysisError::NoPrototypeLayer {
                head: head.to_string(),
                available: format!("{present}; the file holds {contents}"),
            },
            Layer::LastLayer2 => AnalysisError::invalid(
                "layer",
                format!(
                    "no `{head}.head.last_layer2.weight_v` (the {head} head's {role}; a \
                     `module.` prefix is accepted) in the file; prototype layers present: \
                     [{present}]; the file holds {contents}",
                    role = layer.role()
                ),
            ),
        }
    }

    /// The tensors of the layer at `index`, with its `weight_g` when the file has one.
    fn layer(&self, index: usize, owner: String, layer: Layer) -> Result<SelectedLayer<'a>> {
        let (v_name, v) = &self.named[index];
        let g_name = format!("{}weight_g", &v_name[..v_name.len() - "weight_v".len()]);
        let g = self
            .named
            .iter()
            .find(|(n, _)| *n == g_name)
            .map(|(_, t)| t);
        let size = v.size();
        if size.len() != 2 {
            return Err(AnalysisError::Shape(format!(
                "`{v_name}` must be [K, d], found {size:?}"
            )));
        }
        Ok(SelectedLayer {
            source: PrototypeSource {
                head: owner,
                layer,
                weight_v: v_name.clone(),
                weight_g: g.map(|_| g_name),
                k: size[0],
                dim: size[1],
                same_as: None,
            },
            weight_v: v,
            weight_g: g,
        })
    }
}

/// Pick `head`'s prototype layers from named tensors: the one asked for, or every layer the
/// head has ([`LayerSelection::All`], in [`Layer::ALL`] order; at least `last_layer` or
/// `last_layer2` must exist).
///
/// The requested network's layers win; a file with no network-prefixed layer at all (an
/// exported head, a backbone+head state dict) gives its bare layers, reported as `bare`.
/// Asking for the teacher of a file that only holds a student (or the reverse) is an error,
/// never a silent substitution. A `last_layer2` whose tensors equal `last_layer`'s (a shared
/// iBOT head) is marked with [`PrototypeSource::same_as`].
pub fn select_layers(
    named: &[(String, Tensor)],
    head: Head,
    selection: LayerSelection,
) -> Result<Vec<SelectedLayer<'_>>> {
    let c = Candidates::new(named);
    let wanted: Vec<Layer> = match selection {
        LayerSelection::Only(l) => vec![l],
        LayerSelection::All => Layer::ALL.to_vec(),
    };
    let mut out = Vec::new();
    for layer in wanted {
        match c.find(head, layer)? {
            Some((i, owner)) => out.push(c.layer(i, owner, layer)?),
            None if selection == LayerSelection::Only(layer) => {
                return Err(c.missing(head, layer));
            }
            None => {}
        }
    }
    if out.is_empty() {
        return Err(c.missing(head, Layer::LastLayer));
    }
    if let Ok(Some((i, owner))) = c.find(head, Layer::LastLayer) {
        let first = c.layer(i, owner, Layer::LastLayer)?;
        for s in out
            .iter_mut()
            .filter(|s| s.source.layer == Layer::LastLayer2)
        {
            if same_tensors(&first, s) {
                s.source.same_as = Some(first.source.weight_v.clone());
            }
        }
    }
    Ok(out)
}

/// Pick `head`'s `last_layer` (the DINO / [CLS] prototypes) from named tensors; see
/// [`select_layers`].
pub fn select_prototype_layer(
    named: &[(String, Tensor)],
    head: Head,
) -> Result<(PrototypeSource, &Tensor, Option<&Tensor>)> {
    let s = select_layers(named, head, LayerSelection::Only(Layer::LastLayer))?
        .pop()
        .expect("select_layers returns the one layer asked for");
    Ok((s.source, s.weight_v, s.weight_g))
}

/// Both layers hold bit-identical `weight_v` and `weight_g` (or neither has a `weight_g`).
fn same_tensors(a: &SelectedLayer<'_>, b: &SelectedLayer<'_>) -> bool {
    let eq = |x: &Tensor, y: &Tensor| x.kind() == y.kind() && x.size() == y.size() && x.equal(y);
    eq(a.weight_v, b.weight_v)
        && match (a.weight_g, b.weight_g) {
            (None, None) => true,
            (Some(x), Some(y)) => eq(x, y),
            _ => false,
        }
}

/// A short summary of a file's tensor names for error messages: every name (sorted) when there
/// are at most [`LIST_ALL_NAMES`], otherwise the count per group of the first two name components
/// (`student.backbone.* (150)`), a group of one shown by its full name.
pub fn describe_names(names: &[&str]) -> String {
    if names.is_empty() {
        return "no tensors".to_string();
    }
    let count = format!(
        "{} tensor{}",
        names.len(),
        if names.len() == 1 { "" } else { "s" }
    );
    if names.len() <= LIST_ALL_NAMES {
        let mut sorted = names.to_vec();
        sorted.sort_unstable();
        return format!("{count}: {}", sorted.join(", "));
    }
    let mut groups: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        let key = if parts.len() > 2 {
            format!("{}.{}.*", parts[0], parts[1])
        } else {
            name.to_string()
        };
        groups.entry(key).or_default().push(name);
    }
    let groups: Vec<String> = groups
        .into_iter()
        .map(|(key, members)| match members.as_slice() {
            [one] => one.to_string(),
            many => format!("{key} ({})", many.len()),
        })
        .collect();
    format!("{count}: {}", groups.join(", "))
}

/// Up to this many tensor names, [`describe_names`] lists them all.
pub const LIST_ALL_NAMES: usize = 16;

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
    /// Effective normalised prototypes of one selected layer.
    pub fn from_selected(s: SelectedLayer<'_>) -> Result<Prototypes> {
        let w = effective_rows(s.weight_v, s.weight_g)?;
        Ok(Prototypes {
            normalized: l2_normalize_rows(&w)?,
            norms: w.f_norm_scalaropt_dim(2.0, [1i64].as_slice(), false)?,
            source: s.source,
        })
    }

    /// Effective normalised prototypes of `head`'s `last_layer` from named tensors (a loaded
    /// checkpoint).
    pub fn from_named(named: &[(String, Tensor)], head: Head) -> Result<Prototypes> {
        let mut all =
            Prototypes::all_from_named(named, head, LayerSelection::Only(Layer::LastLayer))?;
        Ok(all.remove(0))
    }

    /// The selected layers of `head` from named tensors, one [`Prototypes`] per layer.
    pub fn all_from_named(
        named: &[(String, Tensor)],
        head: Head,
        selection: LayerSelection,
    ) -> Result<Vec<Prototypes>> {
        select_layers(named, head, selection)?
            .into_iter()
            .map(Prototypes::from_selected)
            .collect()
    }

    /// Read a safetensors file (a full checkpoint or just a head) and take `head`'s
    /// `last_layer` prototypes.
    pub fn load(path: &Path, head: Head) -> Result<Prototypes> {
        Prototypes::from_named(&read_named_tensors(path)?, head)
    }

    /// Read a safetensors file and take the selected layers of `head`.
    pub fn load_all(path: &Path, head: Head, selection: LayerSelection) -> Result<Vec<Prototypes>> {
        Prototypes::all_from_named(&read_named_tensors(path)?, head, selection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(names: &[&str]) -> Vec<(String, Tensor)> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let v = Tensor::eye(3, tch::kind::FLOAT_CPU) + i as f64;
                (n.to_string(), v)
            })
            .collect()
    }

    fn layers(named: &[(String, Tensor)], head: Head, sel: LayerSelection) -> Vec<String> {
        select_layers(named, head, sel)
            .unwrap()
            .into_iter()
            .map(|s| format!("{}:{}", s.source.layer, s.source.weight_v))
            .collect()
    }

    #[test]
    fn classify_accepts_ddp_bare_and_both_layers() {
        use Owner::*;
        let t = Some((Net(Head::Teacher), Layer::LastLayer));
        let s = Some((Net(Head::Student), Layer::LastLayer));
        assert_eq!(classify("teacher.head.last_layer.weight_v"), t);
        assert_eq!(classify("student.module.head.last_layer.weight_v"), s);
        assert_eq!(classify("module.student.head.last_layer.weight_v"), s);
        assert_eq!(
            classify("head.last_layer.weight_v"),
            Some((Bare, Layer::LastLayer))
        );
        assert_eq!(
            classify("module.head.last_layer.weight_v"),
            Some((Bare, Layer::LastLayer))
        );
        assert_eq!(
            classify("last_layer.weight_v"),
            Some((Bare, Layer::LastLayer))
        );
        assert_eq!(
            classify("teacher.head.last_layer2.weight_v"),
            Some((Net(Head::Teacher), Layer::LastLayer2))
        );
        assert_eq!(
            classify("module.head.last_layer2.weight_v"),
            Some((Bare, Layer::LastLayer2))
        );
        assert_eq!(classify("teacher.head.last_layer3.weight_v"), None);
        assert_eq!(classify("teacher.head.last_layer.weight_g"), None);
        assert_eq!(classify("teacher.head.mlp.0.weight"), None);
        assert_eq!(classify("other.head.last_layer.weight_v"), None);
    }

    #[test]
    fn layer_names_parse_and_print() {
        for l in Layer::ALL {
            assert_eq!(l.to_string().parse::<Layer>().unwrap(), l);
            let sel = LayerSelection::Only(l);
            assert_eq!(sel.to_string().parse::<LayerSelection>().unwrap(), sel);
        }
        assert_eq!(
            "all".parse::<LayerSelection>().unwrap(),
            LayerSelection::All
        );
        assert_eq!(LayerSelection::default(), LayerSelection::All);
        let err = "cls".parse::<LayerSelection>().unwrap_err().to_string();
        assert!(err.contains("last_layer2") && err.contains("all"), "{err}");
        assert_eq!(
            serde_json::to_string(&Layer::LastLayer2).unwrap(),
            "\"last_layer2\""
        );
    }

    #[test]
    fn all_layers_of_the_requested_head_in_order() {
        let n = named(&[
            "student.module.head.last_layer2.weight_v",
            "student.module.head.last_layer.weight_v",
            "teacher.head.last_layer2.weight_v",
            "teacher.head.last_layer.weight_v",
        ]);
        assert_eq!(
            layers(&n, Head::Teacher, LayerSelection::All),
            [
                "last_layer:teacher.head.last_layer.weight_v",
                "last_layer2:teacher.head.last_layer2.weight_v"
            ]
        );
        assert_eq!(
            layers(&n, Head::Student, LayerSelection::Only(Layer::LastLayer2)),
            ["last_layer2:student.module.head.last_layer2.weight_v"]
        );
        // A DINO file: `all` is its one layer; asking for last_layer2 names what is missing.
        let dino = named(&[
            "teacher.backbone.cls_token",
            "teacher.head.last_layer.weight_v",
        ]);
        assert_eq!(layers(&dino, Head::Teacher, LayerSelection::All).len(), 1);
        let err = select_layers(
            &dino,
            Head::Teacher,
            LayerSelection::Only(Layer::LastLayer2),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`teacher.head.last_layer2.weight_v`")
                && err.contains("teacher.head.last_layer.weight_v")
                && err.contains("teacher.backbone.cls_token"),
            "{err}"
        );
        // The other network only: an error for the teacher, listing the student's layer.
        let student_only = named(&["student.head.last_layer.weight_v"]);
        match select_layers(&student_only, Head::Teacher, LayerSelection::All) {
            Err(AnalysisError::NoPrototypeLayer { head, available }) => {
                assert_eq!(head, "teacher");
                assert!(available.contains("student.head.last_layer.weight_v"));
            }
            other => panic!("expected NoPrototypeLayer, got {other:?}"),
        }
    }

    #[test]
    fn bare_layers_only_without_network_layers_and_ambiguity_is_an_error() {
        let bare = named(&["head.last_layer.weight_v", "head.last_layer2.weight_v"]);
        let got = select_layers(&bare, Head::Student, LayerSelection::All).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|s| s.source.head == "bare"));
        let mixed = named(&[
            "teacher.head.last_layer.weight_v",
            "head.last_layer2.weight_v",
        ]);
        assert_eq!(layers(&mixed, Head::Teacher, LayerSelection::All).len(), 1);
        let twice = named(&[
            "teacher.head.last_layer.weight_v",
            "module.teacher.head.last_layer.weight_v",
        ]);
        assert!(matches!(
            select_layers(&twice, Head::Teacher, LayerSelection::All),
            Err(AnalysisError::AmbiguousPrototypeLayer { .. })
        ));
    }

    #[test]
    fn a_shared_ibot_head_is_marked() {
        let v = Tensor::eye(3, tch::kind::FLOAT_CPU);
        let g = Tensor::ones([3, 1], tch::kind::FLOAT_CPU);
        let mut n = vec![
            ("teacher.head.last_layer.weight_v".to_string(), v.copy()),
            ("teacher.head.last_layer.weight_g".to_string(), g.copy()),
            ("teacher.head.last_layer2.weight_v".to_string(), v.copy()),
            ("teacher.head.last_layer2.weight_g".to_string(), g.copy()),
        ];
        let sel =
            select_layers(&n, Head::Teacher, LayerSelection::Only(Layer::LastLayer2)).unwrap();
        assert_eq!(
            sel[0].source.same_as.as_deref(),
            Some("teacher.head.last_layer.weight_v")
        );
        n[3].1 = &g * 2.0;
        let sel = select_layers(&n, Head::Teacher, LayerSelection::All).unwrap();
        assert!(sel.iter().all(|s| s.source.same_as.is_none()));
    }

    #[test]
    fn describe_names_lists_few_and_groups_many() {
        assert_eq!(describe_names(&[]), "no tensors");
        assert_eq!(
            describe_names(&["a.b", "dino_loss.center"]),
            "2 tensors: a.b, dino_loss.center"
        );
        let mut many: Vec<String> = (0..20)
            .map(|i| format!("student.backbone.blocks.{i}.w"))
            .collect();
        many.push("teacher.head.last_layer.weight_v".into());
        many.push("dino_loss.center".into());
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            describe_names(&refs),
            "22 tensors: dino_loss.center, student.backbone.* (20), \
             teacher.head.last_layer.weight_v"
        );
    }
}
