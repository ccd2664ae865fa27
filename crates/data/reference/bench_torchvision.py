#!/usr/bin/env python3
"""torchvision counterpart of `protodino-data-bench`: the DINO multi-crop augmentation with
torchvision transforms on PIL images in a DataLoader, images/s of the full pipeline.

Run with the reference virtualenv's python (torch 2.11.0, torchvision 0.26, Pillow, scikit-learn):

    # once: write the benchmark photographs (an ImageFolder of ~500x375 JPEGs)
    python crates/data/reference/bench_torchvision.py --make-photos /tmp/pd-photos
    # torchvision side (same worker count as the Rust side's threads; best of --repeats runs, plus images per CPU-second)
    python crates/data/reference/bench_torchvision.py --photos /tmp/pd-photos \
        --fmnist-raw <data_root>/fashion-mnist/raw --workers 2
    # Rust side
    cargo run --release -p protodino-data --bin protodino-data-bench -- \
        photos=/tmp/pd-photos fmnist=<data_root>/fashion-mnist/train threads=2

The augmentation is written from docs/algorithm.md §1.2 (DINO's DataAugmentationDINO): per crop
RandomResizedCrop(BICUBIC) -> flip -> RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), 0.8) ->
RandomGrayscale(0.2) -> PIL GaussianBlur(radius U[0.1, 2]) with the crop's probability ->
solarize (global-2, p 0.2) -> ToTensor + Normalize. Loading is DINO's: PIL open + convert("RGB").
"""
import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

PRESETS = {
    # name: (global size, global scale, n local, local size, local scale)
    "dino": (224, (0.25, 1.0), 10, 96, (0.05, 0.25)),
    "cpu": (32, (0.4, 1.0), 6, 16, (0.1, 0.4)),
}


class MaybeBlur:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() <= self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return img


class MaybeSolarize:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class MultiCrop:
    def __init__(self, preset):
        """`preset`: a PRESETS name or a (global size, global scale, n local, local size,
        local scale) tuple."""
        g, gs, n_local, l, ls = PRESETS[preset] if isinstance(preset, str) else preset
        bicubic = T.InterpolationMode.BICUBIC
        flip_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        norm = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
        self.g1 = T.Compose([T.RandomResizedCrop(g, scale=gs, interpolation=bicubic), flip_jitter,
                             MaybeBlur(1.0), norm])
        self.g2 = T.Compose([T.RandomResizedCrop(g, scale=gs, interpolation=bicubic), flip_jitter,
                             MaybeBlur(0.1), MaybeSolarize(0.2), norm])
        self.local = T.Compose([T.RandomResizedCrop(l, scale=ls, interpolation=bicubic), flip_jitter,
                                MaybeBlur(0.5), norm])
        self.n_local = n_local

    def __call__(self, img):
        return [self.g1(img), self.g2(img)] + [self.local(img) for _ in range(self.n_local)]


class Files(Dataset):
    def __init__(self, root, transform, n):
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        self.transform, self.n = transform, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        with open(self.files[i % len(self.files)], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img)


class Idx(Dataset):
    def __init__(self, raw_dir, transform, n):
        b = (Path(raw_dir) / "train-images-idx3-ubyte").read_bytes()
        self.images = np.frombuffer(b, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        self.transform, self.n = transform, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i % len(self.images)], "L").convert("RGB"))


def cpu_seconds(pids):
    """User + system CPU seconds of the given processes (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / tick
        except (OSError, IndexError):
            pass
    return total


def bench(ds_cls, root, preset, workers, images, batch):
    """(wall images/s, images per CPU-second of the main process and its workers)."""
    ds = ds_cls(root, MultiCrop(preset), images + batch)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    it = iter(loader)
    next(it)  # warm-up: workers started, first batch done
    pids = [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])]
    t, cpu0 = time.perf_counter(), cpu_seconds(pids)
    done = 0
    for crops in it:
        done += crops[0].shape[0]
    wall, cpu = time.perf_counter() - t, cpu_seconds(pids) - cpu0
    return done / wall, done / max(cpu, 1e-9)


def make_photos(out: Path):
    from sklearn.datasets import load_sample_images
    imgs = load_sample_images().images  # china.jpg, flower.jpg: 427x640
    for k, arr in enumerate(imgs):
        d = out / f"photo{k}"
        d.mkdir(parents=True, exist_ok=True)
        base = Image.fromarray(arr)
        for j in range(32):
            # distinct files: shifted 500x375 windows of a slightly upscaled photo, some mirrored
            big = base.resize((560, 420), Image.BICUBIC)
            x, y = (j * 7) % 60, (j * 5) % 45
            im = big.crop((x, y, x + 500, y + 375))
            if j % 2:
                im = ImageOps.mirror(im)
            im.save(d / f"{j:03d}.jpg", quality=90)
    print(f"wrote {2 * 32} JPEGs under {out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-photos", type=Path)
    ap.add_argument("--photos", type=Path)
    ap.add_argument("--fmnist-raw", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.make_photos:
        make_photos(a.make_photos)
        return
    torch.set_num_threads(1)
    print("impl\tdataset\tpreset\tthreads\timages/s\timages/cpu-s")
    sets = []
    if a.photos:
        sets.append(("photos-500x375-jpeg", Files, a.photos))
    if a.fmnist_raw:
        sets.append(("fashion-mnist-shards", Idx, a.fmnist_raw))
    for name, cls, root in sets:
        for preset in ("dino", "cpu"):
            n = a.images * 8 if preset == "cpu" else a.images
            runs = [bench(cls, root, preset, a.workers, n, a.batch) for _ in range(max(a.repeats, 1))]
            best, per_cpu = max(r[0] for r in runs), max(r[1] for r in runs)
            print(f"torchvision\t{name}\t{preset}\t{a.workers}\t{best:.1f}\t{per_cpu:.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
