//! Unique-prototype counts (docs/algorithm.md §3.2) and nearest-neighbour statistics of a prototype
//! matrix, in one blockwise pass that never forms the K×K matrix.
//!
//! Two prototypes are "the same" at ε iff `D_ij = ‖μ_i − μ_j‖ < ε` on L2-normalised prototypes
//! (`D = sqrt(max(0, 2 − 2 μ_iᵀμ_j))`). Counts are given for every ε of a list and for both
//! grouping algorithms:
//! * **greedy leader grouping** (primary): scan k = 0..K−1; an unassigned k opens a group and
//!   takes every still-unassigned j with `D_kj < ε`;
//! * **connected components** of the graph with edges `D_ij < ε` (union–find); never more than
//!   the greedy count.
//!
//! How it stays fast and exact:
//! * Only the upper triangle is computed: row block `[b0, b1)` against columns `[b0, K)` in f32
//!   (`block_rows × K` floats of memory). Greedy needs no more, because when k is scanned every
//!   j < k is already assigned; nearest neighbours take row maxima and column maxima of the
//!   same blocks.
//! * A block whose largest similarity is below the loosest threshold has no edge and costs two
//!   reductions beyond its GEMM (the common case of a healthy head). Otherwise the rows that
//!   have candidates are scanned once in place and their pairs handed to the scan in row order.
//! * f32 similarities of unit vectors carry a rounding error of at most
//!   `|Δs| ≤ γ_d + 2u ≈ (d + 2)·2⁻²⁴` (≈ 1.55e-5 for d = 256), so `|ΔD²| ≤ 2|Δs|`. A pair whose
//!   f32 `D²` lies within [`refine_band`] of some `ε²` is decided with the exact f64 distance
//!   of the two rows, and only when the decision changes something (a union of two different
//!   components, or a leader taking an unassigned row). Counts are therefore those of the f64 distances, even
//!   at ε = 0.001 where the f32 GEMM alone could not resolve D.
//! * Cost: K = 65536 × d = 256 is ≈ 1.1 TFLOP of f32 GEMM (half of K²·d·2): 18 s for a fresh
//!   head on the 2-core development CPU (`examples/unique_bench.rs`). A collapsed head has many
//!   candidate pairs (a cluster of n near-duplicates gives n²/2); they are read in place from
//!   the current block, never stored, and pairs inside one greedy group cost two array reads,
//!   so memory stays at one block and time grows mildly with the number of pairs.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};
use crate::prototypes::l2_normalize_rows;
use crate::stats::quantile_sorted;
use crate::union_find::UnionFind;

/// The ε sweep of docs/algorithm.md §3.2 step 3.
pub const DEFAULT_EPS: [f64; 6] = [0.001, 0.01, 0.025, 0.05, 0.1, 0.2];

/// Default rows per similarity block: 2048 × 65536 f32 = 512 MiB at the largest K.
pub const DEFAULT_BLOCK_ROWS: i64 = 2048;

/// Half-width of the band around `ε²` (on `D²`) inside which the f64 distance decides: twice
/// the worst-case f32 error of a d-dimensional unit-vector dot product (`γ_d + 2u`), with a 10 %
/// margin. 3.4e-5 for d = 256.
pub fn refine_band(dim: i64) -> f64 {
    2.0 * 1.1 * (dim + 2) as f64 * (f32::EPSILON as f64 / 2.0)
}

/// Quantiles reported for the nearest-neighbour distances.
pub const NN_QUANTILES: [f64; 7] = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99];

/// Options of [`analyze_unique`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UniqueOptions {
    /// Thresholds ε (each > 0, ≤ 2). Order is kept in the report; the first is the headline.
    pub eps: Vec<f64>,
    /// Rows per similarity block (memory ≈ `block_rows × K × 4` bytes).
    pub block_rows: i64,
}

impl Default for UniqueOptions {
    fn default() -> Self {
        UniqueOptions {
            eps: DEFAULT_EPS.to_vec(),
            block_rows: DEFAULT_BLOCK_ROWS,
        }
    }
}

/// Counts at one ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UniqueCount {
    pub eps: f64,
    /// #groups of greedy leader grouping (the primary figure).
    pub greedy: usize,
    /// #connected components of the `D < ε` graph.
    pub connected_components: usize,
    /// `greedy / K`.
    pub greedy_fraction: f64,
    /// `connected_components / K`.
    pub cc_fraction: f64,
}

/// One quantile of a distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantile {
    pub q: f64,
    pub value: f64,
}

