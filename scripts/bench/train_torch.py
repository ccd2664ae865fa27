#!/usr/bin/env python3
"""PyTorch counterpart of `protodino train` for the end-to-end benchmark: the DINO + KoLeo-proto
training loop a user would otherwise run, with torchvision transforms on PIL images in a
`DataLoader`, on Fashion-MNIST, configured from the same TOML files as protodino.

    python scripts/bench/train_torch.py --config configs/default.toml --config configs/cpu-demo.toml \
        --fmnist-raw <data_root>/fashion-mnist/raw --steps 100

What it runs (docs/algorithm.md, official DINO main_dino.py order): the training set is the
`data.limit` evenly spaced images `i * n // limit` of the 60 000 (as protodino's `data.limit`),
shuffled per epoch, batches of `train.batch_size_per_worker` with drop_last, decoded into PIL
"L" -> "RGB" and augmented by the DINO multi-crop (crates/data/reference/bench_torchvision.py)
in `data.num_threads` DataLoader worker processes; `train.threads` torch threads; the student
and teacher ViT and head of scripts/gpu/step_torch.py at the configuration's sizes; DINO loss,
KoLeo-proto, per-parameter clipping, last-layer freezing in the first `freeze_last_layer`
epochs, AdamW (torch's default foreach implementation) with cosine lr / weight-decay
schedules, EMA with the cosine momentum schedule, centre update. fp32, CPU. The model and the step
are `DinoLoop`, shared with the recovery benchmark's elastic loop (scripts/bench/recovery_torch.py).

Throughput is images / seconds from the first `next()` on the DataLoader (workers start there)
to the end of the last step, the same span `protodino train` reports as `train_seconds`.
Prints one JSON line last.
"""
import argparse
import json
import math
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
sys.path.insert(0, str(ROOT / "crates" / "data" / "reference"))
sys.path.insert(0, str(ROOT / "crates" / "dino" / "reference"))
import step_torch as ref  # noqa: E402
from bench_torchvision import MultiCrop  # noqa: E402
from golden_step import cosine_scheduler, teacher_temp_schedule  # noqa: E402


def merged(paths):
    cfg = {}
    for p in paths:
        with open(p, "rb") as f:
            for section, values in tomllib.load(f).items():
                cfg.setdefault(section, {}).update(values)
    return cfg


