//! KoLeo-proto, the Kozachenko–Leonenko entropy regulariser on the student's prototypes
//! (docs/algorithm.md §2.2, §2.3; pitfall 12).
//!
//! `L_KP = −(1/K) Σ_k log(d_k + ε)` with `d_k = ‖μ_k − μ_nn(k) + ε‖₂`, where
//! `μ_k = w_k / max(‖w_k‖, ε)` are the L2-normalised effective prototypes `w_k = g_k v_k/‖v_k‖`
//! and `nn(k)` is the nearest other prototype.
//!
//! **ε semantics (a documented choice):** the single `config.koleo.eps` (1e-8) is used in the three
//! places where DINOv2's `KoLeoLoss` uses its 1e-8: the normalisation clamp (`F.normalize(eps)`),
//! the pairwise-distance offset (`nn.PairwiseDistance(eps)`, which adds ε to the *difference*
//! before the norm: `‖x − y + ε‖`), and the offset inside the log. The spec's formula
//! `log(min_j ‖μ_k − μ_j‖ + ε)` differs from this only by the ε inside the norm, which matters
//! only for exact duplicates: there it keeps the distance (ε·√d ≈ 1.6e-7 for d = 256) and its
//! gradient finite instead of producing a 0/0 gradient, which is why we follow DINOv2.
//!
//! Nearest neighbours are searched without gradient by blockwise maximum inner product with the
//! self-similarity set to −1 (as DINOv2), `block_rows` rows at a time, so memory is
//! `block_rows × K` floats and never `K × K` (K = 65536 with 1024 rows: 256 MiB per block).
//! The indices are constants of the graph; both `μ_k` and `μ_nn(k)` receive gradient. Everything
//! runs in fp32 with autocast disabled. Optionally the indices are recomputed only every
//! `nn_refresh_interval` steps (default 1 = every step); the cached indices are then part of the
//! checkpoint so that a resumed run continues identically.

use tch::{Kind, Tensor};

use crate::error::{DinoError, Result};

/// Value of the regulariser and the neighbour indices it used.
#[derive(Debug)]
pub struct KoleoOutput {
    /// `L_KP`, scalar fp32 in the autograd graph of the prototypes.
    pub loss: Tensor,
    /// `nn(k)` for every prototype, int64 `[K]`.
    pub nn_index: Tensor,
    /// `d_k`, detached, `[K]`.
    pub distances: Tensor,
}

/// L2-normalise rows as `F.normalize(x, p=2, dim=1, eps)`: `x / max(‖x‖, eps)`, fp32.
pub fn normalize_rows(w: &Tensor, eps: f64) -> Tensor {
    let w = w.to_kind(Kind::Float);
    let denom = w
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(eps)
        .expand_as(&w);
    w / denom
}

/// Columns per tile of the CPU neighbour search (see [`nearest_neighbours`]).
pub const CPU_TILE_COLS: i64 = 2048;

/// Nearest-neighbour index of every row of the (normalised) matrix `mu` `[K, d]` by maximal
/// inner product excluding the row itself, without gradient.
///
/// Rows go `block_rows` at a time. On the CPU each row block is further cut into column tiles of
/// [`CPU_TILE_COLS`], written into one reused buffer and folded into a running (max, index)
/// per row: measured on 2 cores at K = 65 536, d = 256, this takes 19–20 s where whole
/// `block_rows × K` products take 27–28 s (a fresh 1 GiB product per block is page-faulted and
/// streamed through memory twice; a 2048-column tile stays warm). On CUDA the row block is one
/// product (few large kernels beat many small ones). Ties go to the smallest index either way,
/// as `argmax` does.
pub fn nearest_neighbours(mu: &Tensor, block_rows: i64) -> Result<Tensor> {
    let cols = if mu.device().is_cuda() {
        i64::MAX
    } else {
        CPU_TILE_COLS
    };
    nearest_neighbours_tiled(mu, block_rows, cols)
}

