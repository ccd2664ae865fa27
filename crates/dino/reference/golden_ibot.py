"""Golden values of iBOT's objective (docs/algorithm.md §5), written from our reading of the
official iBOT code (bytedance/ibot: `iBOTLoss` and the training loop of main_ibot.py, `iBOTHead`
of models/head.py, the masked forward of models/vision_transformer.py, the masks of
loader.py's `ImageFolderMask`), restated here, not copied.

Rerun (from the repository root) with the reference virtualenv's python (`cargo xtask pyref`):

    python crates/dino/reference/golden_ibot.py crates/dino/tests/fixtures

It writes the fixtures that crates/dino/tests/golden_ibot.rs compares against:

* ibot_loss.safetensors  iBOTLoss on fixed CLS / patch logits, centres and masks (world of
                         one): the CLS and patch parts, the total, both new centres, and the
                         gradients wrt the student's CLS and patch logits.
* ibot_masks.json        (1) masks of our counter-based generator (ported below bit for bit) for
                         fixed (seed, epoch, sample id, crop) on 4x4 and 14x14 grids; (2)
                         statistics of the *official* mask algorithm driven by Python's
                         `random` over many draws (masked-fraction mean and standard deviation,
                         share of masked images, mean height / width of the masked area's
                         bounding box), for the Rust test to compare its own statistics with.
* tiny_ibot_<variant>.safetensors + .json, variant in {ibot, ibot_vmf}
                         three full iBOT training steps of a 1-block ViT/4 (32 dims, 2 heads) on 16 px global
                         and 8 px local crops (fixed masks from the generator above): initial
                         weights, batches, masks, per-step losses, last gradients, final
                         student, teacher, AdamW state and both centres. `ibot`: separate
                         heads on both sides (K = 32, K2 = 24, KoLeo-proto on both layers);
                         `ibot_vmf`: one shared head, vMF prototypes on both logits.
"""
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from golden_step import (cancel_gradients_last_layer, clip_gradients, cosine_scheduler,
                         get_params_groups, koleo_proto, st, teacher_temp_schedule)
from golden_variants import vmf_correction

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

M64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------
# Our counter-based mask generator (crates/dino/src/masking.rs), ported bit for bit.

def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


GOLDEN = 0x9E3779B97F4A7C15
MASK_DOMAIN = 0x4942_4F54_4D41_534B


def mask_key(seed, epoch, sample_id, crop):
    k = mix64(seed ^ MASK_DOMAIN)
    for field in (epoch, sample_id, crop):
        k = mix64(((k + GOLDEN) & M64) ^ (field & M64))
    return k


class MaskRng:
    def __init__(self, seed, epoch, sample_id, crop):
        self.key = mask_key(seed, epoch, sample_id, crop)
        self.counter = 0

    def next_u64(self):
        c = self.counter
        self.counter += 1
        rot = ((self.key << 32) | (self.key >> 32)) & M64
        return mix64(mix64(self.key ^ ((c * GOLDEN) & M64)) ^ rot)

    def random(self):
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))

    def uniform(self, a, b):
        return a + (b - a) * self.random()

    def below(self, n):
        return (self.next_u64() * n) >> 64

    def randint(self, a, b):
        return a + self.below(b - a + 1)


class PyRandom:
    """The same interface on Python's `random` (what the official loader draws from)."""

    def __init__(self, rng):
        self.rng = rng

    def uniform(self, a, b):
        return self.rng.uniform(a, b)

    def randint(self, a, b):
        return self.rng.randint(a, b)

    def below(self, n):
        return self.rng.randrange(n)


def pred_ratio(ratios, epoch, start_epoch, rng):
    """get_pred_ratio: 0 before the start epoch; else one (m, v) entry, U(m - v, m + v)."""
    if epoch < start_epoch:
        return 0.0
    m, v = ratios[0] if len(ratios) == 1 else ratios[rng.below(len(ratios))]
    return rng.uniform(m - v, m + v) if v > 0 else m