/// Nearest-neighbour distances `d_k = min_{j≠k} ‖μ_k − μ_j‖` and the KoLeo-proto value
/// `L_KP = −(1/K) Σ_k log(d_k + 1e-8)` (docs/algorithm.md §2.2, the project formula; a healthy
/// random head with K = 65536, d = 256 gives ≈ −0.19).
///
/// The neighbour is found by an f32 similarity search (argmax, as the training-time
/// KoLeo-proto does) and its distance is then computed exactly in f64. Among near-duplicates the
/// f32 search cannot rank neighbours finer than its rounding, so `d_found² ≤ d_true² + 6.2e-5`;
/// far from ties the distance is the exact minimum. This keeps the value equal to what
/// training logs rather than spending a second K×K pass on sub-resolution ties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NnStats {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub quantiles: Vec<Quantile>,
    pub koleo_proto: f64,
}

/// The JSON-serialisable summary of a unique-prototype analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UniqueReport {
    pub k: i64,
    pub dim: i64,
    /// Always `"greedy"`: which algorithm's count is the primary figure.
    pub primary_algorithm: String,
    pub counts: Vec<UniqueCount>,
    pub nn: NnStats,
    pub block_rows: i64,
    /// Candidate pairs (f32 `D` below the loosest threshold plus the error band) inspected.
    pub candidate_pairs: u64,
    /// Pairs decided with the exact f64 distance.
    pub exact_refinements: u64,
    pub seconds: f64,
}

/// Everything [`analyze_unique`] computes: the report plus the per-prototype assignments.
#[derive(Debug, Clone)]
pub struct UniqueAnalysis {
    pub report: UniqueReport,
    /// For each ε (same order as the options): the greedy group of every prototype, numbered
    /// 0.. in leader order (the input of grouped MLCD, [`crate::usage::UsageReport`]).
    pub greedy_groups: Vec<Vec<i64>>,
    /// For each ε: the connected component of every prototype, numbered 0.. in first appearance.
    pub components: Vec<Vec<i64>>,
    /// Index of the nearest neighbour of every prototype.
    pub nn_index: Vec<i64>,
}

/// Per-ε scan state.
struct EpsState {
    eps: f64,
    eps2: f64,
    group: Vec<i64>,
    groups: i64,
    uf: UnionFind,
}

/// The distance of one candidate pair, refined to f64 only when needed.
struct PairDistance<'a> {
    d2_f32: f64,
    band: f64,
    exact: Option<f64>,
    i: usize,
    j: usize,
    rows: &'a [f64],
    dim: usize,
    refinements: &'a mut u64,
}

impl PairDistance<'_> {
    /// Whether `D < ε`.
    fn below(&mut self, eps: f64, eps2: f64) -> bool {
        if (self.d2_f32 - eps2).abs() > self.band {
            return self.d2_f32 < eps2;
        }
        let d = match self.exact {
            Some(d) => d,
            None => {
                let a = &self.rows[self.i * self.dim..(self.i + 1) * self.dim];
                let b = &self.rows[self.j * self.dim..(self.j + 1) * self.dim];
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y) * (x - y))
                    .sum::<f64>()
                    .sqrt();
                *self.refinements += 1;
                self.exact = Some(d);
                d
            }
        };
        d < eps
    }
}

