"""Golden values for the protodino-models tests, written from docs/algorithm.md §1.3 (not copied code).

Rerun with the reference virtualenv's python (torch 2.11, torchvision, safetensors), from the
repository root:

    python crates/models/reference/golden_models.py crates/models/tests/fixtures

It builds tiny networks with the official DINO / torchvision parameter names, rounds every
weight to a float16-representable value (the fixtures store them as F16 to stay small; Rust
loads them into f32 variables, so both sides compute with identical weights), and writes:

* vit_p16.safetensors / vit_p4.safetensors: weights `backbone.*` of a ViT (embed 24/48, depth 2,
  heads 3, patch 16 / 4) plus `out.<size>` features (CLS after the final norm) for the fixed input;
* head.safetensors: DINO head weights `head.*` (with BN, 3 layers) + input + logits (train/eval);
* resnet.safetensors: a narrow ResNet-18-style net (torchvision layout) + pooled features
  (eval, train) and bn1.running_mean after the train forward;
* resnet50_names.json: names and shapes of torchvision's resnet50 state_dict with fc removed.

The fixed input is the formula x_flat[i] = ((i*7919 + 13) % 2003) / 1001.5 - 1 (float64 → float32),
which Rust reproduces exactly.
"""
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file


def fixed_input(shape):
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.int64)
    v = ((i * 7919 + 13) % 2003).to(torch.float64) / 1001.5 - 1.0
    return v.to(torch.float32).reshape(shape)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * 4)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class ViT(nn.Module):
    def __init__(self, img, patch, dim, depth, heads):
        super().__init__()
        self.patch = patch
        self.patch_embed = PatchEmbed(patch, dim)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        cls_pos = self.pos_embed[:, 0]
        patch_pos = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch + 0.1
        h0 = h // self.patch + 0.1
        side = int(math.sqrt(n))
        patch_pos = F.interpolate(
            patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos.shape[-2] and int(h0) == patch_pos.shape[-1]
        patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((cls_pos.unsqueeze(0), patch_pos), dim=1)

    def forward(self, x):
        b, _, w, h = x.shape
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat((self.cls_token.expand(b, -1, -1), t), dim=1)
        t = t + self.interpolate_pos_encoding(t, w, h)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 0]


class Head(nn.Module):
    def __init__(self, in_dim, k, hidden, bottleneck):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.last_layer = nn.Module()
        self.last_layer.weight_v = nn.Parameter(torch.empty(k, bottleneck).uniform_(-0.25, 0.25))
        self.last_layer.weight_g = nn.Parameter(torch.rand(k, 1) + 0.5)

    def forward(self, x):
        y = F.normalize(self.mlp(x), dim=-1, p=2)
        v, g = self.last_layer.weight_v, self.last_layer.weight_g
        w = v * (g / v.norm(dim=1, keepdim=True))
        return F.linear(y, w)


def randomise(module):
    """Random weights (non-trivial BN statistics too), rounded to float16-representable values."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand_like(t) + 0.5)
                elif name.endswith("running_mean"):
                    t.copy_(torch.randn_like(t) * 0.1)
                elif name.endswith("weight") and t.dim() == 1:
                    t.copy_(1.0 + 0.1 * torch.randn_like(t))
                elif t.dim() >= 2 and "last_layer" not in name:
                    t.copy_(torch.randn_like(t) * (1.0 / math.sqrt(t[0].numel())))
                elif "last_layer" not in name:
                    t.copy_(torch.randn_like(t) * 0.05)
                t.copy_(t.half().float())


def state(module, prefix):
    return {prefix + k: v.detach().clone().half() if v.dtype.is_floating_point else v.detach().clone()
            for k, v in module.state_dict().items()}


def vit_fixture(out, name, img, patch, dim, sizes):
    vit = ViT(img, patch, dim, depth=2, heads=3)
    randomise(vit)
    vit.eval()
    tensors = state(vit, "backbone.")
    with torch.no_grad():
        for s in sizes:
            tensors[f"out.{s}"] = vit(fixed_input((2, 3, s, s))).contiguous()
    save_file(tensors, str(out / f"{name}.safetensors"))


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vit_fixture(out, "vit_p16", 224, 16, 24, [224, 96])
    vit_fixture(out, "vit_p4", 32, 4, 48, [32, 16])

    head = Head(24, k=64, hidden=32, bottleneck=16)
    randomise(head)
    tensors = state(head, "head.")
    x = fixed_input((6, 24))
    with torch.no_grad():
        head.eval()
        tensors["out.eval"] = head(x)
        head.train()
        tensors["out.train"] = head(x)
        tensors["out.train_running_mean0"] = head.mlp[1].running_mean.clone()
    save_file(tensors, str(out / "head.safetensors"))

    import torchvision
    from torchvision.models.resnet import BasicBlock, ResNet

    class Narrow(ResNet):
        """ResNet-18 layout with widths 4, 8, 16, 32 (torchvision names)."""

        def __init__(self):
            super().__init__(BasicBlock, [2, 2, 2, 2])
            self.inplanes = 4
            self.conv1 = nn.Conv2d(3, 4, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.layer1 = self._make_layer(BasicBlock, 4, 2)
            self.layer2 = self._make_layer(BasicBlock, 8, 2, stride=2)
            self.layer3 = self._make_layer(BasicBlock, 16, 2, stride=2)
            self.layer4 = self._make_layer(BasicBlock, 32, 2, stride=2)
            self.fc = nn.Identity()

    rn = Narrow()
    randomise(rn)
    tensors = state(rn, "")
    x = fixed_input((3, 3, 64, 64))
    with torch.no_grad():
        rn.eval()
        tensors["out.eval"] = rn(x)
        rn.train()
        tensors["out.train"] = rn(x)
        tensors["out.train_bn1_running_mean"] = rn.bn1.running_mean.clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "resnet.safetensors"))

    r50 = torchvision.models.resnet50()
    r50.fc = nn.Identity()
    names = [[k, list(v.shape)] for k, v in r50.state_dict().items()]
    (out / "resnet50_names.json").write_text(json.dumps(names) + "\n")


if __name__ == "__main__":
    main()
