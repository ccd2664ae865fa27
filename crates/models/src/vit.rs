//! The DINO Vision Transformer (`vision_transformer.py` of facebookresearch/dino).
//!
//! Patch embedding by a stride-`p` convolution, a learnable CLS token and position embedding
//! (trunc-normal 0.02), pre-norm blocks `x += DropPath(Attn(LN(x))); x += DropPath(MLP(LN(x)))`
//! with qkv bias and LayerNorm eps 1e-6, a final LayerNorm, and the CLS token as the feature.
//! Position embeddings are bicubically interpolated for other crop sizes exactly as the
//! official `interpolate_pos_encoding` does (scale factors `(w0 + 0.1)/√N`, CLS kept).
//!
//! iBOT's masked forward ([`VisionTransformer::forward_tokens_masked`], bytedance/ibot
//! `vision_transformer.py`): a student built with [`VisionTransformer::with_mask_token`] owns
//! the learned mask token `masked_embed` `[1, D]` (zeros, as the official parameter); the patch
//! embeddings at masked positions are replaced by it *before* the CLS token and the position
//! embedding are added, and every token comes out after the final norm.

use tch::{Tensor, nn};

use crate::drop_path::drop_path;
use crate::layers::{LayerNorm, Linear, LinearInit, default_uniform, trunc_normal_};
use crate::{Backbone, ForwardCtx};

/// LayerNorm eps of every norm in the DINO ViT (`partial(nn.LayerNorm, eps=1e-6)`).
pub const LN_EPS: f64 = 1e-6;

/// Hyper-parameters of a ViT.
#[derive(Debug, Clone, PartialEq)]
pub struct VitParams {
    pub patch_size: i64,
    /// The image size the position embedding is created for (`(img_size/patch)^2 + 1` rows).
    pub img_size: i64,
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    pub mlp_ratio: f64,
    /// Drop-path rate of the last block; block `i` gets `linspace(0, rate, depth)[i]`.
    pub drop_path_rate: f64,
    pub in_chans: i64,
}

impl VitParams {
    fn with_dims(embed_dim: i64, num_heads: i64, patch_size: i64, img_size: i64) -> Self {
        VitParams {
            patch_size,
            img_size,
            embed_dim,
            depth: 12,
            num_heads,
            mlp_ratio: 4.0,
            drop_path_rate: 0.0,
            in_chans: 3,
        }
    }

    /// ViT-Tiny: 192 dims, 12 blocks, 3 heads.
    pub fn tiny(patch_size: i64, img_size: i64) -> Self {
        Self::with_dims(192, 3, patch_size, img_size)
    }

    /// ViT-Small: 384 dims, 12 blocks, 6 heads.
    pub fn small(patch_size: i64, img_size: i64) -> Self {
        Self::with_dims(384, 6, patch_size, img_size)
    }

    /// ViT-Base: 768 dims, 12 blocks, 12 heads.
    pub fn base(patch_size: i64, img_size: i64) -> Self {
        Self::with_dims(768, 12, patch_size, img_size)
    }

    /// `[x.item() for x in torch.linspace(0, rate, depth)]` as the official code builds the
    /// per-block rates: float32 values from ATen's two-sided linspace kernel (forward from the
    /// start for the first half, backward from the end for the second).
    pub fn drop_path_rates(&self) -> Vec<f64> {
        let d = self.depth;
        let end = self.drop_path_rate as f32;
        if d == 1 {
            return vec![0.0];
        }
        let step = end / (d - 1) as f32;
        let half = d / 2;
        (0..d)
            .map(|i| {
                let v = if i < half {
                    step * i as f32
                } else {
                    end - step * (d - i - 1) as f32
                };
                v as f64
            })
            .collect()
    }
}

#[derive(Debug)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: i64,
    scale: f64,
}