/// Unique-prototype counts for every ε, the group assignments and nearest-neighbour
/// statistics of a prototype matrix `[K, d]` (any float dtype; rows are L2-normalised here, so
/// raw effective prototypes may be passed).
pub fn analyze_unique(prototypes: &Tensor, opts: &UniqueOptions) -> Result<UniqueAnalysis> {
    let start = Instant::now();
    let size = prototypes.size();
    if size.len() != 2 || size[0] < 2 || size[1] == 0 {
        return Err(AnalysisError::Shape(format!(
            "prototypes must be [K ≥ 2, d], found {size:?}"
        )));
    }
    if opts.eps.is_empty() {
        return Err(AnalysisError::invalid("eps", "the ε list is empty"));
    }
    if let Some(bad) = opts.eps.iter().find(|e| !(**e > 0.0 && **e <= 2.0)) {
        return Err(AnalysisError::invalid(
            "eps",
            format!("{bad} is not in (0, 2]"),
        ));
    }
    if opts.block_rows < 1 {
        return Err(AnalysisError::invalid("block_rows", "must be ≥ 1"));
    }
    let (k, dim) = (size[0], size[1]);
    let _guard = tch::no_grad_guard();
    let mu64 = l2_normalize_rows(
        &prototypes
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(Kind::Double)?,
    )?
    .f_contiguous()?;
    if mu64.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
        return Err(AnalysisError::invalid(
            "prototypes",
            "contain NaN or infinite values (a diverged checkpoint?)",
        ));
    }
    let mu32 = mu64.f_to_kind(Kind::Float)?;
    let rows: Vec<f64> = Vec::<f64>::try_from(mu64.f_reshape([-1])?)?;

    let eps_max = opts.eps.iter().cloned().fold(0.0, f64::max);
    // Loosest similarity threshold: every pair with exact D < ε_max has f32 s above it.
    let band = refine_band(dim);
    let s_lo = 1.0 - eps_max * eps_max / 2.0 - band / 2.0;
    let mut states: Vec<EpsState> = opts
        .eps
        .iter()
        .map(|&eps| EpsState {
            eps,
            eps2: eps * eps,
            group: vec![-1; k as usize],
            groups: 0,
            uf: UnionFind::new(k as usize),
        })
        .collect();

    let cpu = tch::Device::Cpu;
    // Nearest neighbour of i among j > i (row part) and among j < i (column part: only the
    // best value and the block it came from; its index is resolved at the end).
    let row_sim = Tensor::f_full([k], -3.0, (Kind::Float, cpu))?;
    let row_idx = Tensor::f_zeros([k], (Kind::Int64, cpu))?;
    let col_sim = Tensor::f_full([k], -3.0, (Kind::Float, cpu))?;
    let col_block = Tensor::f_full([k], -1, (Kind::Int64, cpu))?;
    let block = opts.block_rows.min(k);
    let lower = Tensor::f_ones([block, block], (Kind::Bool, cpu))?.f_tril(0)?;
    let mut candidate_pairs = 0u64;
    let mut refinements = 0u64;

    let mut b0 = 0;
    while b0 < k {
        let b = block.min(k - b0);
        let width = k - b0;
        let s = mu32
            .f_narrow(0, b0, b)?
            .f_matmul(&mu32.f_narrow(0, b0, width)?.f_tr()?)?;
        // Pairs j ≤ i (self and lower triangle of the diagonal square) are not candidates.
        let _ = s
            .f_narrow(1, 0, b)?
            .f_masked_fill_(&lower.f_narrow(0, 0, b)?.f_narrow(1, 0, b)?, -3.0)?;

        let (row_max, row_arg) = s.f_max_dim(1, false)?;
        row_sim.f_narrow(0, b0, b)?.f_copy_(&row_max)?;
        row_idx
            .f_narrow(0, b0, b)?
            .f_copy_(&row_arg.f_add_scalar(b0)?)?;
        // Column maxima without indices: `amax` over rows is a cheap vectorised reduction,
        // where `max_dim(0)` with indices is a slow strided one.
        let col_max = s.f_amax([0i64].as_slice(), false)?;
        let mut cur = col_sim.f_narrow(0, b0, width)?;
        let better = col_max.f_gt_tensor(&cur)?;
        let _ = col_block
            .f_narrow(0, b0, width)?
            .f_masked_fill_(&better, b0 / block)?;
        cur.f_copy_(&col_max.f_where_self(&better, &cur)?)?;
        let block_max = row_max.f_max()?.f_double_value(&[])?;

        // Rows with a candidate pair (s > s_lo) are read in place, once, in row order.
        let row_max_host = Vec::<f32>::try_from(&row_max)?;
        let block_host = if block_max > s_lo {
            Some(host_block(&s)?)
        } else {
            None
        };

        // The greedy scan and the unions, row by row.
        for (r, &r_max) in row_max_host.iter().enumerate() {
            let i = b0 as usize + r;
            let mut leader = vec![false; states.len()];
            for (e, st) in states.iter_mut().enumerate() {
                if st.group[i] < 0 {
                    st.group[i] = st.groups;
                    st.groups += 1;
                    leader[e] = true;
                }
            }
            let Some(block_host) = &block_host else {
                continue;
            };
            if r_max as f64 <= s_lo {
                continue;
            }
            let row = block_host.row(r);
            for (c, &s_ij) in row.iter().enumerate() {
                if s_ij as f64 <= s_lo {
                    continue;
                }
                let j = b0 as usize + c;
                candidate_pairs += 1;
                let mut dist = PairDistance {
                    d2_f32: (2.0 - 2.0 * s_ij as f64).max(0.0),
                    band,
                    exact: None,
                    i,
                    j,
                    rows: &rows,
                    dim: dim as usize,
                    refinements: &mut refinements,
                };
                for (e, st) in states.iter_mut().enumerate() {
                    // Same greedy group ⇒ both within ε of its leader ⇒ already connected.
                    if st.group[j] == st.group[i] {
                        continue;
                    }
                    let takes = leader[e] && st.group[j] < 0;
                    let joins = st.uf.find(i as u32) != st.uf.find(j as u32);
                    if (takes || joins) && dist.below(st.eps, st.eps2) {
                        if takes {
                            st.group[j] = st.group[i];
                        }
                        if joins {
                            st.uf.union(i as u32, j as u32);
                        }
                    }
                }
            }
        }
        b0 += b;
    }

    let best_idx = resolve_nn(&mu32, &row_sim, &row_idx, &col_sim, &col_block, block)?;
    let nn_index = Vec::<i64>::try_from(&best_idx)?;
    let nn = nn_stats(&mu64, &best_idx)?;
    let counts = states
        .iter()
        .map(|st| UniqueCount {
            eps: st.eps,
            greedy: st.groups as usize,
            connected_components: st.uf.components(),
            greedy_fraction: st.groups as f64 / k as f64,
            cc_fraction: st.uf.components() as f64 / k as f64,
        })
        .collect();
    let components = states.iter_mut().map(|st| st.uf.labels()).collect();
    let greedy_groups = states.into_iter().map(|st| st.group).collect();
    Ok(UniqueAnalysis {
        report: UniqueReport {
            k,
            dim,
            primary_algorithm: "greedy".to_string(),
            counts,
            nn,
            block_rows: block,
            candidate_pairs,
            exact_refinements: refinements,
            seconds: start.elapsed().as_secs_f64(),
        },
        greedy_groups,
        components,
        nn_index,
    })
}

