//! The small building blocks shared by the models, each creating its variables under the
//! PyTorch names (`weight`, `bias`, `running_mean`, …) with the initialisation the official code
//! gives them: `Linear` (trunc-normal 0.02 or PyTorch's default), `LayerNorm`, `BatchNorm`
//! (with running statistics and `num_batches_tracked` as buffers) and `Conv2d`.

use tch::{Kind, Tensor, nn, nn::Init};

/// `trunc_normal_(t, std, a=-2, b=2)` as timm/DINO call it: the bounds are *absolute* (±2), so
/// with std 0.02 the truncation sits at 100σ and never triggers in practice; values outside are
/// redrawn anyway so the distribution is exactly the truncated one.
pub fn trunc_normal_(t: &Tensor, std: f64) {
    tch::no_grad(|| {
        let mut t = t.shallow_clone();
        let _ = t.normal_(0.0, std);
        loop {
            let outside = t.abs().gt(2.0);
            if outside.sum(Kind::Int64).int64_value(&[]) == 0 {
                break;
            }
            let fresh = t.randn_like() * std;
            let redrawn = fresh.where_self(&outside, &t);
            t.copy_(&redrawn);
        }
    });
}

/// PyTorch's default `Linear`/`Conv` init (`kaiming_uniform_(a=√5)`): U(−1/√fan_in, 1/√fan_in),
/// for the weight and the bias alike.
pub fn default_uniform(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// How a [`Linear`] is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinearInit {
    /// DINO/timm `_init_weights`: weight trunc-normal(std 0.02), bias 0.
    TruncNormal,
    /// PyTorch's default `nn.Linear` reset: U(±1/√in) for weight and bias.
    Default,
}

/// `nn.Linear(in, out, bias)`: `weight` `[out, in]`, `bias` `[out]`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vs: &nn::Path, in_dim: i64, out_dim: i64, bias: bool, init: LinearInit) -> Self {
        let (weight, bias) = match init {
            LinearInit::TruncNormal => {
                let w = vs.zeros("weight", &[out_dim, in_dim]);
                trunc_normal_(&w, 0.02);
                (w, bias.then(|| vs.zeros("bias", &[out_dim])))
            }
            LinearInit::Default => {
                let init = default_uniform(in_dim);
                let w = vs.var("weight", &[out_dim, in_dim], init);
                (w, bias.then(|| vs.var("bias", &[out_dim], init)))
            }
        };
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// `nn.LayerNorm(dim, eps)`: `weight` 1, `bias` 0.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vs: &nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: vs.ones("weight", &[dim]),
            bias: vs.zeros("bias", &[dim]),
            dim,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `nn.BatchNorm1d/2d(dim)` (eps 1e-5, momentum 0.1, affine, running statistics tracked).
///
/// `running_mean`, `running_var` and `num_batches_tracked` are non-trainable variables of the
/// VarStore (so they are saved, loaded and broadcast with the weights); in training mode the
/// forward normalises with batch statistics and updates them in place exactly as PyTorch does
/// (unbiased variance for the running estimate, `num_batches_tracked += 1`).
#[derive(Debug)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
}

impl BatchNorm {
    pub const EPS: f64 = 1e-5;
    pub const MOMENTUM: f64 = 0.1;

    pub fn new(vs: &nn::Path, dim: i64) -> Self {
        let num_batches_tracked = vs.add(
            "num_batches_tracked",
            Tensor::zeros([], (Kind::Int64, vs.device())),
            false,
        );
        BatchNorm {
            weight: vs.ones("weight", &[dim]),
            bias: vs.zeros("bias", &[dim]),
            running_mean: vs.zeros_no_train("running_mean", &[dim]),
            running_var: vs.ones_no_train("running_var", &[dim]),
            num_batches_tracked,
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            tch::no_grad(|| {
                let mut n = self.num_batches_tracked.shallow_clone();
                let _ = n.g_add_scalar_(1);
            });
        }
        Tensor::batch_norm(
            x,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            Self::MOMENTUM,
            Self::EPS,
            false,
        )
    }
}

/// `nn.Conv2d` with square kernel; `weight` `[out, in, k, k]`, optional `bias`.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    /// `init` is the weight init; a bias (if any) gets PyTorch's default U(±1/√fan_in).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vs: &nn::Path,
        in_ch: i64,
        out_ch: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
        bias: bool,
        init: Init,
    ) -> Self {
        let fan_in = in_ch * kernel * kernel;
        Conv2d {
            weight: vs.var("weight", &[out_ch, in_ch, kernel, kernel], init),
            bias: bias.then(|| vs.var("bias", &[out_ch], default_uniform(fan_in))),
            stride,
            padding,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}
