//! The DINO multi-crop augmentation of docs/algorithm.md §1.2: parameter sampling (with
//! torchvision's order and semantics) separated from application (pure, on 8-bit RGB).
//!
//! Per crop, in this order (DINO's `DataAugmentationDINO`):
//! `RandomResizedCrop(size, scale, ratio=(3/4, 4/3), BICUBIC)` → `RandomHorizontalFlip(0.5)` →
//! `RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8)` → `RandomGrayscale(0.2)` →
//! `GaussianBlur(p)` (radius U[0.1, 2.0]) → `Solarization(p)` (global-2 only) → `ToTensor` +
//! ImageNet `Normalize`.
//!
//! Probabilities follow the exact comparisons of the sources: flip iff `u < 0.5`; jitter iff
//! `u ≤ 0.8` (`RandomApply` skips when `p < u`); grayscale iff `u < 0.2`; blur iff `u ≤ p`
//! (DINO's `GaussianBlur`); solarise iff `u < p`. Every draw is taken whether or not the
//! operation applies, so the draw sequence of a crop has a fixed layout.

use crate::blur::GaussianBlur;
use crate::color;
use crate::image::{RgbImage, normalize_into};
use crate::resample::{Rect, Resampler};
use crate::rng::CounterRng;

/// DINO colour-jitter strengths (brightness, contrast, saturation, hue).
pub const JITTER: [f64; 4] = [0.4, 0.4, 0.2, 0.1];
pub const JITTER_PROB: f64 = 0.8;
pub const GRAYSCALE_PROB: f64 = 0.2;
pub const FLIP_PROB: f64 = 0.5;
pub const BLUR_RADIUS: [f64; 2] = [0.1, 2.0];
pub const SOLARIZE_THRESHOLD: u8 = 128;
pub const RATIO: [f64; 2] = [3.0 / 4.0, 4.0 / 3.0];

/// What one crop position asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropSpec {
    pub size: usize,
    pub scale: [f64; 2],
    pub blur_prob: f64,
    pub solarize_prob: f64,
}

/// Colour-jitter draw: the op order (0 brightness, 1 contrast, 2 saturation, 3 hue) and factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jitter {
    pub order: [usize; 4],
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
}

/// Every random decision of one crop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropParams {
    /// The crop box in the source image (top `y`, left `x`).
    pub rect: Rect,
    pub flip: bool,
    pub jitter: Option<Jitter>,
    pub grayscale: bool,
    /// Blur σ (= PIL radius) if the blur applies.
    pub blur_sigma: Option<f64>,
    pub solarize: bool,
}

