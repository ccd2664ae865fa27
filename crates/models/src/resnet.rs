//! ResNet-18 / ResNet-50 in torchvision's layout and names, `fc` replaced by the identity as in
//! DINO (`conv1`, `bn1`, `layer{1..4}.{i}.{conv1,bn1,conv2,bn2[,conv3,bn3]}`,
//! `layer{l}.0.downsample.{0,1}`), BatchNorm running statistics as VarStore buffers.
//!
//! Init as torchvision: convolutions kaiming-normal (fan_out, ReLU), BN weight 1 / bias 0.
//! ResNet-50 is v1.5 (stride on the 3×3 convolution). The small-input stem (3×3 stride-1 conv,
//! no max-pool, the usual CIFAR variant) keeps the name `conv1` with a `[64, 3, 3, 3]` weight.

use tch::{Tensor, nn, nn::Init};

use crate::layers::{BatchNorm, Conv2d};
use crate::{Backbone, ForwardCtx};

/// torchvision's conv init: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
fn conv_init(out_ch: i64, kernel: i64) -> Init {
    let fan_out = out_ch * kernel * kernel;
    Init::Randn {
        mean: 0.0,
        stdev: (2.0 / fan_out as f64).sqrt(),
    }
}

fn conv(vs: &nn::Path, i: i64, o: i64, k: i64, stride: i64) -> Conv2d {
    Conv2d::new(vs, i, o, k, stride, k / 2, false, conv_init(o, k))
}

/// Residual block kind: `BasicBlock` (two 3×3, expansion 1) or `Bottleneck` (1×1, 3×3, 1×1,
/// expansion 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Basic,
    Bottleneck,
}

impl BlockKind {
    pub fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Shape of a ResNet. torchvision's models are [`ResNetParams::resnet18`] and
/// [`ResNetParams::resnet50`]; narrower widths exist for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResNetParams {
    pub block: BlockKind,
    /// Blocks per stage (`[2,2,2,2]` for ResNet-18, `[3,4,6,3]` for ResNet-50).
    pub layers: [i64; 4],
    /// Planes of the first stage (64 in torchvision); stages double it.
    pub base_width: i64,
    /// 3×3 stride-1 stem without max-pool for 32–96 px inputs.
    pub small_input_stem: bool,
}

impl ResNetParams {
    pub fn resnet18(small_input_stem: bool) -> Self {
        ResNetParams {
            block: BlockKind::Basic,
            layers: [2, 2, 2, 2],
            base_width: 64,
            small_input_stem,
        }
    }

    pub fn resnet50(small_input_stem: bool) -> Self {
        ResNetParams {
            block: BlockKind::Bottleneck,
            layers: [3, 4, 6, 3],
            base_width: 64,
            small_input_stem,
        }
    }

    /// Feature dimension: `8 · base_width · expansion` (512 / 2048).
    pub fn out_dim(&self) -> i64 {
        8 * self.base_width * self.block.expansion()
    }
}

#[derive(Debug)]
struct ResBlock {
    convs: Vec<(Conv2d, BatchNorm)>,
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl ResBlock {
    fn new(vs: &nn::Path, kind: BlockKind, inplanes: i64, planes: i64, stride: i64) -> Self {
        let out = planes * kind.expansion();
        let specs: Vec<(i64, i64, i64, i64)> = match kind {
            BlockKind::Basic => vec![(inplanes, planes, 3, stride), (planes, planes, 3, 1)],
            BlockKind::Bottleneck => vec![
                (inplanes, planes, 1, 1),
                (planes, planes, 3, stride),
                (planes, out, 1, 1),
            ],
        };
        let convs = specs
            .into_iter()
            .enumerate()
            .map(|(j, (i, o, k, s))| {
                let c = conv(&(vs / format!("conv{}", j + 1)), i, o, k, s);
                let b = BatchNorm::new(&(vs / format!("bn{}", j + 1)), o);
                (c, b)
            })
            .collect();
        let downsample = (stride != 1 || inplanes != out).then(|| {
            let d = vs / "downsample";
            (
                conv(&(&d / "0"), inplanes, out, 1, stride),
                BatchNorm::new(&(&d / "1"), out),
            )
        });
        ResBlock { convs, downsample }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let n = self.convs.len();
        let mut h = x.shallow_clone();
        for (j, (c, b)) in self.convs.iter().enumerate() {
            h = b.forward(&c.forward(&h), train);
            if j + 1 < n {
                h = h.relu();
            }
        }
        let identity = match &self.downsample {
            Some((c, b)) => b.forward(&c.forward(x), train),
            None => x.shallow_clone(),
        };
        (h + identity).relu()
    }
}

/// torchvision ResNet without `fc`: images → globally average-pooled features.
#[derive(Debug)]
pub struct ResNet {
    pub params: ResNetParams,
    conv1: Conv2d,
    bn1: BatchNorm,
    stages: Vec<Vec<ResBlock>>,
}

impl ResNet {
    pub fn new(vs: &nn::Path, p: &ResNetParams) -> Self {
        let w = p.base_width;
        let conv1 = if p.small_input_stem {
            Conv2d::new(&(vs / "conv1"), 3, w, 3, 1, 1, false, conv_init(w, 3))
        } else {
            Conv2d::new(&(vs / "conv1"), 3, w, 7, 2, 3, false, conv_init(w, 7))
        };
        let bn1 = BatchNorm::new(&(vs / "bn1"), w);
        let mut inplanes = w;
        let mut stages = Vec::with_capacity(4);
        for (s, &n_blocks) in p.layers.iter().enumerate() {
            let planes = w << s;
            let stride = if s == 0 { 1 } else { 2 };
            let layer = vs / format!("layer{}", s + 1);
            let mut blocks = Vec::with_capacity(n_blocks as usize);
            for b in 0..n_blocks {
                let st = if b == 0 { stride } else { 1 };
                blocks.push(ResBlock::new(&(&layer / b), p.block, inplanes, planes, st));
                inplanes = planes * p.block.expansion();
            }
            stages.push(blocks);
        }
        ResNet {
            params: p.clone(),
            conv1,
            bn1,
            stages,
        }
    }

    /// Pooled features `[N, out_dim]`; `train` selects batch statistics (and updates the running
    /// ones) in every BatchNorm.
    pub fn features(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = self.bn1.forward(&self.conv1.forward(x), train).relu();
        if !self.params.small_input_stem {
            h = h.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for stage in &self.stages {
            for blk in stage {
                h = blk.forward(&h, train);
            }
        }
        h.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}

impl Backbone for ResNet {
    fn embed_dim(&self) -> i64 {
        self.params.out_dim()
    }

    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Tensor {
        self.features(x, ctx.train)
    }

    /// ResNet probes use the pooled features (DINO's `eval_linear.py`); the arguments are ViT
    /// options and ignored.
    fn forward_probe(&self, x: &Tensor, _n_last_blocks: i64, _avgpool: bool) -> Tensor {
        self.features(x, false)
    }
}