def block_mask(H, W, high, log_aspect, rng):
    """ImageFolderMask's blockwise masking (BEiT's generator)."""
    mask = np.zeros((H, W), dtype=bool)
    count = 0
    while count < high:
        max_mask = high - count
        delta = 0
        for _ in range(10):
            low = (min(H, W) // 3) ** 2
            target = rng.uniform(low, max_mask)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < W and h < H:
                top = rng.randint(0, H - h)
                left = rng.randint(0, W - w)
                already = mask[top:top + h, left:left + w].sum()
                if 0 < h * w - already <= max_mask:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def rand_mask(H, W, high, rng):
    n, k = H * W, int(high)
    idx = list(range(n))
    for i in range(k):
        j = i + rng.below(n - i)
        idx[i], idx[j] = idx[j], idx[i]
    mask = np.zeros(n, dtype=bool)
    mask[idx[:k]] = True
    return mask.reshape(H, W)


def make_mask(spec, H, W, epoch, rng):
    high = pred_ratio(spec["ratios"], epoch, spec.get("start_epoch", 0), rng) * H * W
    if spec["shape"] == "block":
        la = (math.log(spec["aspect"][0]), math.log(spec["aspect"][1]))
        return block_mask(H, W, high, la, rng)
    return rand_mask(H, W, high, rng)


def official_mask(spec, H, W, rng):
    """The official get_pred_ratio draws *every* entry, then chooses; same distribution."""
    ratios = []
    for m, v in spec["ratios"]:
        ratios.append(rng.uniform(m - v, m + v) if v > 0 else m)
    r = ratios[0] if len(ratios) == 1 else rng.rng.choice(ratios)
    high = r * H * W
    if spec["shape"] == "block":
        la = (math.log(spec["aspect"][0]), math.log(spec["aspect"][1]))
        return block_mask(H, W, high, la, rng)
    mask = np.hstack([np.zeros(H * W - int(high)), np.ones(int(high))]).astype(bool)
    np.random.shuffle(mask)
    return mask.reshape(H, W)


def mask_stats(masks):
    """Masked fraction mean / std, share of masked images, bounding-box height / width."""
    frac = np.array([m.mean() for m in masks])
    masked = [m for m in masks if m.any()]
    bh = [np.ptp(np.nonzero(m.any(1))[0]) + 1 for m in masked]
    bw = [np.ptp(np.nonzero(m.any(0))[0]) + 1 for m in masked]
    return {"n": len(masks), "frac_mean": float(frac.mean()), "frac_std": float(frac.std()),
            "masked_share": len(masked) / len(masks),
            "bbox_h_mean": float(np.mean(bh)), "bbox_h_std": float(np.std(bh)),
            "bbox_w_mean": float(np.mean(bw)), "bbox_w_std": float(np.std(bw))}


MASK_SPECS = {
    # The official ViT-S/16 recipe: 14x14 grid, [0, 0.3] +- [0, 0.2], blocks.
    "official_14": dict(ratios=[(0.0, 0.0), (0.3, 0.2)], shape="block", aspect=(0.3, 1 / 0.3),
                        grid=(14, 14)),
    # The demo's 4x4 grid with the code default 0.3.
    "default_4": dict(ratios=[(0.3, 0.0)], shape="block", aspect=(0.3, 1 / 0.3), grid=(4, 4)),
    "rand_14": dict(ratios=[(0.4, 0.1)], shape="rand", aspect=(0.3, 1 / 0.3), grid=(14, 14)),
}
N_STAT = 20000


def golden_masks(out):
    exact = []
    for name, spec in MASK_SPECS.items():
        H, W = spec["grid"]
        for (seed, epoch, sid, crop) in [(0, 0, 0, 0), (3, 1, 17, 1), (11, 5, 123456, 0),
                                         (2 ** 40 + 5, 7, 99, 1)]:
            m = make_mask(spec, H, W, epoch, MaskRng(seed, epoch, sid, crop))
            exact.append({"spec": name, "seed": seed, "epoch": epoch, "sample_id": sid,
                          "crop": crop, "mask": m.astype(int).flatten().tolist()})
    stats = {}
    for name, spec in MASK_SPECS.items():
        H, W = spec["grid"]
        rng = PyRandom(random.Random(1234))
        np.random.seed(1234)
        stats[name] = mask_stats([official_mask(spec, H, W, rng) for _ in range(N_STAT)])
    specs = {k: {"ratios": v["ratios"], "shape": v["shape"], "aspect": v["aspect"],
                 "grid": v["grid"]} for k, v in MASK_SPECS.items()}
    (out / "ibot_masks.json").write_text(json.dumps({"specs": specs, "exact": exact,
                                                     "stats": stats}, indent=1))


# --------------------------------------------------------------------------------------------
# iBOTLoss (world of one), restated.

class IBOTLoss:
    def __init__(self, out_dim, patch_out_dim, ngcrops, nlcrops, student_temp=0.1,
                 center_momentum=0.9, center_momentum2=0.9, lambda1=1.0, lambda2=1.0):
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.ngcrops, self.ncrops = ngcrops, ngcrops + nlcrops
        self.center = torch.zeros(1, out_dim)
        self.center2 = torch.zeros(1, 1, patch_out_dim)
        self.lambda1, self.lambda2 = lambda1, lambda2

    def __call__(self, student_cls, student_patch, teacher_cls, teacher_patch, masks, temp,
                 temp2, s_bias=None, t_bias=None, s_bias2=None, t_bias2=None):
        """student_cls [V*B, K] (globals then locals), student_patch [2B, P, K2], masks: 2 x
        [B, h, w]; *_bias: the vMF corrections [1, K] / [1, K2] (or None)."""
        s_cls = student_cls / self.student_temp
        s_patch = student_patch / self.student_temp
        if s_bias is not None:
            s_cls = s_cls + s_bias
            s_patch = s_patch + s_bias2.unsqueeze(0)
        s_cls_c = s_cls.chunk(self.ncrops)
        s_patch_c = s_patch.chunk(self.ngcrops)
        t_cls = (teacher_cls - self.center) / temp
        t_patch = (teacher_patch - self.center2) / temp2
        if t_bias is not None:
            t_cls = t_cls + t_bias
            t_patch = t_patch + t_bias2.unsqueeze(0)
        t_cls_c = F.softmax(t_cls, dim=-1).detach().chunk(self.ngcrops)
        t_patch_c = F.softmax(t_patch, dim=-1).detach().chunk(self.ngcrops)
        total1, n1, total2, n2 = 0, 0, 0, 0
        for q in range(len(t_cls_c)):
            for v in range(len(s_cls_c)):
                if v == q:
                    l2 = torch.sum(-t_patch_c[q] * F.log_softmax(s_patch_c[v], dim=-1), dim=-1)
                    m = masks[v].flatten(-2, -1)
                    l2 = torch.sum(l2 * m.float(), dim=-1) / m.sum(dim=-1).clamp(min=1.0)
                    total2 += l2.mean()
                    n2 += 1
                else:
                    l1 = torch.sum(-t_cls_c[q] * F.log_softmax(s_cls_c[v], dim=-1), dim=-1)
                    total1 += l1.mean()
                    n1 += 1
        total1 = total1 / n1 * self.lambda1
        total2 = total2 / n2 * self.lambda2
        self.update_center(teacher_cls, teacher_patch)
        return total1, total2

    @torch.no_grad()
    def update_center(self, teacher_cls, teacher_patch):
        c = torch.sum(teacher_cls, dim=0, keepdim=True) / len(teacher_cls)
        self.center = self.center * self.center_momentum + c * (1 - self.center_momentum)
        c2 = torch.sum(teacher_patch.mean(1), dim=0, keepdim=True) / len(teacher_patch)
        self.center2 = self.center2 * self.center_momentum2 + c2 * (1 - self.center_momentum2)


def golden_loss(out):
    g = torch.Generator().manual_seed(31)
    B, L, K, K2, h = 3, 2, 10, 7, 2
    V, P = 2 + L, h * h
    s_cls = (torch.randn(V * B, K, generator=g) * 2).requires_grad_(True)
    s_patch = (torch.randn(2 * B, P, K2, generator=g) * 2).requires_grad_(True)
    t_cls = torch.randn(2 * B, K, generator=g)
    t_patch = torch.randn(2 * B, P, K2, generator=g)
    masks = [torch.rand(B, h, h, generator=g) < 0.4 for _ in range(2)]
    masks[0][1] = False  # an image without masked tokens
    loss = IBOTLoss(K, K2, 2, L, center_momentum=0.9, center_momentum2=0.8, lambda1=0.7,
                    lambda2=1.3)
    loss.center = torch.randn(1, K, generator=g) * 0.1
    loss.center2 = torch.randn(1, 1, K2, generator=g) * 0.1
    c0, c20 = loss.center.clone(), loss.center2.clone()
    temp, temp2 = 0.05, 0.06
    cls, patch = loss(s_cls, s_patch, t_cls, t_patch, masks, temp, temp2)
    (cls + patch).backward()
    save_file(st({"student_cls": s_cls, "student_patch": s_patch, "teacher_cls": t_cls,
                  "teacher_patch": t_patch, "masks0": masks[0].to(torch.uint8),
                  "masks1": masks[1].to(torch.uint8), "center": c0, "center2": c20,
                  "cls": cls.reshape(1), "patch": patch.reshape(1),
                  "new_center": loss.center, "new_center2": loss.center2,
                  "grad_cls": s_cls.grad, "grad_patch": s_patch.grad}),
              str(out / "ibot_loss.safetensors"),
              metadata={"teacher_temp": repr(temp), "teacher_patch_temp": repr(temp2),
                        "center_momentum": "0.9", "center_momentum2": "0.8", "lambda1": "0.7",
                        "lambda2": "1.3", "local_crops": str(L)})


# --------------------------------------------------------------------------------------------
# A ViT as the official DINO / iBOT one (pre-norm blocks, qkv bias, LayerNorm eps 1e-6), with
# iBOT's mask token, and iBOT's head.

class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        y = self.norm1(x)
        qkv = self.attn.qkv(y).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5).softmax(dim=-1)
        y = self.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        x = x + y
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, patch=4, img=16, dim=192, depth=1, heads=3, mask_token=False):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if mask_token:
            self.masked_embed = nn.Parameter(torch.zeros(1, dim))

    def interpolate_pos_encoding(self, x, w, h):
        npatch, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, 0], self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch + 0.1, h // self.patch + 0.1
        side = int(math.sqrt(N))
        patch_pos = F.interpolate(patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                                  scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
                                  mode="bicubic")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos.unsqueeze(0), patch_pos), dim=1)

    def forward(self, x, mask=None):
        B, _, w, h = x.shape
        x = self.patch_embed.proj(x)
        if mask is not None:
            # iBOT's mask_model: masked positions of the patch embedding take the mask token.
            x = x.permute(0, 2, 3, 1)
            x = torch.where(mask.unsqueeze(-1), self.masked_embed.to(x.dtype), x)
            x = x.permute(0, 3, 1, 2)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def wn_layer(out_dim, bottleneck, norm_last_layer):
    layer = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
    layer.weight_g.data.fill_(1)
    if norm_last_layer:
        layer.weight_g.requires_grad = False
    return layer