impl Attention {
    fn new(vs: &nn::Path, dim: i64, num_heads: i64) -> Self {
        let head_dim = dim / num_heads;
        Attention {
            qkv: Linear::new(&(vs / "qkv"), dim, 3 * dim, true, LinearInit::TruncNormal),
            proj: Linear::new(&(vs / "proj"), dim, dim, true, LinearInit::TruncNormal),
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
        }
    }

    /// Softmax attention. On the CPU in the official order of operations
    /// (`softmax((q @ kᵀ) * scale) @ v`, bit-exact to the reference); on CUDA through libtorch's
    /// fused `scaled_dot_product_attention` (flash / memory-efficient kernels: the same function
    /// up to rounding, without materialising the `[B, h, N, N]` attention matrix).
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("tokens are [B, N, C]");
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3, self.num_heads, c / self.num_heads])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let out = if q.device().is_cuda() {
            Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, false, self.scale, false,
            )
        } else {
            let attn = (q.matmul(&k.transpose(-2, -1)) * self.scale).softmax(-1, q.kind());
            attn.matmul(&v)
        };
        let out = out.transpose(1, 2).reshape([b, n, c]);
        self.proj.forward(&out)
    }
}

#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    drop_path: f64,
    index: i64,
}

impl Block {
    fn new(vs: &nn::Path, p: &VitParams, drop_path: f64, index: i64) -> Self {
        let hidden = (p.embed_dim as f64 * p.mlp_ratio) as i64;
        let mlp = vs / "mlp";
        Block {
            norm1: LayerNorm::new(&(vs / "norm1"), p.embed_dim, LN_EPS),
            attn: Attention::new(&(vs / "attn"), p.embed_dim, p.num_heads),
            norm2: LayerNorm::new(&(vs / "norm2"), p.embed_dim, LN_EPS),
            fc1: Linear::new(
                &(&mlp / "fc1"),
                p.embed_dim,
                hidden,
                true,
                LinearInit::TruncNormal,
            ),
            fc2: Linear::new(
                &(&mlp / "fc2"),
                hidden,
                p.embed_dim,
                true,
                LinearInit::TruncNormal,
            ),
            drop_path,
            index,
        }
    }

    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Tensor {
        let a = self.attn.forward(&self.norm1.forward(x));
        let x = x + drop_path(&a, ctx, self.drop_path, self.index, 0);
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)).gelu("none"));
        &x + drop_path(&m, ctx, self.drop_path, self.index, 1)
    }
}

/// The DINO ViT; variables `cls_token`, `pos_embed`, `patch_embed.proj.{weight,bias}`,
/// `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`.
#[derive(Debug)]
pub struct VisionTransformer {
    pub params: VitParams,
    pub cls_token: Tensor,
    pub pos_embed: Tensor,
    patch_weight: Tensor,
    patch_bias: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    /// iBOT's mask token `masked_embed` `[1, D]` (students built for masked image modelling).
    pub masked_embed: Option<Tensor>,
}

impl VisionTransformer {
    pub fn new(vs: &nn::Path, p: &VitParams) -> Self {
        Self::with_mask_token(vs, p, false)
    }

    /// A ViT, with iBOT's mask token `masked_embed` (zeros) when `mask_token`. The token is
    /// created last and draws no random numbers, so the other initial weights are those of
    /// [`VisionTransformer::new`].
    pub fn with_mask_token(vs: &nn::Path, p: &VitParams, mask_token: bool) -> Self {
        let d = p.embed_dim;
        let grid = p.img_size / p.patch_size;
        let num_patches = grid * grid;
        let cls_token = vs.zeros("cls_token", &[1, 1, d]);
        let pos_embed = vs.zeros("pos_embed", &[1, num_patches + 1, d]);
        trunc_normal_(&pos_embed, 0.02);
        trunc_normal_(&cls_token, 0.02);
        // The patch projection keeps PyTorch's default Conv2d init (DINO's `_init_weights`
        // touches only Linear and LayerNorm modules).
        let pe = vs / "patch_embed" / "proj";
        let fan_in = p.in_chans * p.patch_size * p.patch_size;
        let patch_weight = pe.var(
            "weight",
            &[d, p.in_chans, p.patch_size, p.patch_size],
            default_uniform(fan_in),
        );
        let patch_bias = pe.var("bias", &[d], default_uniform(fan_in));
        let rates = p.drop_path_rates();
        let blocks = (0..p.depth)
            .map(|i| Block::new(&(vs / "blocks" / i), p, rates[i as usize], i))
            .collect();
        VisionTransformer {
            params: p.clone(),
            cls_token,
            pos_embed,
            patch_weight,
            patch_bias,
            blocks,
            norm: LayerNorm::new(&(vs / "norm"), d, LN_EPS),
            masked_embed: mask_token.then(|| vs.zeros("masked_embed", &[1, d])),
        }
    }