/// [`nearest_neighbours`] with an explicit tile of `block_rows × block_cols` products.
pub fn nearest_neighbours_tiled(mu: &Tensor, block_rows: i64, block_cols: i64) -> Result<Tensor> {
    let k = match mu.size().as_slice() {
        [k, _] => *k,
        s => {
            return Err(DinoError::Shape(format!(
                "prototypes must be 2-D, got {s:?}"
            )));
        }
    };
    if k < 2 {
        return Err(DinoError::Shape(format!(
            "KoLeo needs at least 2 prototypes, got {k}"
        )));
    }
    let (rows_per, cols_per) = (block_rows.clamp(1, k), block_cols.clamp(1, k));
    let opts = (Kind::Float, mu.device());
    tch::no_grad(|| {
        let mu = mu.detach().to_kind(Kind::Float).contiguous();
        let full_tile = Tensor::f_empty([rows_per, cols_per], opts)?;
        let mut parts = Vec::with_capacity(((k + rows_per - 1) / rows_per) as usize);
        let mut r0 = 0;
        while r0 < k {
            let n = rows_per.min(k - r0);
            let rows = mu.narrow(0, r0, n);
            let mut best = Tensor::f_full([n], f64::NEG_INFINITY, opts)?;
            let mut best_idx = Tensor::f_zeros([n], (Kind::Int64, mu.device()))?;
            let mut c0 = 0;
            while c0 < k {
                let m = cols_per.min(k - c0);
                let tile = if (n, m) == (rows_per, cols_per) {
                    full_tile.shallow_clone()
                } else {
                    Tensor::f_empty([n, m], opts)?
                };
                let _ = rows.f_mm_out(&tile, &mu.narrow(0, c0, m).tr())?;
                // The row's own column (r0 + a == c0 + b) is excluded by a similarity of −1.
                if r0 < c0 + m && c0 < r0 + n {
                    let _ = tile.f_diagonal(r0 - c0, 0, 1)?.f_fill_(-1.0)?;
                }
                let (v, i) = tile.f_max_dim(1, false)?;
                // Strictly greater: on ties the earlier (smaller) column keeps the row.
                let better = v.f_gt_tensor(&best)?;
                best = v.f_where_self(&better, &best)?;
                best_idx = (i + c0).f_where_self(&better, &best_idx)?;
                c0 += m;
            }
            parts.push(best_idx);
            r0 += n;
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    })
}

/// `L_KP` of effective prototypes `w` `[K, d]` (any dtype; computed in fp32). With `nn_index`
/// given, those neighbours are used instead of a fresh search.
pub fn koleo_proto(
    prototypes: &Tensor,
    eps: f64,
    block_rows: i64,
    nn_index: Option<&Tensor>,
) -> Result<KoleoOutput> {
    tch::autocast(false, || {
        let mu = normalize_rows(prototypes, eps);
        let nn_index = match nn_index {
            Some(i) => {
                if i.size() != [mu.size()[0]] {
                    return Err(DinoError::Shape(format!(
                        "cached neighbour indices {:?} do not fit {:?} prototypes",
                        i.size(),
                        mu.size()
                    )));
                }
                i.shallow_clone()
            }
            None => nearest_neighbours(&mu, block_rows)?,
        };
        let neighbours = mu.index_select(0, &nn_index);
        let distances = Tensor::pairwise_distance(&mu, &neighbours, 2.0, eps, false);
        let loss = -(&distances + eps).log().mean(Kind::Float);
        Ok(KoleoOutput {
            loss,
            nn_index,
            distances: distances.detach(),
        })
    })
}

/// KoLeo-proto with its configuration and the neighbour cache of the refresh interval.
#[derive(Debug)]
pub struct KoleoProto {
    pub eps: f64,
    pub block_rows: i64,
    /// Recompute neighbours every this many steps (1 = every step).
    pub nn_refresh_interval: i64,
    /// Indices of the last search and the step they were computed at.
    pub cache: Option<(i64, Tensor)>,
}

impl KoleoProto {
    pub fn new(cfg: &protodino_config::KoleoConfig) -> Self {
        KoleoProto {
            eps: cfg.eps,
            block_rows: cfg.block_rows,
            nn_refresh_interval: cfg.nn_refresh_interval.max(1),
            cache: None,
        }
    }

    /// `L_KP` at global step `step`, searching neighbours when the interval says so (or when
    /// nothing is cached) and reusing the cached indices otherwise.
    pub fn compute(&mut self, prototypes: &Tensor, step: i64) -> Result<KoleoOutput> {
        let reuse = match &self.cache {
            Some((at, idx))
                if self.nn_refresh_interval > 1 && step - at < self.nn_refresh_interval =>
            {
                Some(idx.shallow_clone())
            }
            _ => None,
        };
        let fresh = reuse.is_none();
        let out = koleo_proto(prototypes, self.eps, self.block_rows, reuse.as_ref())?;
        if fresh && self.nn_refresh_interval > 1 {
            self.cache = Some((step, out.nn_index.shallow_clone()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockwise_search_equals_full_search() {
        tch::manual_seed(3);
        let mu = normalize_rows(
            &Tensor::randn([300, 16], (Kind::Float, tch::Device::Cpu)),
            1e-8,
        );
        // Brute force: the whole product at once, self excluded, argmax.
        let dots = mu.mm(&mu.tr());
        let _ = dots.diagonal(0, 0, 1).fill_(-1.0);
        let full = dots.argmax(1, false);
        for block in [1, 7, 64, 299, 300] {
            let b = nearest_neighbours(&mu, block).unwrap();
            assert!(b.equal(&full), "block {block}");
            for cols in [1, 5, 64, 150, 299, 300, 1000] {
                let t = nearest_neighbours_tiled(&mu, block, cols).unwrap();
                assert!(t.equal(&full), "block {block} cols {cols}");
            }
        }
        // Never the row itself.
        let own = Tensor::arange(300, (Kind::Int64, tch::Device::Cpu));
        assert_eq!(full.eq_tensor(&own).sum(Kind::Int64).int64_value(&[]), 0);
    }

    #[test]
    fn duplicate_prototype_is_its_twins_neighbour() {
        tch::manual_seed(4);
        let w = Tensor::randn([50, 8], (Kind::Float, tch::Device::Cpu));
        w.get(7).copy_(&(w.get(30) * 2.5));
        let out = koleo_proto(&w, 1e-8, 16, None).unwrap();
        assert_eq!(out.nn_index.int64_value(&[7]), 30);
        assert_eq!(out.nn_index.int64_value(&[30]), 7);
        assert!(out.distances.double_value(&[7]) < 1e-6);
    }
}