def protos(layer):
    return torch._weight_norm(layer.weight_v, layer.weight_g, 0)


class IBOTHead(nn.Module):
    def __init__(self, in_dim, out_dim, patch_out_dim, hidden=24, bottleneck=8,
                 norm_last_layer=True, shared=False):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = wn_layer(out_dim, bottleneck, norm_last_layer)
        if not shared:
            self.last_layer2 = wn_layer(patch_out_dim, bottleneck, norm_last_layer)

    def patch_layer(self):
        return getattr(self, "last_layer2", self.last_layer)

    def forward(self, x):
        """x [N, 1+P, D] -> (CLS [N, K], patch [N, P, K2]); x [N, D] -> CLS [N, K]."""
        y = F.normalize(self.mlp(x), dim=-1, p=2)
        if x.dim() == 2:
            return self.last_layer(y)
        return self.last_layer(y[:, 0]), self.patch_layer()(y[:, 1:])


class IBOTNet(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops, masks=None):
        """Global crops (masked for the student) -> (CLS, patch); locals -> CLS."""
        g = self.backbone(torch.cat(crops[:2]), None if masks is None else torch.cat(masks))
        cls, patch = self.head(g)
        if len(crops) > 2:
            loc = self.backbone(torch.cat(crops[2:]))[:, 0]
            cls = torch.cat((cls, self.head(loc)))
        return cls, patch