class FashionMnist(Dataset):
    def __init__(self, raw_dir, limit, transform):
        b = (Path(raw_dir) / "train-images-idx3-ubyte").read_bytes()
        images = np.frombuffer(b, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        n = len(images)
        ids = [i * n // limit for i in range(limit)] if 0 < limit < n else list(range(n))
        self.images, self.ids, self.transform = images, ids, transform

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[self.ids[i]], "L").convert("RGB")
        return self.transform(img)



class DinoLoop:
    """The recipe of a merged configuration: the student and teacher ViT and head of
    scripts/gpu/step_torch.py, DINO loss, KoLeo-proto, AdamW and the cosine schedules over
    `train.epochs` epochs of `per_epoch` steps, the learning rate scaled by `batch / 256` (`batch`:
    the samples of one step over the whole group), and one training step ([`DinoLoop.step`]).
    Built from the torch generator's current state (seed it first)."""

    def __init__(self, cfg, per_epoch, batch):
        m, h, c, o, t, lo = (cfg[k] for k in ("model", "head", "crops", "optim", "train", "loss"))
        dim, heads = ref.ARCHS[m["arch"]]
        depth = m["depth"] or 12
        epochs = t["epochs"]

        def vit(drop):
            return ref.VisionTransformer(patch_size=m["patch_size"], img_size=m["img_size"], embed_dim=dim,
                                         depth=depth, num_heads=heads, drop_path_rate=drop)

        def head():
            return ref.DINOHead(dim, h["out_dim"], hidden_dim=h["hidden_dim"],
                                bottleneck_dim=h["bottleneck_dim"], norm_last_layer=h["norm_last_layer"])

        self.student = student = ref.MultiCropWrapper(vit(m["drop_path_rate"]), head())
        self.teacher = teacher = ref.MultiCropWrapper(vit(0.0), head())
        teacher.load_state_dict(student.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
        ncrops = 2 + c["local_crops_number"]
        self.dino_loss = ref.DINOLoss(h["out_dim"], ncrops, student_temp=lo["student_temp"],
                                      center_momentum=lo["center_momentum"])
        self.optimizer = torch.optim.AdamW(ref.params_groups(student),
                                           betas=(o["adam_beta1"], o["adam_beta2"]), eps=o["adam_eps"])
        self.trainable = [p for p in student.parameters() if p.requires_grad]
        self.last_layer = [p for n, p in student.named_parameters() if "weight_v" in n or "weight_g" in n]
        self.s_params, self.t_params = list(student.parameters()), list(teacher.parameters())

        self.lr_s = cosine_scheduler(o["lr"] * batch / 256.0, o["min_lr"], epochs, per_epoch, o["warmup_epochs"])
        self.wd_s = cosine_scheduler(o["weight_decay"], o["weight_decay_end"], epochs, per_epoch)
        self.mom_s = cosine_scheduler(o["momentum_teacher"], 1.0, epochs, per_epoch)
        self.temp_s = teacher_temp_schedule(lo["warmup_teacher_temp"], lo["teacher_temp"],
                                            lo["warmup_teacher_temp_epochs"], epochs)
        self.cfg, self.per_epoch = cfg, per_epoch

    def step(self, it, images, world=1):
        """Step `it` on this process's share `images` of the batch; returns its loss. With
        `world > 1` (a `torch.distributed` group of that size), the gradients are averaged over
        the group before clipping and the centre statistics summed over it, as official DINO's
        DDP and `update_center` do."""
        cfg, o = self.cfg, self.cfg["optim"]
        optimizer, teacher, student, dino_loss = self.optimizer, self.teacher, self.student, self.dino_loss
        koleo = cfg["koleo"]["weight"]
        epoch = it // self.per_epoch
        for i, pg in enumerate(optimizer.param_groups):
            pg["lr"] = self.lr_s[it]
            if i == 0:
                pg["weight_decay"] = self.wd_s[it]
        with torch.no_grad():
            teacher_output = teacher(images[:2])
        student_output = student(images)
        loss = dino_loss(student_output, teacher_output, float(self.temp_s[epoch]))
        if koleo != 0:
            kp, _ = ref.koleo_proto(student.head.prototypes(), eps=cfg["koleo"]["eps"],
                                    block_rows=cfg["koleo"]["block_rows"])
            loss = loss + koleo * kp
        value = loss.item()
        if not math.isfinite(value):
            raise SystemExit(f"loss is {value}")
        optimizer.zero_grad()
        loss.backward()
        if world > 1:
            grads = [p.grad for p in self.trainable if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        if o["clip_grad"] > 0:
            ref.clip_gradients(self.trainable, o["clip_grad"])
        if epoch < o["freeze_last_layer"]:
            for p in self.last_layer:
                p.grad = None
        optimizer.step()
        with torch.no_grad():
            mom = self.mom_s[it]
            for q, k in zip(self.s_params, self.t_params):
                k.data.mul_(mom).add_((1 - mom) * q.detach().data)
        if world > 1:
            with torch.no_grad():
                total = torch.sum(teacher_output.float(), dim=0, keepdim=True)
                torch.distributed.all_reduce(total)
                batch_center = total / (len(teacher_output) * world)
                dino_loss.center = (dino_loss.center * dino_loss.center_momentum
                                    + batch_center * (1 - dino_loss.center_momentum))
        else:
            dino_loss.update_center(teacher_output)
        return value

    def state_dict(self):
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "loss": self.dino_loss.state_dict()}

    def load_state_dict(self, state):
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dino_loss.load_state_dict(state["loss"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True, type=Path)
    ap.add_argument("--fmnist-raw", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    cfg = merged(a.config)
    m, h, c, t, d = (cfg[k] for k in ("model", "head", "crops", "train", "data"))
    assert m["arch"].startswith("vit"), "the reference loop implements the ViTs"
    depth = m["depth"] or 12
    threads = t["threads"] or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(t["seed"])

    preset = (c["global_crop_size"], tuple(c["global_crops_scale"]), c["local_crops_number"],
              c["local_crop_size"], tuple(c["local_crops_scale"]))
    ds = FashionMnist(a.fmnist_raw, d["limit"], MultiCrop(preset))
    batch = t["batch_size_per_worker"]
    loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=d["num_threads"], persistent_workers=d["num_threads"] > 0,
                        prefetch_factor=d["prefetch_batches"] if d["num_threads"] > 0 else None)
    per_epoch = len(loader)
    loop = DinoLoop(cfg, per_epoch, batch)
    koleo = cfg["koleo"]["weight"]

    print(f"pytorch loop: {len(ds)} images, {per_epoch} steps/epoch, {a.steps} steps, "
          f"{m['arch']}/{m['patch_size']} depth {depth}, K = {h['out_dim']}, lambda = {koleo}, "
          f"{d['num_threads']} DataLoader workers, {threads} torch threads", flush=True)
    begin = time.perf_counter()
    seen, it, value = 0, 0, float("nan")
    while it < a.steps:
        for images in loader:
            value = loop.step(it, images)
            seen += images[0].shape[0]
            it += 1
            if it % 10 == 0:
                rate = seen / (time.perf_counter() - begin)
                print(f"step {it}: loss {value:.4f} {rate:.1f} img/s", flush=True)
            if it >= a.steps:
                break
    secs = time.perf_counter() - begin
    print(json.dumps({"impl": "pytorch", "steps": it, "images_seen": seen, "train_seconds": secs,
                      "images_per_second": seen / secs, "last_total_loss": value}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