    /// The position embedding for an input of `h × w` pixels (`[1, 1 + (h/p)(w/p), D]`):
    /// the stored one when the grid matches, else the official bicubic interpolation of the
    /// patch part (scale factors `(h0 + 0.1)/√N`, `(w0 + 0.1)/√N`, align_corners false) with the
    /// CLS row kept.
    pub fn interpolate_pos_encoding(&self, h: i64, w: i64) -> Tensor {
        let npatch = (h / self.params.patch_size) * (w / self.params.patch_size);
        let n = self.pos_embed.size()[1] - 1;
        if npatch == n && h == w {
            return self.pos_embed.shallow_clone();
        }
        let dim = self.pos_embed.size()[2];
        let class_pos = self.pos_embed.narrow(1, 0, 1);
        let patch_pos = self.pos_embed.narrow(1, 1, n);
        let side_f = (n as f64).sqrt();
        let side = side_f as i64;
        // Official code: `B, nc, w, h = x.shape`, i.e. its "w" is the height axis; the scale
        // factors apply to (dim 2, dim 3) = (height, width).
        let h0 = (h / self.params.patch_size) as f64 + 0.1;
        let w0 = (w / self.params.patch_size) as f64 + 0.1;
        let (sh, sw) = (h0 / side_f, w0 / side_f);
        // `interpolate(scale_factor=…)` sizes the output as floor(in · scale) and hands the scale
        // factors themselves (not out/in) to the kernel.
        let out_h = (side as f64 * sh).floor() as i64;
        let out_w = (side as f64 * sw).floor() as i64;
        let grid = patch_pos
            .reshape([1, side, side, dim])
            .permute([0, 3, 1, 2])
            .upsample_bicubic2d([out_h, out_w], false, sh, sw);
        let patch_pos = grid.permute([0, 2, 3, 1]).reshape([1, -1, dim]);
        Tensor::cat(&[class_pos, patch_pos], 1)
    }

    /// Tokens `[B, 1 + N, D]` before the first block: patch embedding, CLS, position embedding.
    pub fn prepare_tokens(&self, x: &Tensor) -> Tensor {
        self.prepare_tokens_masked(x, None)
    }

