"""Tiny checkpoints in the official DINO / iBOT layouts, converted with scripts/convert_official.py,
and the collapse figures their prototypes must give, computed here independently of the Rust code.

Writes into OUT_DIR (the committed copies live in crates/analysis/tests/fixtures/):

* `official_dino.safetensors` — a full DINO checkpoint as `main_dino.py` saves it (`student` and
  `teacher` state dicts, both behind DDP's `module.` prefix, `optimizer`, `epoch`, `args`,
  `dino_loss`, `fp16_scaler`), with a trained `weight_g` (so the norms differ, as in a DINO-vMF
  head or `norm_last_layer=False`), converted;
* `official_ibot.safetensors` — a full iBOT checkpoint as `main_ibot.py` saves it (the student
  behind `module.`, the teacher not, `ibot_loss` with `center` and `center2`) whose heads are not
  shared, so each has `last_layer` ([CLS] prototypes) and `last_layer2` (patch prototypes);
* `official_dino_teacher_release.safetensors` — the DINO teacher's bare backbone+head state dict
  (what teacher-only releases hold), converted with `--prefix teacher`;
* `official_expected.json` — for every file, head and prototype layer: the tensor names, K, d, the
  unique-prototype counts (greedy and connected components) at each ε, the nearest-neighbour
  distances (mean, min, max, KoLeo-proto) and the norms of the effective prototypes.

The prototypes are built with a known number of near-duplicates: random, well-separated unit
directions plus copies of some of them rotated by a chosen distance (0.003–0.07), and in the
iBOT [CLS] layer one chain of three (steps of 0.04), where greedy grouping and connected
components disagree. Every pairwise distance is checked to stay clear of each ε, so f32 / f64
rounding cannot move a count.

The script also checks the converter: each converted file holds exactly the tensors of the
checkpoint under protodino's names (`student.` / `teacher.` + the official name without
`module.`), bit for bit, with the arguments in the metadata; and unknown layouts are refused.

Rerun from the repository root with the Python reference environment (`cargo xtask pyref`
provisions it and prints its python):

    $(cargo xtask pyref) scripts/make_official_fixtures.py crates/analysis/tests/fixtures

The outputs are deterministic (fixed seeds), and the Rust tests read the committed files, so the
test suite needs no Python.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import convert_official  # noqa: E402

EPS = [0.01, 0.025, 0.05, 0.1]
EMBED, HIDDEN, BOTTLENECK = 8, 32, 16
# No pairwise distance may lie closer than this to any ε.
MARGIN = 1e-4


# ---- networks with the official parameter names -------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, EMBED, kernel_size=4, stride=4)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(EMBED, 3 * EMBED)
        self.proj = nn.Linear(EMBED, EMBED)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(EMBED, 2 * EMBED)
        self.fc2 = nn.Linear(2 * EMBED, EMBED)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(EMBED)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(EMBED)
        self.mlp = Mlp()


class TinyViT(nn.Module):
    """The parameter names of the official `VisionTransformer` (one block, 8 dims, 2×2 patches)."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, EMBED) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, EMBED) * 0.02)
        self.patch_embed = PatchEmbed()
        self.blocks = nn.ModuleList([Block()])
        self.norm = nn.LayerNorm(EMBED)


