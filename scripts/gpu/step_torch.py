#!/usr/bin/env python3
"""PyTorch eager reference for the throughput of one DINO + KoLeo-proto training step.

The same step as `crates/dino/examples/step_time.rs` (protodino's DinoTrainer with the default
configuration): ViT-S/16 (drop path 0.1 in the student), DINO head (3-layer MLP 384-2048-2048-256,
L2 normalisation, weight-normalised prototype layer K = 65536 with weight_g frozen), 2x224 +
10x96 crops, teacher on the global crops without gradient, DINO loss (official pair loop) and
KoLeo-proto (lambda 0.1, blockwise nearest neighbour over the L2-normalised prototypes in fp32,
4096 rows a block), bf16 autocast around the networks only (loss and KoLeo in fp32), a host read
of the loss (the non-finite check), per-parameter gradient clipping at 3.0 without host syncs,
AdamW with two parameter groups (torch.optim.AdamW defaults: the foreach implementation), EMA
teacher update (official per-parameter loop) and centre update.

Written from docs/algorithm.md and crates/dino/reference/golden_step.py (the spec-derived
pieces), with the official DINO ViT (vision_transformer.py: explicit softmax attention,
bicubic position-embedding interpolation). Inputs are random normal tensors made on the device
before the clock starts; each timed step ends with torch.cuda.synchronize().

    python3 scripts/gpu/step_torch.py --batch 64 --steps 20 --warmup 5 [--bf16] [--device cuda]

Prints progress lines and, last, one JSON line with images_per_s (batch rows per second).
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# Official DINO ViT (vision_transformer.py), without dropout (all rates 0 in DINO).

def drop_path(x, drop_prob, training):
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class SdpaAttention(Attention):
    """Variant with F.scaled_dot_product_attention (flash / memory-efficient kernels)."""

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, num_heads, drop_path_rate, attn_cls):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn_cls(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


# (embed_dim, num_heads) of the official DINO ViTs (depth 12).
ARCHS = {"vit_tiny": (192, 3), "vit_small": (384, 6)}


class VisionTransformer(nn.Module):
    def __init__(self, patch_size=16, img_size=224, embed_dim=384, depth=12, num_heads=6,
                 drop_path_rate=0.0, attn_cls=Attention):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, dpr[i], attn_cls)
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_size + 0.1
        h0 = h // self.patch_size + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def forward(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.constant_(m.bias, 0)
        # weight_norm(Linear(bottleneck, K, bias=False)) with weight_g = 1 (official), as explicit
        # parameters so the prototypes w = g v / ||v|| are one differentiable expression.
        v = torch.empty(out_dim, bottleneck_dim)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        if norm_last_layer:
            self.weight_g.requires_grad = False

    def prototypes(self):
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return F.linear(x, self.prototypes())


class MultiCropWrapper(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
        start_idx, outputs = 0, []
        for end_idx in idx_crops:
            outputs.append(self.backbone(torch.cat(x[start_idx:end_idx])))
            start_idx = end_idx
        return self.head(torch.cat(outputs))


# ------------------------------------------------------------------------------------------------
# Loss, KoLeo-proto, clipping (docs/algorithm.md; golden_step.py).

class DINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output, temp):
        student_out = (student_output.float() / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output.float() - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        return total_loss / n_loss_terms

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output.float(), dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def koleo_proto(w, eps=1e-8, block_rows=4096):
    mu = F.normalize(w.float(), eps=eps, p=2, dim=-1)
    with torch.no_grad():
        m = mu.detach()
        k = m.shape[0]
        parts = []
        for r0 in range(0, k, block_rows):
            n = min(block_rows, k - r0)
            dots = m[r0:r0 + n] @ m.t()
            dots[:, r0:r0 + n].diagonal().fill_(-1)
            parts.append(dots.argmax(dim=1))
        idx = torch.cat(parts)
    distances = F.pairwise_distance(mu, mu[idx], p=2, eps=eps)
    return -torch.log(distances + eps).mean(), distances


@torch.no_grad()
def clip_gradients(params, clip):
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.norm() for g in grads])
    coefs = ((norms + 1e-6).reciprocal() * clip).clamp_max(1.0)
    for g, c in zip(grads, coefs):
        g.mul_(c)
    return norms


def params_groups(model):
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--K", type=int, default=65536)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="vit_small")
    ap.add_argument("--local-crops", type=int, default=10)
    ap.add_argument("--koleo-weight", type=float, default=0.1)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--sdpa", action="store_true", help="fused attention instead of the official")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=float("inf"),
                    help="start no step after this many seconds of stepping")
    a = ap.parse_args()

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"impl": "pytorch-eager", "error": "torch sees no CUDA device"}))
        return 1
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    attn = SdpaAttention if a.sdpa else Attention
    dim, heads = ARCHS[a.arch]
    student = MultiCropWrapper(VisionTransformer(embed_dim=dim, num_heads=heads, drop_path_rate=0.1,
                                                 attn_cls=attn),
                               DINOHead(dim, a.K, norm_last_layer=True)).to(dev)
    teacher = MultiCropWrapper(VisionTransformer(embed_dim=dim, num_heads=heads, attn_cls=attn),
                               DINOHead(dim, a.K, norm_last_layer=True)).to(dev)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    ncrops = 2 + a.local_crops
    dino_loss = DINOLoss(a.K, ncrops).to(dev)
    optimizer = torch.optim.AdamW(params_groups(student))
    trainable = [p for p in student.parameters() if p.requires_grad]
    s_params, t_params = list(student.parameters()), list(teacher.parameters())
    n_params = sum(p.numel() for p in trainable)
    lr = 5e-4 * a.batch / 256.0
    wd, momentum, teacher_temp, clip = 0.04, 0.996, 0.04, 3.0
    print(f"{a.arch}/16 + head K={a.K}: {n_params} trainable parameters, batch {a.batch}, "
          f"device {dev}, {'bf16 autocast' if a.bf16 else 'fp32'}, "
          f"{'sdpa' if a.sdpa else 'official'} attention, torch {torch.__version__}", flush=True)

    def batch(s):
        g = torch.Generator(device=dev).manual_seed(s)
        r = lambda size: torch.randn(a.batch, 3, size, size, device=dev, generator=g)
        return [r(224), r(224)] + [r(96) for _ in range(a.local_crops)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(images):
        for i, pg in enumerate(optimizer.param_groups):
            pg["lr"] = lr
            if i == 0:
                pg["weight_decay"] = wd
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            with torch.no_grad():
                teacher_output = teacher(images[:2])
            student_output = student(images)
        loss = dino_loss(student_output, teacher_output, teacher_temp)
        if a.koleo_weight != 0:
            kp, _ = koleo_proto(student.head.prototypes())
            loss = loss + a.koleo_weight * kp
        value = loss.item()
        if not math.isfinite(value):
            raise SystemExit(f"loss is {value}")
        optimizer.zero_grad()
        loss.backward()
        clip_gradients(trainable, clip)
        optimizer.step()
        with torch.no_grad():
            for param_q, param_k in zip(s_params, t_params):
                param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
        dino_loss.update_center(teacher_output)
        return value

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    begin = time.perf_counter()
    for s in range(a.warmup + a.steps):
        if time.perf_counter() - begin > a.max_seconds:
            print(f"stopping after {s} steps: --max-seconds {a.max_seconds} reached", flush=True)
            break
        images = batch(s)
        sync()
        t0 = time.perf_counter()
        value = step(images)
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        print(f"step {s}: {dt:.4f} s  total loss {value:.4f}", flush=True)
    timed = times[min(a.warmup, len(times)):]
    mean = sum(timed) / len(timed) if timed else None
    out = {
        "impl": "pytorch-eager",
        "arch": a.arch,
        "attention": "sdpa" if a.sdpa else "official",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "bf16": a.bf16,
        "batch": a.batch,
        "K": a.K,
        "koleo_weight": a.koleo_weight,
        "steps_timed": len(timed),
        "warmup": a.warmup,
        "mean_step_s": mean,
        "images_per_s": a.batch / mean if timed else None,
        "step_times_s": [round(t, 5) for t in times],
        "last_total_loss": value if times else None,
        "peak_mem_gib": (torch.cuda.max_memory_allocated(dev) / 2**30) if dev.type == "cuda" else None,
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