TINY_IBOT = dict(B=2, L=2, G=16, LOC=8, patch=4, dim=32, heads=2, K=32, K2=24, epochs=3, ipe=2, lr=0.5,
                 min_lr=1e-4, warmup_epochs=1, wd=0.04, wd_end=0.4, momentum_teacher=0.9,
                 warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2,
                 warmup_teacher_patch_temp=0.05, teacher_patch_temp=0.08, clip=0.3,
                 freeze_last_layer=1, koleo_weight=0.1, koleo_eps=1e-8, student_temp=0.1,
                 center_momentum=0.9, center_momentum2=0.8, lambda1=1.0, lambda2=0.7, steps=3, adam_eps=1e-5,
                 seed=5, pred_ratio=[[0.0, 0.0], [0.5, 0.2]])


def golden_tiny_ibot(out, name, vmf):
    c = dict(TINY_IBOT, prototypes="vmf" if vmf else "normalised", shared_head=vmf)
    shared = c["shared_head"]
    torch.manual_seed(17 if vmf else 16)
    D, heads = c["dim"], c["heads"]
    student = IBOTNet(ViT(dim=D, heads=heads, mask_token=True),
                      IBOTHead(D, c["K"], c["K2"], norm_last_layer=False, shared=shared))
    teacher = IBOTNet(ViT(dim=D, heads=heads),
                      IBOTHead(D, c["K"], c["K2"], norm_last_layer=True, shared=shared))
    gen = torch.Generator().manual_seed(41)
    with torch.no_grad():
        # Varied gains (vMF concentrations differ from the start) and non-zero mask token.
        for layer in {id(l): l for l in (student.head.last_layer, student.head.patch_layer())}.values():
            layer.weight_g.copy_(torch.rand(layer.weight_g.shape, generator=gen) * 1.5 + 0.5)
        student.backbone.masked_embed.copy_(torch.randn(1, D, generator=gen) * 0.02)
    teacher.load_state_dict(student.state_dict(), strict=False)
    for p in teacher.parameters():
        p.requires_grad = False
    init = {f"init.student.{k}": v.clone() for k, v in student.state_dict().items()}
    s_names = dict(student.named_parameters())
    t_named = list(teacher.named_parameters())
    common = [(s_names[n], p) for n, p in t_named if n in s_names]

    V = 2 + c["L"]
    lr_s = cosine_scheduler(c["lr"] * c["B"] / 256.0, c["min_lr"], c["epochs"], c["ipe"],
                            warmup_epochs=c["warmup_epochs"])
    wd_s = cosine_scheduler(c["wd"], c["wd_end"], c["epochs"], c["ipe"])
    m_s = cosine_scheduler(c["momentum_teacher"], 1, c["epochs"], c["ipe"])
    tt = teacher_temp_schedule(c["warmup_teacher_temp"], c["teacher_temp"],
                               c["warmup_teacher_temp_epochs"], c["epochs"])
    tt2 = teacher_temp_schedule(c["warmup_teacher_patch_temp"], c["teacher_patch_temp"],
                                c["warmup_teacher_temp_epochs"], c["epochs"])
    ibot_loss = IBOTLoss(c["K"], c["K2"] if not shared else c["K"], 2, c["L"], c["student_temp"],
                         c["center_momentum"], c["center_momentum2"], c["lambda1"], c["lambda2"])
    # eps 1e-5 (not 1e-8): Adam's first steps turn the element-wise rounding of near-zero
    # gradients into updates of ±lr — the key part of `qkv.bias` has an analytically zero
    # gradient (a softmax ignores a shift shared by all keys), a few prototype gains have
    # gradients of 1e-9 — so that with 1e-8 both implementations' final parameters differ by
    # their rounding noise amplified to lr. With 1e-5 those elements stay in Adam's linear
    # regime and the comparison measures the implementation.
    optimizer = torch.optim.AdamW(get_params_groups(student), eps=c["adam_eps"])
    spec = dict(ratios=c["pred_ratio"], shape="block", aspect=(0.3, 1 / 0.3))
    grid = c["G"] // c["patch"]

    g = torch.Generator().manual_seed(42)
    tensors = dict(init)
    steps = []
    ids = [3, 8]
    for it in range(c["steps"]):
        epoch = it // c["ipe"]
        glob = torch.randn(2, c["B"], 3, c["G"], c["G"], generator=g)
        loc = torch.randn(c["L"], c["B"], 3, c["LOC"], c["LOC"], generator=g)
        sample_ids = [i + 10 * it for i in ids]
        masks = [torch.from_numpy(np.stack([
            make_mask(spec, grid, grid, epoch, MaskRng(c["seed"], epoch, sid, crop))
            for sid in sample_ids])) for crop in range(2)]
        tensors[f"batch{it}.global_crops"] = glob
        tensors[f"batch{it}.local_crops"] = loc
        tensors[f"batch{it}.masks"] = torch.stack(masks).to(torch.uint8)
        tensors[f"batch{it}.sample_ids"] = torch.tensor(sample_ids)
        images = list(glob) + list(loc)
        for i, pg in enumerate(optimizer.param_groups):
            pg["lr"] = lr_s[it]
            if i == 0:
                pg["weight_decay"] = wd_s[it]
        temp, temp2 = tt[epoch], tt2[epoch]
        t_cls, t_patch = teacher(images[:2])
        s_cls, s_patch = student(images, masks)
        biases = {}
        if vmf:
            with torch.no_grad():
                biases["t_bias"] = vmf_correction(protos(teacher.head.last_layer), temp)
                biases["t_bias2"] = vmf_correction(protos(teacher.head.patch_layer()), temp2)
            biases["s_bias"] = vmf_correction(protos(student.head.last_layer), c["student_temp"])
            biases["s_bias2"] = vmf_correction(protos(student.head.patch_layer()),
                                               c["student_temp"])
        cls, patch = ibot_loss(s_cls, s_patch, t_cls, t_patch, masks, temp, temp2, **biases)
        loss = cls + patch
        kp, _, _ = koleo_proto(protos(student.head.last_layer), c["koleo_eps"])
        total = loss + c["koleo_weight"] * kp
        kp2 = torch.zeros(())
        if not shared:
            kp2, _, _ = koleo_proto(protos(student.head.last_layer2), c["koleo_eps"])
            total = total + c["koleo_weight"] * kp2
        assert math.isfinite(total.item())
        optimizer.zero_grad()
        total.backward()
        clip_gradients(student, c["clip"])
        cancel_gradients_last_layer(epoch, student, c["freeze_last_layer"])
        optimizer.step()
        with torch.no_grad():
            m = m_s[it]
            for param_q, param_k in common:
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        tensors[f"center{it}"] = ibot_loss.center
        tensors[f"center2_{it}"] = ibot_loss.center2
        steps.append({"step": it, "epoch": epoch, "loss": loss.item(), "cls": cls.item(),
                      "patch": patch.item(), "koleo_proto": kp.item() + kp2.item(),
                      "total": total.item(), "teacher_temp": float(temp),
                      "teacher_patch_temp": float(temp2),
                      "masked_fraction": float(torch.cat(masks).float().mean())})
        if it == c["steps"] - 1:
            for n, p in student.named_parameters():
                if p.grad is not None:
                    tensors[f"grad.student.{n}"] = p.grad
            for n, p in student.named_parameters():
                tensors[f"student.{n}"] = p
                if p in optimizer.state:
                    s = optimizer.state[p]
                    tensors[f"optimizer.exp_avg.student.{n}"] = s["exp_avg"]
                    tensors[f"optimizer.exp_avg_sq.student.{n}"] = s["exp_avg_sq"]
            for n, p in teacher.named_parameters():
                tensors[f"teacher.{n}"] = p
    save_file(st(tensors), str(out / f"tiny_ibot_{name}.safetensors"))
    (out / f"tiny_ibot_{name}.json").write_text(json.dumps({"config": c, "steps": steps},
                                                           indent=1))


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    golden_masks(out)
    golden_loss(out)
    golden_tiny_ibot(out, "ibot", vmf=False)
    golden_tiny_ibot(out, "ibot_vmf", vmf=True)


if __name__ == "__main__":
    main()
