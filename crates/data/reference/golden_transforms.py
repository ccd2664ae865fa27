#!/usr/bin/env python3
"""Golden outputs of torchvision's functional transforms for the Rust data pipeline tests.

Run with the reference virtualenv's python (torch 2.11.0, torchvision 0.26, Pillow, scikit-learn):

    python crates/data/reference/golden_transforms.py crates/data/tests/fixtures

Writes into the given directory:
  * photo.png  - a 48x36 RGB patch of scikit-learn's sample photograph "china.jpg"
  * gray.png   - a 23x31 8-bit grey image (a smooth pattern plus noise, fixed seed)
  * colors.png - 32x32 uniformly random RGB (fixed seed), for the colour operations
  * photo.jpg  - photo.png encoded as JPEG (quality 90), and Pillow's decoding of it
  * golden.json, golden.bin - one case per transform call: parameters, output shape and the
    byte offset of its 8-bit output (or float32 output for the normalisation case) in golden.bin.

Every transform is torchvision's functional op on a PIL image (what DINO's pipeline uses); the
Gaussian blur is `F.gaussian_blur` with kernel size 2*ceil(3*sigma)+1 (the Rust pipeline's
deliberate choice); the mean absolute difference of that blur to PIL's `GaussianBlur(radius)`
that DINO uses is recorded in golden.json ("pil_blur_mad") for the documentation.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter, ImageOps
from sklearn.datasets import load_sample_image
from torchvision.transforms import InterpolationMode


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    china = load_sample_image("china.jpg")  # 427x640x3 uint8
    photo = Image.fromarray(np.ascontiguousarray(china[180:216, 300:348]))  # 48 wide, 36 high
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:31, 0:23]
    g = 128 + 90 * np.sin(xx / 3.0) * np.cos(yy / 5.0) + rng.normal(0, 12, (31, 23))
    gray = Image.fromarray(np.clip(g, 0, 255).astype(np.uint8), "L")
    colors = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")
    photo.save(out_dir / "photo.png")
    gray.save(out_dir / "gray.png")
    colors.save(out_dir / "colors.png")
    inputs = {"photo": photo, "gray": gray.convert("RGB")}

    blob = bytearray()
    cases = []

    def add(name, inp, op, params, img):
        nonlocal blob
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        cases.append({"name": name, "input": inp, "op": op, "params": params,
                      "height": arr.shape[0], "width": arr.shape[1], "dtype": "u8",
                      "offset": len(blob), "len": arr.size})
        blob += arr.tobytes()

    for inp, img in inputs.items():
        w, h = img.size
        # every box lies inside the image (PIL would zero-pad outside; RandomResizedCrop never asks)
        # crop + bicubic resize: down-scale, up-scale, non-square boxes, full image
        for k, (top, left, ch, cw, size) in enumerate(
                [(3, 5, min(28, h - 3), min(40, w - 5), 16), (0, 0, h, w, 32), (10, 2, 12, 9, 24),
                 (1, 4, h - 2, w - 7, 20), (5, 3, 17, 17, 17), (2, 1, 20, 13, 7)]):
            out = F.resized_crop(img, top, left, ch, cw, [size, size],
                                 interpolation=InterpolationMode.BICUBIC)
            add(f"{inp}-rrc{k}", inp, "resized_crop",
                {"top": top, "left": left, "height": ch, "width": cw, "size": size}, out)
        add(f"{inp}-hflip", inp, "hflip", {}, F.hflip(img))
        for f in (0.6, 0.83, 1.0, 1.37):
            add(f"{inp}-brightness-{f}", inp, "brightness", {"factor": f}, F.adjust_brightness(img, f))
            add(f"{inp}-contrast-{f}", inp, "contrast", {"factor": f}, F.adjust_contrast(img, f))
        for f in (0.8, 0.93, 1.2):
            add(f"{inp}-saturation-{f}", inp, "saturation", {"factor": f}, F.adjust_saturation(img, f))
        for f in (-0.1, -0.037, 0.004, 0.05, 0.0999):
            add(f"{inp}-hue-{f}", inp, "hue", {"factor": f}, F.adjust_hue(img, f))
        add(f"{inp}-grayscale", inp, "grayscale", {}, F.rgb_to_grayscale(img, num_output_channels=3))
        for s in (0.1, 0.55, 1.0, 1.93):
            k = 2 * math.ceil(3 * s) + 1
            add(f"{inp}-blur-{s}", inp, "blur", {"sigma": s},
                F.gaussian_blur(img, [k, k], [s, s]))
        add(f"{inp}-solarize", inp, "solarize", {"threshold": 128}, ImageOps.solarize(img, 128))
        # evaluation transform: resize shorter side + centre crop
        for resize, crop in ((40, 32), (20, 16), (30, 30)):
            out = F.center_crop(F.resize(img, resize, interpolation=InterpolationMode.BICUBIC), crop)
            add(f"{inp}-eval-{resize}-{crop}", inp, "eval", {"resize": resize, "crop": crop}, out)
        # a whole crop with fixed parameters: rrc -> flip -> jitter (given order) -> gray -> blur -> solarize
        for k, (order, gs, blur, sol, flip) in enumerate(
                [((3, 0, 2, 1), False, 0.7, True, True), ((1, 2, 3, 0), True, None, False, False),
                 ((0, 1, 2, 3), False, 1.5, False, True)]):
            factors = (1.21, 0.74, 1.13, -0.06)
            box = (4, 6, 30, 35) if inp == "photo" else (2, 3, 26, 19)  # inside the image
            out = F.resized_crop(img, *box, [24, 24], interpolation=InterpolationMode.BICUBIC)
            if flip:
                out = F.hflip(out)
            fns = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
            for o in order:
                out = fns[o](out, factors[o])
            if gs:
                out = F.rgb_to_grayscale(out, num_output_channels=3)
            if blur is not None:
                kk = 2 * math.ceil(3 * blur) + 1
                out = F.gaussian_blur(out, [kk, kk], [blur, blur])
            if sol:
                out = ImageOps.solarize(out, 128)
            add(f"{inp}-chain{k}", inp, "chain",
                {"top": box[0], "left": box[1], "height": box[2], "width": box[3], "size": 24, "order": list(order),
                 "factors": list(factors), "grayscale": gs, "blur": blur, "solarize": sol,
                 "flip": flip}, out)

    # uniformly random colours: every branch of Pillow's HSV round trip and blends
    for f in (-0.1, -0.0421, -0.003, 0.0123, 0.077, 0.1):
        add(f"colors-hue-{f}", "colors", "hue", {"factor": f}, F.adjust_hue(colors, f))
    for f in (0.61, 1.33):
        add(f"colors-saturation-{f}", "colors", "saturation", {"factor": f}, F.adjust_saturation(colors, f))
        add(f"colors-contrast-{f}", "colors", "contrast", {"factor": f}, F.adjust_contrast(colors, f))
        add(f"colors-brightness-{f}", "colors", "brightness", {"factor": f}, F.adjust_brightness(colors, f))

    # JPEG decoding: Pillow (libjpeg-turbo) vs the Rust decoder — a documented difference,
    # checked with a tolerance in the test (both follow the JPEG spec; IDCT/upsampling differ)
    photo.save(out_dir / "photo.jpg", quality=90)
    add("photo-jpeg-decode", "jpeg", "decode", {}, Image.open(out_dir / "photo.jpg").convert("RGB"))

    # normalisation (float32 output)
    t = F.normalize(F.to_tensor(photo), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    arr = t.numpy().astype("<f4")
    cases.append({"name": "photo-normalize", "input": "photo", "op": "normalize", "params": {},
                  "height": arr.shape[1], "width": arr.shape[2], "dtype": "f32",
                  "offset": len(blob), "len": arr.size})
    blob += arr.tobytes()

    # documentation figure: torchvision Gaussian vs PIL's box approximation
    mads = {}
    for s in (0.1, 0.5, 1.0, 2.0):
        k = 2 * math.ceil(3 * s) + 1
        a = np.asarray(F.gaussian_blur(photo, [k, k], [s, s]), dtype=np.float64)
        b = np.asarray(photo.filter(ImageFilter.GaussianBlur(radius=s)), dtype=np.float64)
        mads[str(s)] = float(np.abs(a - b).mean())

    meta = {"torch": torch.__version__, "torchvision": __import__("torchvision").__version__,
            "pillow": Image.__version__, "pil_blur_mad": mads, "cases": cases}
    (out_dir / "golden.bin").write_bytes(bytes(blob))
    (out_dir / "golden.json").write_text(json.dumps(meta, indent=1))
    print(f"{len(cases)} cases, {len(blob)} bytes; PIL blur MAD {mads}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"))