    /// [`Self::prepare_tokens`] with iBOT's masking: where `mask` (`[B, h, w]` or `[B, h·w]`,
    /// bool, row-major patch grid) is true the patch embedding is replaced by `masked_embed`
    /// before the position embedding is added.
    ///
    /// # Panics
    /// With a mask on a ViT built without a mask token, or a mask of the wrong size.
    pub fn prepare_tokens_masked(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, _c, h, w) = x.size4().expect("images are [B, C, H, W]");
        let p = self.params.patch_size;
        let tokens = x
            .conv2d(
                &self.patch_weight,
                Some(&self.patch_bias),
                [p, p],
                [0, 0],
                [1, 1],
                1,
            )
            .flatten(2, -1)
            .transpose(1, 2);
        let tokens = match mask {
            None => tokens,
            Some(m) => {
                let token = self
                    .masked_embed
                    .as_ref()
                    .expect("a mask needs a ViT built with a mask token");
                let n = tokens.size()[1];
                let m = m.reshape([b, n, 1]).to_device(tokens.device());
                token
                    .to_kind(tokens.kind())
                    .reshape([1, 1, -1])
                    .where_self(&m, &tokens)
            }
        };
        let cls = self.cls_token.expand([b, -1, -1], false);
        let tokens = Tensor::cat(&[cls, tokens], 1);
        tokens + self.interpolate_pos_encoding(h, w)
    }

    /// Outputs of every block, *without* the final norm.
    fn block_outputs(&self, x: &Tensor, ctx: &ForwardCtx) -> Vec<Tensor> {
        let mut t = self.prepare_tokens(x);
        let mut outs = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            t = blk.forward(&t, ctx);
            outs.push(t.shallow_clone());
        }
        outs
    }

    /// All tokens after the final norm, `[B, 1 + N, D]`.
    pub fn forward_tokens(&self, x: &Tensor, ctx: &ForwardCtx) -> Tensor {
        let mut t = self.prepare_tokens(x);
        for blk in &self.blocks {
            t = blk.forward(&t, ctx);
        }
        self.norm.forward(&t)
    }

    /// iBOT's forward with `return_all_tokens`: every token after the final norm,
    /// `[B, 1 + N, D]`, the patch embeddings at the `mask` positions replaced by the mask token
    /// (see [`Self::prepare_tokens_masked`]).
    pub fn forward_tokens_masked(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Tensor {
        let mut t = self.prepare_tokens_masked(x, mask);
        for blk in &self.blocks {
            t = blk.forward(&t, ctx);
        }
        self.norm.forward(&t)
    }

    /// The official `get_intermediate_layers(x, n)`: the final norm applied to the outputs of the
    /// last `n` blocks.
    pub fn get_intermediate_layers(&self, x: &Tensor, n: i64, ctx: &ForwardCtx) -> Vec<Tensor> {
        let outs = self.block_outputs(x, ctx);
        let skip = outs.len().saturating_sub(n.max(0) as usize);
        outs[skip..].iter().map(|t| self.norm.forward(t)).collect()
    }
}

impl Backbone for VisionTransformer {
    fn embed_dim(&self) -> i64 {
        self.params.embed_dim
    }

    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Tensor {
        self.forward_tokens(x, ctx).select(1, 0)
    }

    fn forward_all_tokens(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Option<Tensor> {
        Some(self.forward_tokens_masked(x, mask, ctx))
    }

    fn has_mask_token(&self) -> bool {
        self.masked_embed.is_some()
    }

    /// `eval_linear.py`: CLS of the last `n` blocks concatenated; with `avgpool` (the ViT-B
    /// recipe, n = 1) the official code stacks CLS and mean patch token on a new last axis and
    /// flattens, i.e. *interleaves* them (`[c0, m0, c1, m1, …]`); that layout is kept so
    /// official linear heads load. For n > 1 with avgpool (an error in the official code) the
    /// mean patch token of the last block is appended after the CLS tokens.
    fn forward_probe(&self, x: &Tensor, n_last_blocks: i64, avgpool: bool) -> Tensor {
        let layers = self.get_intermediate_layers(x, n_last_blocks, &ForwardCtx::eval());
        let cls: Vec<Tensor> = layers.iter().map(|t| t.select(1, 0)).collect();
        let out = Tensor::cat(&cls, -1);
        if !avgpool {
            return out;
        }
        let last = layers.last().expect("at least one block");
        let mean_patch = last
            .narrow(1, 1, last.size()[1] - 1)
            .mean_dim(1, false, None);
        if layers.len() == 1 {
            let b = out.size()[0];
            Tensor::stack(&[out, mean_patch], -1).reshape([b, -1])
        } else {
            Tensor::cat(&[out, mean_patch], -1)
        }
    }
}