/// A similarity block held as a contiguous f32 CPU tensor, readable row by row in place: one
/// pass over the rows that have candidate pairs, no copy, no pair list (a collapsed cluster of
/// n rows would otherwise need n² entries of memory).
struct HostBlock {
    tensor: Tensor,
    width: usize,
}

fn host_block(s: &Tensor) -> Result<HostBlock> {
    let tensor = s
        .f_to_device(tch::Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    let width = tensor.size()[1] as usize;
    Ok(HostBlock { tensor, width })
}

impl HostBlock {
    /// Row `r` as a slice (panics if `r` is not a row of the block).
    fn row(&self, r: usize) -> &[f32] {
        assert!(
            r < self.tensor.size()[0] as usize,
            "row {r} out of the block"
        );
        let base = self.tensor.data_ptr() as *const f32;
        // SAFETY: `host_block` made the tensor contiguous f32 on the CPU; it is owned by `self`
        // and never written, so the slice (bounded by the assertion) stays valid while borrowed.
        unsafe { std::slice::from_raw_parts(base.add(r * self.width), self.width) }
    }
}

/// The nearest neighbour of every row: the row part's index where it is at least as similar,
/// otherwise the argmax over the rows `i < j` of the block that held column j's maximum
/// (one small GEMM per block: K·block_rows·d multiply-adds in all).
fn resolve_nn(
    mu32: &Tensor,
    row_sim: &Tensor,
    row_idx: &Tensor,
    col_sim: &Tensor,
    col_block: &Tensor,
    block: i64,
) -> Result<Tensor> {
    let k = mu32.size()[0];
    let mut best = row_idx.copy();
    let from_col = col_sim.f_gt_tensor(row_sim)?;
    let blocks = (k + block - 1) / block;
    for blk in 0..blocks {
        let cols = from_col
            .f_logical_and(&col_block.f_eq(blk)?)?
            .f_nonzero()?
            .f_reshape([-1])?;
        if cols.numel() == 0 {
            continue;
        }
        let b0 = blk * block;
        let b = block.min(k - b0);
        let mut sims = mu32
            .f_index_select(0, &cols)?
            .f_matmul(&mu32.f_narrow(0, b0, b)?.f_tr()?)?;
        // Only rows i < j took part in column j's maximum.
        let rows = Tensor::f_arange_start(b0, b0 + b, (Kind::Int64, tch::Device::Cpu))?;
        let not_before = rows.f_unsqueeze(0)?.f_ge_tensor(&cols.f_unsqueeze(1)?)?;
        let _ = sims.f_masked_fill_(&not_before, -3.0)?;
        let arg = sims.f_argmax(1, false)?.f_add_scalar(b0)?;
        let _ = best.f_index_copy_(0, &cols, &arg)?;
    }
    Ok(best)
}

/// Exact (f64) distances to the nearest neighbours found, their statistics and `L_KP`.
fn nn_stats(mu64: &Tensor, nn_index: &Tensor) -> Result<NnStats> {
    let neighbours = mu64.f_index_select(0, nn_index)?;
    let d = mu64
        .f_sub(&neighbours)?
        .f_norm_scalaropt_dim(2.0, [1i64].as_slice(), false)?;
    let mut dist = Vec::<f64>::try_from(&d)?;
    let k = dist.len() as f64;
    let koleo_proto = -dist.iter().map(|x| (x + 1e-8).ln()).sum::<f64>() / k;
    let mean = dist.iter().sum::<f64>() / k;
    dist.sort_by(f64::total_cmp);
    Ok(NnStats {
        mean,
        min: dist[0],
        max: dist[dist.len() - 1],
        quantiles: NN_QUANTILES
            .iter()
            .map(|&q| Quantile {
                q,
                value: quantile_sorted(&dist, q),
            })
            .collect(),
        koleo_proto,
    })
}