/// Python's `round` (half to even) as torchvision uses it for the crop size.
fn py_round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// torchvision `RandomResizedCrop.get_params`: 10 tries of (area fraction ~ U(scale),
/// log-ratio ~ U(log 3/4, log 4/3)), then the centre-crop fallback.
pub fn sample_rrc(rng: &mut CounterRng, width: usize, height: usize, scale: [f64; 2]) -> Rect {
    let area = (width * height) as f64;
    let log_ratio = [RATIO[0].ln(), RATIO[1].ln()];
    for _ in 0..10 {
        let target_area = area * rng.uniform(scale[0], scale[1]);
        let aspect = rng.uniform(log_ratio[0], log_ratio[1]).exp();
        let w = py_round((target_area * aspect).sqrt());
        let h = py_round((target_area / aspect).sqrt());
        if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
            let (w, h) = (w as usize, h as usize);
            let y = rng.below((height - h + 1) as u64) as usize;
            let x = rng.below((width - w + 1) as u64) as usize;
            return Rect { x, y, w, h };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < RATIO[0] {
        (
            width,
            (py_round(width as f64 / RATIO[0]) as usize).min(height),
        )
    } else if in_ratio > RATIO[1] {
        (
            (py_round(height as f64 * RATIO[1]) as usize).min(width),
            height,
        )
    } else {
        (width, height)
    };
    Rect {
        x: (width - w) / 2,
        y: (height - h) / 2,
        w,
        h,
    }
}

/// Draw all parameters of one crop of a `width × height` image.
pub fn sample_crop_params(
    rng: &mut CounterRng,
    width: usize,
    height: usize,
    spec: &CropSpec,
) -> CropParams {
    let rect = sample_rrc(rng, width, height, spec.scale);
    let flip = rng.uniform01() < FLIP_PROB;
    let apply_jitter = rng.uniform01() <= JITTER_PROB;
    let order = rng.permutation::<4>();
    let brightness = rng.uniform(1.0 - JITTER[0], 1.0 + JITTER[0]);
    let contrast = rng.uniform(1.0 - JITTER[1], 1.0 + JITTER[1]);
    let saturation = rng.uniform(1.0 - JITTER[2], 1.0 + JITTER[2]);
    let hue = rng.uniform(-JITTER[3], JITTER[3]);
    let grayscale = rng.uniform01() < GRAYSCALE_PROB;
    let apply_blur = rng.uniform01() <= spec.blur_prob;
    let sigma = rng.uniform(BLUR_RADIUS[0], BLUR_RADIUS[1]);
    let solarize = rng.uniform01() < spec.solarize_prob;
    CropParams {
        rect,
        flip,
        jitter: apply_jitter.then_some(Jitter {
            order,
            brightness,
            contrast,
            saturation,
            hue,
        }),
        grayscale,
        blur_sigma: apply_blur.then_some(sigma),
        solarize,
    }
}

/// Per-thread buffers for applying crops: nothing is allocated per pixel or per crop once warm.
#[derive(Debug, Default)]
pub struct Scratch {
    pub resampler: Resampler,
    pub blur: GaussianBlur,
    pub pixels: Vec<u8>,
}

/// Apply the photometric part (everything after the resized crop) to `px` (`size × size`).
pub fn apply_photometric(px: &mut [u8], size: usize, p: &CropParams, blur: &mut GaussianBlur) {
    if p.flip {
        color::hflip(px, size);
    }
    // Saturation, hue and grayscale leave a grey crop (R = G = B everywhere) unchanged, exactly
    // (Pillow's luma of (x, x, x) is x), and brightness and contrast keep it grey: grey data
    // such as Fashion-MNIST skips them. Known lazily, on the first op that can use it.
    let mut grey: Option<bool> = None;
    let mut is_grey = |px: &[u8]| *grey.get_or_insert_with(|| color::is_grey(px));
    if let Some(j) = p.jitter {
        for op in j.order {
            match op {
                0 => color::adjust_brightness(px, j.brightness),
                1 => color::adjust_contrast(px, j.contrast),
                2 if !is_grey(px) => color::adjust_saturation(px, j.saturation),
                3 if !is_grey(px) => color::adjust_hue(px, j.hue),
                _ => {}
            }
        }
    }
    if p.grayscale && !is_grey(px) {
        color::to_grayscale(px);
    }
    if let Some(sigma) = p.blur_sigma {
        blur.apply(px, size, size, sigma);
    }
    if p.solarize {
        color::solarize(px, SOLARIZE_THRESHOLD);
    }
}

/// Produce one crop as 8-bit RGB in `scratch.pixels` (`3 · size²` bytes).
pub fn render_crop_u8(img: &RgbImage, size: usize, p: &CropParams, scratch: &mut Scratch) {
    scratch.pixels.resize(3 * size * size, 0);
    let full = Rect {
        x: 0,
        y: 0,
        w: size,
        h: size,
    };
    scratch
        .resampler
        .resize_crop(img, p.rect, size, size, full, &mut scratch.pixels);
    apply_photometric(&mut scratch.pixels, size, p, &mut scratch.blur);
}

/// Produce one crop, normalised, planar, into `out` (`3 · size²` floats).
pub fn render_crop(
    img: &RgbImage,
    size: usize,
    p: &CropParams,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    render_crop_u8(img, size, p, scratch);
    normalize_into(&scratch.pixels, out);
}

/// Evaluation transform: `Resize(resize, BICUBIC)` (shorter side; the longer side is
/// `int(resize · long / short)` as torchvision computes it) then `CenterCrop(crop)` (offsets
/// `int(round((H − crop) / 2))`), fused: only the crop window of the resized image is computed.
/// If the resized image is smaller than the crop (resize < crop) the window is clamped to the
/// image and the output is resized to `crop` directly (torchvision would zero-pad; documented
/// difference for a configuration DINO never uses).
pub fn render_eval(
    img: &RgbImage,
    resize: usize,
    crop: usize,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let (w, h) = (img.width, img.height);
    let (rw, rh) = if w <= h {
        (resize, (resize as f64 * h as f64 / w as f64) as usize)
    } else {
        ((resize as f64 * w as f64 / h as f64) as usize, resize)
    };
    scratch.pixels.resize(3 * crop * crop, 0);
    let src = Rect { x: 0, y: 0, w, h };
    if rw >= crop && rh >= crop {
        let top = py_round((rh - crop) as f64 / 2.0) as usize;
        let left = py_round((rw - crop) as f64 / 2.0) as usize;
        let window = Rect {
            x: left,
            y: top,
            w: crop,
            h: crop,
        };
        scratch
            .resampler
            .resize_crop(img, src, rw, rh, window, &mut scratch.pixels);
    } else {
        let window = Rect {
            x: 0,
            y: 0,
            w: crop,
            h: crop,
        };
        scratch
            .resampler
            .resize_crop(img, src, crop, crop, window, &mut scratch.pixels);
    }
    normalize_into(&scratch.pixels, out);
}
