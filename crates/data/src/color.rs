//! Photometric transforms on 8-bit RGB with Pillow's arithmetic, as torchvision applies them to
//! PIL images: `ColorJitter` (brightness, contrast, saturation via `ImageEnhance`, hue via an
//! HSV round trip), `Grayscale(3)` and `ImageOps.solarize`.
//!
//! Pillow details reproduced on purpose (they decide the last bit):
//! * `ImageEnhance` blends with `Image.blend(degenerate, img, f)`, computed in `float` as
//!   `d + f·(v − d)` and *truncated* to 8 bits after clamping;
//! * luma is `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`;
//! * contrast's degenerate image is the mean luma rounded half-up, `int(mean + 0.5)`;
//! * hue: torchvision adds `np.int8(hue·255)` (truncated toward zero) to the 8-bit H channel
//!   with wrap-around, using Pillow's `rgb2hsv`/`hsv2rgb`.

#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Pillow `ImagingBlend` for one channel value: `im1 + alpha (im2 − im1)`, truncated.
#[inline]
fn blend(degenerate: u8, v: u8, alpha: f32) -> u8 {
    let t = degenerate as i32 as f32 + alpha * (v as i32 - degenerate as i32) as f32;
    if t <= 0.0 {
        0
    } else if t >= 255.0 {
        255
    } else {
        t as u8
    }
}

/// `ImageEnhance.Brightness(img).enhance(f)`: blend with black.
pub fn adjust_brightness(px: &mut [u8], factor: f64) {
    if factor == 1.0 {
        return; // Image.blend copies im2 for alpha == 1
    }
    let a = factor as f32;
    for v in px.iter_mut() {
        *v = blend(0, *v, a);
    }
}

/// `ImageEnhance.Contrast(img).enhance(f)`: blend with the mean-luma grey image.
pub fn adjust_contrast(px: &mut [u8], factor: f64) {
    if factor == 1.0 {
        return;
    }
    let n = (px.len() / 3) as f64;
    let sum: u64 = px
        .chunks_exact(3)
        .map(|p| luma(p[0], p[1], p[2]) as u64)
        .sum();
    let mean = (sum as f64 / n + 0.5) as i64 as u8;
    let a = factor as f32;
    for v in px.iter_mut() {
        *v = blend(mean, *v, a);
    }
}

/// `ImageEnhance.Color(img).enhance(f)`: blend with the per-pixel luma.
pub fn adjust_saturation(px: &mut [u8], factor: f64) {
    if factor == 1.0 {
        return;
    }
    let a = factor as f32;
    for p in px.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]);
        p[0] = blend(l, p[0], a);
        p[1] = blend(l, p[1], a);
        p[2] = blend(l, p[2], a);
    }
}

/// Pillow `rgb2hsv` (8-bit H, S, V).
#[inline]
fn rgb2hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return (0, 0, maxc);
    }
    let cr = (maxc - minc) as f32;
    let s = cr / maxc as f32;
    let rc = (maxc - r) as f32 / cr;
    let gc = (maxc - g) as f32 / cr;
    let bc = (maxc - b) as f32 / cr;
    // `2.0 + rc - bc` is evaluated in double in C (2.0 is a double literal), then stored in a
    // float.
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    };
    let h = ((h as f64 / 6.0 + 1.0) % 1.0) as f32; // stored in a C float
    let uh = ((h as f64 * 255.0) as i32).clamp(0, 255) as u8;
    let us = ((s as f64 * 255.0) as i32).clamp(0, 255) as u8;
    (uh, us, maxc)
}

/// Pillow `hsv2rgb`.
#[inline]
fn hsv2rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    if s == 0 {
        return (v, v, v);
    }
    let hf = h as f32 as f64 * 6.0 / 255.0;
    let i = hf.floor() as i32;
    let f = (hf - i as f64) as f32;
    let fs = (s as f32 as f64 / 255.0) as f32;
    let vf = v as f32 as f64;
    let c = |x: f64| x.round().clamp(0.0, 255.0) as u8;
    let p = c(vf * (1.0 - fs as f64));
    let q = c(vf * (1.0 - (fs * f) as f64));
    let t = c(vf * (1.0 - fs as f64 * (1.0 - f as f64)));
    match i % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// torchvision `adjust_hue` on a PIL image (`hue_factor` in [−0.5, 0.5]).
pub fn adjust_hue(px: &mut [u8], hue_factor: f64) {
    // np.int8(hue_factor * 255) truncates toward zero, then wraps as uint8.
    let shift = ((hue_factor * 255.0) as i32 as i8) as u8;
    for p in px.chunks_exact_mut(3) {
        let (h, s, v) = rgb2hsv(p[0], p[1], p[2]);
        let (r, g, b) = hsv2rgb(h.wrapping_add(shift), s, v);
        p[0] = r;
        p[1] = g;
        p[2] = b;
    }
}

/// `Grayscale(num_output_channels=3)`: luma replicated into the three channels.
pub fn to_grayscale(px: &mut [u8]) {
    for p in px.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]);
        p.fill(l);
    }
}

/// `ImageOps.solarize(img, threshold)`: values ≥ threshold become 255 − v.
pub fn solarize(px: &mut [u8], threshold: u8) {
    for v in px.iter_mut() {
        if *v >= threshold {
            *v = 255 - *v;
        }
    }
}

/// `hflip` of an interleaved RGB image.
pub fn hflip(px: &mut [u8], width: usize) {
    for row in px.chunks_exact_mut(3 * width) {
        let (mut a, mut b) = (0, width - 1);
        while a < b {
            for c in 0..3 {
                row.swap(3 * a + c, 3 * b + c);
            }
            a += 1;
            b -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_stays_grey_under_saturation_and_hue() {
        let mut px: Vec<u8> = (0..=255u8).flat_map(|v| [v, v, v]).collect();
        adjust_saturation(&mut px, 1.7);
        adjust_hue(&mut px, 0.37);
        for (k, p) in px.chunks_exact(3).enumerate() {
            assert_eq!(p, [k as u8; 3]);
        }
    }

    #[test]
    fn hsv_round_trip_is_close() {
        // Pillow: (0, 85, 255) -> HSV (155, 255, 255) -> RGB (0, 90, 255).
        assert_eq!(rgb2hsv(0, 85, 255), (155, 255, 255));
        assert_eq!(hsv2rgb(155, 255, 255), (0, 90, 255));
        for r in (0..=255u8).step_by(15) {
            for g in (0..=255u8).step_by(17) {
                for b in (0..=255u8).step_by(51) {
                    let (h, s, v) = rgb2hsv(r, g, b);
                    let (r2, g2, b2) = hsv2rgb(h, s, v);
                    // Pillow's 8-bit hue loses up to 6 levels on this grid (measured).
                    for (x, y) in [(r, r2), (g, g2), (b, b2)] {
                        assert!((x as i32 - y as i32).abs() <= 6, "{r},{g},{b}");
                    }
                }
            }
        }
    }

    #[test]
    fn solarize_and_flip() {
        let mut px = vec![0, 127, 128, 255, 10, 20];
        solarize(&mut px, 128);
        assert_eq!(px, [0, 127, 127, 0, 10, 20]);
        hflip(&mut px, 2);
        assert_eq!(px, [0, 10, 20, 0, 127, 127]);
    }
}
