//! The network of the experiment: the product's [`DinoHead`] (MLP → bottleneck → L2 normalise →
//! weight-normalised prototypes) on frozen features, with no backbone, as a [`DinoNetwork`] so
//! the product's own [`protodino_dino::DinoTrainer`] trains it — the same loss, centring,
//! KoLeo-proto, clipping, AdamW, schedules and EMA teacher as `protodino train`.
//!
//! The step's [`Batch`] carries images `[B, 3, H, W]`. Features ride in it unchanged: a feature
//! vector of dimension D is laid out as `[3, 1, ⌈D/3⌉]` (zero-padded at the end) by
//! [`pack_features`], and [`FeatureHead::forward`] flattens each crop back and keeps the first D
//! values. Nothing else about the batch differs from a training batch.

use protodino_config::HeadConfig;
use protodino_dino::{Batch, DinoNetwork};
use protodino_models::{DinoHead, ForwardCtx};
use tch::{Tensor, nn};

/// The DINO head of one network (student or teacher) over `in_dim`-dimensional features.
#[derive(Debug)]
pub struct FeatureHead {
    pub in_dim: i64,
    pub head: DinoHead,
}

impl FeatureHead {
    /// `vs` is the network root (`root/"student"` or `root/"teacher"`); the head lives under
    /// `vs/"head"` as in `MultiCrop`. Like `MultiCrop`, the student takes `norm_last_layer` from
    /// the configuration and the teacher always normalises its last layer.
    pub fn new(vs: &nn::Path, in_dim: i64, head: &HeadConfig, student: bool) -> Self {
        let norm_last_layer = if student { head.norm_last_layer } else { true };
        FeatureHead {
            in_dim,
            head: DinoHead::new(&(vs / "head"), in_dim, head, norm_last_layer),
        }
    }

    /// The features `[N, D]` of packed crops (inverse of [`pack_features`]).
    pub fn unpack(&self, crop: &Tensor) -> Tensor {
        crop.flatten(1, -1).narrow(1, 0, self.in_dim)
    }
}

impl DinoNetwork for FeatureHead {
    fn forward(&self, crops: &[Tensor], ctx: &ForwardCtx) -> Tensor {
        let feats: Vec<Tensor> = crops.iter().map(|c| self.unpack(c)).collect();
        self.head.forward(&Tensor::cat(&feats, 0), ctx.train)
    }

    fn prototypes(&self) -> Tensor {
        self.head.prototypes()
    }
}

/// Columns of the packed layout of D features: `⌈D/3⌉`.
pub fn packed_width(dim: i64) -> i64 {
    (dim + 2) / 3
}

/// Features `[N, D]` as a crop `[N, 3, 1, ⌈D/3⌉]` (zero-padded).
pub fn pack_features(x: &Tensor) -> Tensor {
    let (n, d) = (x.size()[0], x.size()[1]);
    let w = packed_width(d);
    let pad = 3 * w - d;
    let x = if pad > 0 {
        Tensor::cat(&[x.shallow_clone(), x.zeros_like().narrow(1, 0, pad)], 1)
    } else {
        x.shallow_clone()
    };
    x.reshape([n, 3, 1, w])
}

/// The step's batch of the samples `ids` (dataset indices) from the two feature views.
pub fn feature_batch(views: &[Tensor; 2], ids: &[i64]) -> Batch {
    let idx = Tensor::from_slice(ids);
    Batch {
        global_crops: views
            .iter()
            .map(|v| pack_features(&v.index_select(0, &idx)))
            .collect(),
        local_crops: Vec::new(),
        sample_ids: ids.to_vec(),
        masks: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, nn::VarStore};

    #[test]
    fn packing_round_trips_for_every_remainder() {
        let vs = VarStore::new(tch::Device::Cpu);
        let cfg = HeadConfig {
            out_dim: 8,
            hidden_dim: 16,
            bottleneck_dim: 4,
            nlayers: 2,
            ..crate::experiment::default_head_config()
        };
        for d in [3, 4, 5, 7] {
            let x = Tensor::randn([5, d], (Kind::Float, tch::Device::Cpu));
            let p = pack_features(&x);
            assert_eq!(p.size(), [5, 3, 1, packed_width(d)]);
            let net = FeatureHead::new(&(vs.root() / format!("n{d}")), d, &cfg, true);
            assert!(net.unpack(&p).equal(&x));
            let logits = net.forward(&[p.shallow_clone(), p], &ForwardCtx::eval());
            assert_eq!(logits.size(), [10, 8]);
        }
    }
}
