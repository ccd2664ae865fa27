//! The DINO projection head (`DINOHead` of facebookresearch/dino).
//!
//! `mlp`: Linear(in, hidden) → [BN] → GELU → … → Linear(hidden, bottleneck) (names `mlp.0` …
//! `mlp.4`, with BN `mlp.0, 1, 3, 4, 6`; a single layer is `mlp` itself), trunc-normal 0.02, bias
//! 0. Then `F.normalize` (eps 1e-12) and the weight-normalised prototype layer without bias,
//! `last_layer.weight_g` `[K, 1]` (filled with 1) and `last_layer.weight_v` `[K, bottleneck]`
//! (PyTorch's default Linear init, U(±1/√bottleneck), since it is created after the MLP init).
//! With `norm_last_layer` the gain is frozen: it is a non-trainable variable of the VarStore,
//! so it is saved, loaded and EMA-averaged but never in an optimiser.
//!
//! iBOT's head (`iBOTHead` of bytedance/ibot) is this head run on every token, plus — unless the
//! head is shared — a second prototype layer `last_layer2` for the patch tokens
//! ([`PrototypeLayer`]: the same weight-normalised layer, created after `last_layer`, with its
//! gain frozen under the same `norm_last_layer` rule). [`DinoHead::bottleneck`] accepts tokens
//! `[N, T, D]` as well as rows `[N, D]` (the MLP and the normalisation act on the last axis).

use protodino_config::HeadConfig;
use tch::{Tensor, nn};

use crate::layers::{BatchNorm, Linear, LinearInit, default_uniform};

/// A weight-normalised prototype layer without bias: `weight_g` `[K, 1]` (ones; frozen when
/// `norm_last_layer`) and `weight_v` `[K, d]` (PyTorch's default Linear init, U(±1/√d)).
#[derive(Debug)]
pub struct PrototypeLayer {
    pub weight_g: Tensor,
    pub weight_v: Tensor,
}

impl PrototypeLayer {
    /// The layer under `vs` (e.g. `student/head/last_layer2`).
    pub fn new(vs: &nn::Path, out_dim: i64, in_dim: i64, norm_last_layer: bool) -> Self {
        let weight_v = vs.var("weight_v", &[out_dim, in_dim], default_uniform(in_dim));
        let weight_g = if norm_last_layer {
            vs.ones_no_train("weight_g", &[out_dim, 1])
        } else {
            vs.ones("weight_g", &[out_dim, 1])
        };
        PrototypeLayer { weight_g, weight_v }
    }

    /// Effective rows `w_k = g_k v_k/‖v_k‖`, `[K, d]`, differentiable (PyTorch's order).
    pub fn prototypes(&self) -> Tensor {
        let norm = self.weight_v.norm_scalaropt_dim(2, [1], true);
        &self.weight_v * (&self.weight_g / norm)
    }

    /// Logits `[…, K]` of normalised bottleneck features `[…, d]`.
    pub fn forward(&self, y: &Tensor) -> Tensor {
        y.linear::<Tensor>(&self.prototypes(), None)
    }

    /// Number of prototypes K.
    pub fn out_dim(&self) -> i64 {
        self.weight_v.size()[0]
    }
}

#[derive(Debug)]
enum MlpLayer {
    Linear(Linear),
    BatchNorm(BatchNorm),
    Gelu,
}

/// DINO head: MLP → L2 normalise → weight-normalised prototypes.
#[derive(Debug)]
pub struct DinoHead {
    mlp: Vec<MlpLayer>,
    /// `last_layer.weight_g`, `[K, 1]`.
    pub weight_g: Tensor,
    /// `last_layer.weight_v`, `[K, bottleneck]`.
    pub weight_v: Tensor,
    pub norm_last_layer: bool,
}

impl DinoHead {
    pub fn new(vs: &nn::Path, in_dim: i64, cfg: &HeadConfig, norm_last_layer: bool) -> Self {
        let nlayers = cfg.nlayers.max(1);
        let mlp_path = vs / "mlp";
        let mut mlp = Vec::new();
        if nlayers == 1 {
            mlp.push(MlpLayer::Linear(Linear::new(
                &mlp_path,
                in_dim,
                cfg.bottleneck_dim,
                true,
                LinearInit::TruncNormal,
            )));
        } else {
            let mut idx = 0i64;
            let mut dim = in_dim;
            for layer in 0..nlayers {
                let last = layer + 1 == nlayers;
                let out = if last {
                    cfg.bottleneck_dim
                } else {
                    cfg.hidden_dim
                };
                let lin = Linear::new(&(&mlp_path / idx), dim, out, true, LinearInit::TruncNormal);
                mlp.push(MlpLayer::Linear(lin));
                idx += 1;
                dim = out;
                if last {
                    break;
                }
                if cfg.use_bn {
                    mlp.push(MlpLayer::BatchNorm(BatchNorm::new(&(&mlp_path / idx), out)));
                    idx += 1;
                }
                mlp.push(MlpLayer::Gelu);
                idx += 1;
            }
        }
        let last = vs / "last_layer";
        let weight_v = last.var(
            "weight_v",
            &[cfg.out_dim, cfg.bottleneck_dim],
            default_uniform(cfg.bottleneck_dim),
        );
        let weight_g = if norm_last_layer {
            last.ones_no_train("weight_g", &[cfg.out_dim, 1])
        } else {
            last.ones("weight_g", &[cfg.out_dim, 1])
        };
        DinoHead {
            mlp,
            weight_g,
            weight_v,
            norm_last_layer,
        }
    }

    /// The L2-normalised bottleneck features `[N, bottleneck]` (before the prototype layer).
    pub fn bottleneck(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = x.shallow_clone();
        for layer in &self.mlp {
            h = match layer {
                MlpLayer::Linear(l) => l.forward(&h),
                MlpLayer::BatchNorm(b) => b.forward(&h, train),
                MlpLayer::Gelu => h.gelu("none"),
            };
        }
        // F.normalize(h, dim=-1, p=2): h / max(‖h‖, 1e-12)
        let norm = h.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
        &h / norm.expand_as(&h)
    }

    /// Logits `[N, K]`; `train` selects batch statistics in the head's BatchNorms (if any).
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.bottleneck(x, train);
        y.linear::<Tensor>(&self.prototypes(), None)
    }

    /// Effective rows w_k = g_k v_k/|v_k|, `[K, bottleneck]`, differentiable. Computed in
    /// PyTorch's `_weight_norm` order, `v * (g / ‖v‖_row)` (no eps: a zero row is NaN there too).
    pub fn prototypes(&self) -> Tensor {
        let norm = self.weight_v.norm_scalaropt_dim(2, [1], true);
        &self.weight_v * (&self.weight_g / norm)
    }

    /// Number of prototypes K.
    pub fn out_dim(&self) -> i64 {
        self.weight_v.size()[0]
    }
}