def weight_norm_layer(k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the classic weight_norm is deprecated, not removed
        return nn.utils.weight_norm(nn.Linear(BOTTLENECK, k, bias=False))


class Head(nn.Module):
    """DINOHead's names (`mlp.0/2/4`, `last_layer.weight_g/v`), with iBOTHead's separate
    `last_layer2` when `patch_k` is given."""

    def __init__(self, k, patch_k=None):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(EMBED, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
            nn.Linear(HIDDEN, BOTTLENECK),
        )
        self.last_layer = weight_norm_layer(k)
        if patch_k is not None:
            self.last_layer2 = weight_norm_layer(patch_k)


class MultiCropWrapper(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.backbone = TinyViT()
        self.head = head


class DDP(nn.Module):
    """What DistributedDataParallel adds to state-dict names: a `module.` prefix."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class Loss(nn.Module):
    def __init__(self, **buffers):
        super().__init__()
        for name, value in buffers.items():
            self.register_buffer(name, value)


# ---- prototypes with known duplicates -------------------------------------------------------


def rotate(mu, u, distance):
    """`mu` turned towards the unit vector `u ⊥ mu` so that ‖result − mu‖ = distance."""
    theta = 2 * math.asin(distance / 2)
    return math.cos(theta) * mu + math.sin(theta) * u


def orthogonal_unit(rng, mu):
    x = rng.standard_normal(mu.shape)
    x -= (x @ mu) * mu
    return x / np.linalg.norm(x)


def design(rng, k, duplicates, chain_step=None):
    """K unit rows: well-separated random directions, then `count` copies at `distance` of
    distinct ones for each (count, distance), then (optionally) a chain of three along one
    great circle with steps `chain_step`. Rows are shuffled, the chain kept in order."""
    n_extra = sum(c for c, _ in duplicates) + (2 if chain_step else 0)
    n_base = k - n_extra
    while True:
        base = rng.standard_normal((n_base, BOTTLENECK))
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        d = pairwise(base)
        np.fill_diagonal(d, np.inf)
        if d.min() > 0.5:
            break
    rows = [("base", b) for b in base]
    owner = 0
    for count, distance in duplicates:
        for _ in range(count):
            mu = base[owner]
            rows.append(("dup", rotate(mu, orthogonal_unit(rng, mu), distance)))
            owner += 1
    chain_idx = []
    if chain_step:
        mu = base[owner]
        u = orthogonal_unit(rng, mu)
        step = 2 * math.asin(chain_step / 2)
        chain = [mu, math.cos(step) * mu + math.sin(step) * u,
                 math.cos(2 * step) * mu + math.sin(2 * step) * u]
        chain_idx = [owner]
        rows.append(("chain", chain[1]))
        rows.append(("chain", chain[2]))
    order = rng.permutation(len(rows))
    out = np.stack([rows[i][1] for i in order])
    if chain_step:
        # Put the chain's three rows in order at the positions they were shuffled to.
        where = sorted(int(np.where(order == i)[0][0])
                       for i in [chain_idx[0], len(rows) - 2, len(rows) - 1])
        for pos, row in zip(where, chain):
            out[pos] = row
    return out


def pairwise(mu):
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * (mu @ mu.T)))


def set_layer(layer, rng, directions, gains):
    """weight_v = directions × random positive row scales (so v is not unit), weight_g = gains."""
    scales = rng.uniform(0.5, 2.0, size=(directions.shape[0], 1))
    with torch.no_grad():
        layer.weight_v.copy_(torch.from_numpy(directions * scales))
        layer.weight_g.copy_(torch.from_numpy(np.asarray(gains, dtype=np.float64).reshape(-1, 1)))


# ---- independent figures --------------------------------------------------------------------


def figures(weight_v, weight_g):
    """Unique counts, NN distances and norms of one prototype layer, in f64 numpy."""
    v = weight_v.double().numpy()
    g = weight_g.double().numpy().reshape(-1, 1)
    w = g * v / np.linalg.norm(v, axis=1, keepdims=True)
    norms = np.linalg.norm(w, axis=1)
    mu = w / norms[:, None]
    d = pairwise(mu)
    k = len(mu)
    off = d + np.diag(np.full(k, np.inf))
    for eps in EPS:
        gap = np.abs(off - eps).min()
        assert gap > MARGIN, f"a distance lies {gap:.2e} from ε = {eps}"
    nn_dist = off.min(axis=1)
    counts = []
    for eps in EPS:
        g_count, cc_count = greedy_groups(d, eps), components(d, eps)
        counts.append({
            "eps": eps, "greedy": g_count, "connected_components": cc_count,
        })
    return {
        "k": k,
        "dim": int(v.shape[1]),
        "counts": counts,
        "nn": {
            "mean": float(nn_dist.mean()),
            "min": float(nn_dist.min()),
            "max": float(nn_dist.max()),
            "koleo_proto": float(-np.log(nn_dist + 1e-8).mean()),
        },
        "norms": {
            "min": float(norms.min()),
            "p05": float(np.quantile(norms, 0.05)),
            "median": float(np.quantile(norms, 0.5)),
            "mean": float(norms.mean()),
            "p95": float(np.quantile(norms, 0.95)),
            "max": float(norms.max()),
            "unit": bool(np.all(np.abs(norms - 1.0) <= 1e-5)),
        },
    }


def greedy_groups(d, eps):
    group = np.full(len(d), -1)
    n = 0
    for k in range(len(d)):
        if group[k] >= 0:
            continue
        take = (group < 0) & (d[k] < eps)
        take[:k] = False
        take[k] = True
        group[take] = n
        n += 1
    return n


def components(d, eps):
    seen = np.zeros(len(d), dtype=bool)
    n = 0
    for s in range(len(d)):
        if seen[s]:
            continue
        n += 1
        stack = [s]
        seen[s] = True
        while stack:
            i = stack.pop()
            for j in np.nonzero((d[i] < eps) & ~seen)[0]:
                seen[j] = True
                stack.append(int(j))
    return n


def layer_expectation(net_name, layer_name, layer):
    f = figures(layer.weight_v.detach(), layer.weight_g.detach())
    f["weight_v"] = f"{net_name}.head.{layer_name}.weight_v"
    f["weight_g"] = f"{net_name}.head.{layer_name}.weight_g"
    return f


# ---- the checkpoints ------------------------------------------------------------------------


def adamw_state(student):
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    for p in student.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    for p in student.parameters():
        p.grad = None
    return opt.state_dict()


def dino_checkpoint(rng):
    k = 48
    student = DDP(MultiCropWrapper(Head(k)))
    teacher = DDP(MultiCropWrapper(Head(k)))
    # Teacher: 6 copies at 0.004, 5 at 0.02, 5 at 0.07: 42, 37, 37, 32 unique at EPS.
    set_layer(teacher.module.head.last_layer, rng,
              design(rng, k, [(6, 0.004), (5, 0.02), (5, 0.07)]),
              rng.uniform(0.5, 3.0, size=k))
    # Student: 10 copies at 0.003, and a negative gain on one row (its direction flips).
    gains = rng.uniform(0.5, 3.0, size=k)
    gains[7] = -gains[7]
    set_layer(student.module.head.last_layer, rng, design(rng, k, [(10, 0.003)]), gains)
    args = argparse.Namespace(
        arch="vit_tiny", patch_size=4, out_dim=k, norm_last_layer=False, use_bn_in_head=False,
        momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.04,
        warmup_teacher_temp_epochs=0, use_fp16=True, weight_decay=0.04, weight_decay_end=0.4,
        clip_grad=3.0, batch_size_per_gpu=64, epochs=100, freeze_last_layer=1, lr=0.0005,
        warmup_epochs=10, min_lr=1e-06, optimizer="adamw", drop_path_rate=0.1,
        global_crops_scale=(0.4, 1.0), local_crops_number=8, local_crops_scale=(0.05, 0.4),
        data_path="imagenet/train", output_dir="dino_vit_tiny", saveckp_freq=20, seed=0,
        num_workers=10, dist_url="env://", local_rank=0,
    )
    ckpt = {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": adamw_state(student),
        "epoch": 100,
        "args": args,
        "dino_loss": Loss(center=torch.randn(1, k) * 0.1).state_dict(),
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                        "growth_interval": 2000, "_growth_tracker": 17},
    }
    expected = {
        "teacher": {"last_layer": layer_expectation("teacher", "last_layer",
                                                    teacher.module.head.last_layer)},
        "student": {"last_layer": layer_expectation("student", "last_layer",
                                                    student.module.head.last_layer)},
    }
    greedy = [c["greedy"] for c in expected["teacher"]["last_layer"]["counts"]]
    assert greedy == [42, 37, 37, 32], greedy
    return ckpt, expected, teacher.module


def ibot_checkpoint(rng):
    k, patch_k = 40, 24
    student = DDP(MultiCropWrapper(Head(k, patch_k)))
    teacher = MultiCropWrapper(Head(k, patch_k))
    # Teacher CLS: 8 copies at 0.005 and a chain (0.04 steps); patch: 4 at 0.015, 4 at 0.06.
    set_layer(teacher.head.last_layer, rng, design(rng, k, [(8, 0.005)], chain_step=0.04),
              np.ones(k))
    set_layer(teacher.head.last_layer2, rng, design(rng, patch_k, [(4, 0.015), (4, 0.06)]),
              np.ones(patch_k))
    set_layer(student.module.head.last_layer, rng, design(rng, k, [(2, 0.005)]), np.ones(k))
    set_layer(student.module.head.last_layer2, rng, design(rng, patch_k, []), np.ones(patch_k))
    args = argparse.Namespace(
        arch="vit_tiny", patch_size=4, out_dim=k, patch_out_dim=patch_k, shared_head=False,
        shared_head_teacher=False, norm_last_layer=True, momentum_teacher=0.996,
        norm_in_head=None, act_in_head="gelu", use_masked_im_modeling=True,
        pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2], pred_shape="block",
        pred_start_epoch=0, lambda1=1.0, lambda2=1.0, warmup_teacher_temp=0.04,
        teacher_temp=0.07, warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07,
        warmup_teacher_temp_epochs=30, use_fp16=False, epochs=800, lr=0.0005,
        global_crops_number=2, local_crops_number=10, global_crops_scale=(0.25, 1.0),
        local_crops_scale=(0.05, 0.25), output_dir="ibot_vit_tiny", seed=0,
    )
    same_dim = args.shared_head or args.shared_head_teacher
    ckpt = {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": adamw_state(student),
        "epoch": 800,
        "args": args,
        "ibot_loss": Loss(center=torch.randn(1, k) * 0.1,
                          center2=torch.randn(1, 1, k if same_dim else patch_k) * 0.1
                          ).state_dict(),
    }
    expected = {
        net: {layer: layer_expectation(net, layer, getattr(module.head, layer))
              for layer in ("last_layer", "last_layer2")}
        for net, module in (("teacher", teacher), ("student", student.module))
    }
    cls = expected["teacher"]["last_layer"]["counts"]
    at_005 = next(c for c in cls if c["eps"] == 0.05)
    assert at_005["greedy"] == at_005["connected_components"] + 1, cls
    patch = [c["greedy"] for c in expected["teacher"]["last_layer2"]["counts"]]
    assert patch == [24, 20, 20, 16], patch
    return ckpt, expected


# ---- conversion and its checks --------------------------------------------------------------


def run_converter(pth, out, *flags):
    script = os.path.join(HERE, "convert_official.py")
    done = subprocess.run([sys.executable, script, pth, out, *flags], capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"converting {pth} failed:\n{done.stdout}{done.stderr}")
    print(done.stdout, end="")


def protodino_names(ckpt):
    """What the converted file must hold, worked out from the checkpoint itself."""
    want = {}
    for net in ("student", "teacher"):
        for name, t in ckpt[net].items():
            bare = name[len("module."):] if name.startswith("module.") else name
            want[f"{net}.{bare}"] = t
    loss = ckpt.get("dino_loss") or ckpt.get("ibot_loss")
    want["dino_loss.center"] = loss["center"]
    if "ibot_loss" in ckpt:
        want["ibot_loss.center2"] = loss["center2"]
    return want


def check_round_trip(path, want, layout, args=None):
    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
        assert names == set(want), (sorted(names ^ set(want)))
        for name, t in want.items():
            back = f.get_tensor(name)
            assert back.dtype == t.dtype and back.shape == t.shape, name
            assert torch.equal(back, t), name
        meta = json.loads(f.metadata()[convert_official.METADATA_KEY])
    assert meta["layout"] == layout, meta
    if args is not None:
        for key, value in vars(args).items():
            value = list(value) if isinstance(value, tuple) else value
            assert meta["args"][key] == value, (key, meta["args"][key], value)
    assert not any(".module." in n or n.startswith("module.") for n in names)


def check_refusals(ckpt):
    def refused(obj, prefix=None, needle=""):
        try:
            convert_official.convert(obj, prefix)
        except convert_official.ConversionError as e:
            assert needle in str(e), (needle, str(e))
            return
        raise AssertionError(f"accepted {convert_official.describe(obj)}")

    refused({"weights": [1, 2, 3]}, needle="unknown layout")
    refused(ckpt["teacher"], needle="--prefix")
    refused(ckpt["teacher"], prefix="backbone", needle="must be `teacher` or `student`")
    refused({**ckpt, "extra": 1}, needle="unknown top-level entries ['extra']")
    refused({k: v for k, v in ckpt.items() if k != "dino_loss"}, needle="neither `dino_loss`")
    refused(ckpt, prefix="teacher", needle="--prefix is for bare state dicts")
    refused({**ckpt, "dino_loss": {}}, needle="missing ['center']")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    out_dir = parser.parse_args().out_dir
    torch.manual_seed(0)
    rng = np.random.default_rng(20240601)
    dino, dino_expected, dino_teacher = dino_checkpoint(rng)
    ibot, ibot_expected = ibot_checkpoint(rng)
    release = dino_teacher.state_dict()
    check_refusals(dino)

    files = {
        "dino_full": "official_dino.safetensors",
        "ibot_full": "official_ibot.safetensors",
        "dino_teacher_release": "official_dino_teacher_release.safetensors",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for obj, name in ((dino, "checkpoint.pth"), (ibot, "ibot_checkpoint.pth"),
                          (release, "dino_teacher.pth")):
            torch.save(obj, os.path.join(tmp, name))
        run_converter(os.path.join(tmp, "checkpoint.pth"),
                      os.path.join(out_dir, files["dino_full"]))
        run_converter(os.path.join(tmp, "ibot_checkpoint.pth"),
                      os.path.join(out_dir, files["ibot_full"]))
        run_converter(os.path.join(tmp, "dino_teacher.pth"),
                      os.path.join(out_dir, files["dino_teacher_release"]), "--prefix", "teacher")
    check_round_trip(os.path.join(out_dir, files["dino_full"]), protodino_names(dino), "dino",
                     dino["args"])
    check_round_trip(os.path.join(out_dir, files["ibot_full"]), protodino_names(ibot), "ibot",
                     ibot["args"])
    check_round_trip(os.path.join(out_dir, files["dino_teacher_release"]),
                     {f"teacher.{n}": t for n, t in release.items()}, "state_dict")

    expected = {
        "eps": EPS,
        "fixtures": {
            "dino_full": {"file": files["dino_full"], "heads": dino_expected},
            "ibot_full": {"file": files["ibot_full"], "heads": ibot_expected},
            "dino_teacher_release": {"file": files["dino_teacher_release"],
                                     "heads": {"teacher": dino_expected["teacher"]}},
        },
    }
    with open(os.path.join(out_dir, "official_expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(files)} converted checkpoints and official_expected.json to {out_dir}")


if __name__ == "__main__":
    main()
