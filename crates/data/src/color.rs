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

use crate::simd::avx2_dispatch;

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

/// Apply `blend(degenerate, v, alpha)` through a 256-entry table (exact: the blend of a
/// fixed degenerate value depends on `v` only).
fn blend_lut(px: &mut [u8], degenerate: u8, alpha: f32) {
    let lut: [u8; 256] = std::array::from_fn(|v| blend(degenerate, v as u8, alpha));
    for v in px.iter_mut() {
        *v = lut[*v as usize];
    }
}

/// `ImageEnhance.Brightness(img).enhance(f)`: blend with black.
pub fn adjust_brightness(px: &mut [u8], factor: f64) {
    if factor == 1.0 {
        return; // Image.blend copies im2 for alpha == 1
    }
    blend_lut(px, 0, factor as f32);
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
    blend_lut(px, mean, factor as f32);
}

/// `ImageEnhance.Color(img).enhance(f)`: blend with the per-pixel luma.
pub fn adjust_saturation(px: &mut [u8], factor: f64) {
    if factor == 1.0 {
        return;
    }
    saturation_rows(px, factor as f32);
}

avx2_dispatch! {
    fn saturation_rows(px: &mut [u8], a: f32) {
        for p in px.chunks_exact_mut(3) {
            let l = luma(p[0], p[1], p[2]);
            p[0] = blend(l, p[0], a);
            p[1] = blend(l, p[1], a);
            p[2] = blend(l, p[2], a);
        }
    }
}

/// `(int)x` of C for a finite `x ≥ 0` (truncation = floor), without a libm call.
#[inline]
fn floor_pos(x: f64) -> i32 {
    x as i32
}

/// C `round(x)` (half away from zero) for finite `x ≥ 0`, exact: `x − trunc(x)` is exactly
/// representable, so comparing it with 0.5 decides like `round` does.
#[inline]
fn round_pos(x: f64) -> i32 {
    let i = x as i32;
    if x - i as f64 >= 0.5 { i + 1 } else { i }
}

/// Exact lookup tables for the HSV round trip: every float division Pillow performs on 8-bit
/// operands is tabulated once (the table entry *is* the IEEE quotient), so the per-pixel work
/// is a few loads, one double division and three roundings.
struct HsvTables {
    /// `quot[cr][a] = a as f32 / cr as f32` (Pillow's `rc`, `gc`, `bc`).
    quot: Vec<f32>,
    /// `sat[maxc][cr] = (int)((double)(cr as f32 / maxc as f32) * 255.0)`.
    sat: Vec<u8>,
    /// `hsv2rgb`: sector `i` and fraction `f` per 8-bit hue.
    sector: [(i32, f32); 256],
    /// `hsv2rgb`: `fs` per 8-bit saturation.
    fs: [f32; 256],
}

fn tables() -> &'static HsvTables {
    static T: std::sync::OnceLock<HsvTables> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut quot = vec![0f32; 256 * 256];
        let mut sat = vec![0u8; 256 * 256];
        for cr in 1..256usize {
            for a in 0..256usize {
                quot[cr * 256 + a] = a as f32 / cr as f32;
            }
        }
        for maxc in 1..256usize {
            for cr in 0..=maxc {
                let s = cr as f32 / maxc as f32;
                sat[maxc * 256 + cr] = floor_pos(s as f64 * 255.0).clamp(0, 255) as u8;
            }
        }
        let sector = std::array::from_fn(|h| {
            let hf = h as f32 as f64 * 6.0 / 255.0;
            let i = floor_pos(hf);
            (i, (hf - i as f64) as f32)
        });
        let fs = std::array::from_fn(|s| (s as f32 as f64 / 255.0) as f32);
        HsvTables {
            quot,
            sat,
            sector,
            fs,
        }
    })
}

/// Pillow `rgb2hsv` (8-bit H, S, V). Same float/double operations as the C code; the
/// rewrites are exact: divisions of 8-bit operands come from [`HsvTables`], `fmod(x, 1.0)`
/// for `x ∈ [0, 2)` is `x` or `x − 1` (Sterbenz), and the quotient the branch does not read
/// is not looked up.
#[inline]
fn rgb2hsv(t: &HsvTables, r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return (0, 0, maxc);
    }
    let cr = (maxc - minc) as usize;
    let row = &t.quot[cr * 256..cr * 256 + 256];
    let q = |x: u8| row[(maxc - x) as usize];
    // `2.0 + rc - bc` is evaluated in double in C (2.0 is a double literal), then stored in a
    // float.
    let h: f32 = if r == maxc {
        q(b) - q(g)
    } else if g == maxc {
        (2.0 + q(r) as f64 - q(b) as f64) as f32
    } else {
        (4.0 + q(g) as f64 - q(r) as f64) as f32
    };
    let x = h as f64 / 6.0 + 1.0;
    let h = (if x >= 1.0 { x - 1.0 } else { x }) as f32; // fmod(x, 1.0), stored in a float
    let uh = floor_pos(h as f64 * 255.0).clamp(0, 255) as u8;
    (uh, t.sat[maxc as usize * 256 + cr], maxc)
}

/// Pillow `hsv2rgb`.
#[inline]
fn hsv2rgb(t: &HsvTables, h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    if s == 0 {
        return (v, v, v);
    }
    let (i, f) = t.sector[h as usize];
    let fs = t.fs[s as usize];
    let vf = v as f32 as f64;
    let c = |x: f64| round_pos(x).clamp(0, 255) as u8;
    let p = c(vf * (1.0 - fs as f64));
    let q = c(vf * (1.0 - (fs * f) as f64));
    let tt = c(vf * (1.0 - fs as f64 * (1.0 - f as f64)));
    match i % 6 {
        0 => (v, tt, p),
        1 => (q, v, p),
        2 => (p, v, tt),
        3 => (p, q, v),
        4 => (tt, p, v),
        _ => (v, p, q),
    }
}

/// torchvision `adjust_hue` on a PIL image (`hue_factor` in [−0.5, 0.5]).
pub fn adjust_hue(px: &mut [u8], hue_factor: f64) {
    // np.int8(hue_factor * 255) truncates toward zero, then wraps as uint8.
    let shift = ((hue_factor * 255.0) as i32 as i8) as u8;
    hue_rows(tables(), px, shift);
}

/// Pixels per block of the vectorisable hue path.
const HUE_LANES: usize = 8;

/// The HSV round trip of [`rgb2hsv`] → shift → [`hsv2rgb`] for one block of pixels, written
/// lane-wise (every branch computed, then selected) so the compiler vectorises it. The
/// operations are the same IEEE operations as the scalar path (the divisions are computed
/// instead of looked up, which gives the same correctly rounded quotients), so the results
/// are identical — checked by the golden tests and `block_hue_equals_scalar_hue`.
#[inline(always)]
fn hue_block(block: &mut [u8], shift: u8) {
    const L: usize = HUE_LANES;
    let mut r = [0i32; L];
    let mut g = [0i32; L];
    let mut b = [0i32; L];
    for (k, p) in block.chunks_exact(3).enumerate() {
        r[k] = p[0] as i32;
        g[k] = p[1] as i32;
        b[k] = p[2] as i32;
    }
    let mut out = [[0u8; 3]; L];
    for k in 0..L {
        let maxc = r[k].max(g[k]).max(b[k]);
        let minc = r[k].min(g[k]).min(b[k]);
        let grey = maxc == minc;
        let cr = (maxc - minc) as f32;
        let s = cr / maxc as f32;
        let rc = (maxc - r[k]) as f32 / cr;
        let gc = (maxc - g[k]) as f32 / cr;
        let bc = (maxc - b[k]) as f32 / cr;
        let h_r = bc - gc;
        let h_g = (2.0 + rc as f64 - bc as f64) as f32;
        let h_b = (4.0 + gc as f64 - rc as f64) as f32;
        let h = if r[k] == maxc {
            h_r
        } else if g[k] == maxc {
            h_g
        } else {
            h_b
        };
        let x = h as f64 / 6.0 + 1.0;
        let hh = (if x >= 1.0 { x - 1.0 } else { x }) as f32;
        let uh = if grey {
            0
        } else {
            ((hh as f64 * 255.0) as i32).clamp(0, 255)
        };
        let us = if grey {
            0
        } else {
            ((s as f64 * 255.0) as i32).clamp(0, 255)
        };
        let h2 = (uh + shift as i32) & 255;
        let v = maxc;
        let hf = h2 as f32 as f64 * 6.0 / 255.0;
        let i = hf as i32;
        let f = (hf - i as f64) as f32;
        let fs = (us as f32 as f64 / 255.0) as f32;
        let vf = v as f32 as f64;
        let p = round_pos(vf * (1.0 - fs as f64)).clamp(0, 255);
        let q = round_pos(vf * (1.0 - (fs * f) as f64)).clamp(0, 255);
        let t = round_pos(vf * (1.0 - fs as f64 * (1.0 - f as f64))).clamp(0, 255);
        let sector = if i >= 6 { i - 6 } else { i };
        let (ro, go, bo) = match sector {
            0 => (v, t, p),
            1 => (q, v, p),
            2 => (p, v, t),
            3 => (p, q, v),
            4 => (t, p, v),
            _ => (v, p, q),
        };
        out[k] = if us == 0 {
            [v as u8; 3]
        } else {
            [ro as u8, go as u8, bo as u8]
        };
    }
    for (p, o) in block.chunks_exact_mut(3).zip(out) {
        p.copy_from_slice(&o);
    }
}

avx2_dispatch! {
    fn hue_rows(t: &HsvTables, px: &mut [u8], shift: u8) {
        let mut blocks = px.chunks_exact_mut(3 * HUE_LANES);
        for block in &mut blocks {
            hue_block(block, shift);
        }
        for p in blocks.into_remainder().chunks_exact_mut(3) {
            let (h, s, v) = rgb2hsv(t, p[0], p[1], p[2]);
            let (r, g, b) = hsv2rgb(t, h.wrapping_add(shift), s, v);
            p[0] = r;
            p[1] = g;
            p[2] = b;
        }
    }
}

/// Whether every pixel of the interleaved RGB buffer has R = G = B.
pub fn is_grey(px: &[u8]) -> bool {
    px.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2])
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
        // The exactness behind apply_photometric's grey fast path: every grey level is a fixed
        // point of saturation, hue and grayscale.
        let grey: Vec<u8> = (0..=255u8).flat_map(|v| [v, v, v]).collect();
        assert!(is_grey(&grey));
        for f in [0.0, 0.6, 1.0, 1.7] {
            let mut px = grey.clone();
            adjust_saturation(&mut px, f);
            assert_eq!(px, grey, "saturation {f}");
        }
        for h in [-0.5, -0.1, 0.0, 0.37, 0.5] {
            let mut px = grey.clone();
            adjust_hue(&mut px, h);
            assert_eq!(px, grey, "hue {h}");
        }
        let mut px = grey.clone();
        to_grayscale(&mut px);
        assert_eq!(px, grey);
        assert!(!is_grey(&[1, 1, 1, 2, 2, 3]));
    }

    #[test]
    fn hsv_round_trip_is_close() {
        // Pillow: (0, 85, 255) -> HSV (155, 255, 255) -> RGB (0, 90, 255).
        let t = tables();
        assert_eq!(rgb2hsv(t, 0, 85, 255), (155, 255, 255));
        assert_eq!(hsv2rgb(t, 155, 255, 255), (0, 90, 255));
        for r in (0..=255u8).step_by(15) {
            for g in (0..=255u8).step_by(17) {
                for b in (0..=255u8).step_by(51) {
                    let (h, s, v) = rgb2hsv(t, r, g, b);
                    let (r2, g2, b2) = hsv2rgb(t, h, s, v);
                    // Pillow's 8-bit hue loses up to 6 levels on this grid (measured).
                    for (x, y) in [(r, r2), (g, g2), (b, b2)] {
                        assert!((x as i32 - y as i32).abs() <= 6, "{r},{g},{b}");
                    }
                }
            }
        }
    }

    #[test]
    fn block_hue_equals_scalar_hue() {
        // Every (r, g, b) on a 7-step grid plus all greys, for several shifts.
        let mut px: Vec<u8> = Vec::new();
        for r in (0..=255u16).step_by(7) {
            for g in (0..=255u16).step_by(7) {
                for b in (0..=255u16).step_by(7) {
                    px.extend_from_slice(&[r as u8, g as u8, b as u8]);
                }
            }
        }
        px.extend((0..=255u8).flat_map(|v| [v, v, v]));
        let t = tables();
        for shift in [0u8, 1, 9, 128, 230, 255] {
            let mut a = px.clone();
            for block in a.chunks_exact_mut(3 * HUE_LANES) {
                hue_block(block, shift);
            }
            let n = a.len() / (3 * HUE_LANES) * (3 * HUE_LANES);
            for (k, p) in px[..n].chunks_exact(3).enumerate() {
                let (h, s, v) = rgb2hsv(t, p[0], p[1], p[2]);
                let (r, g, b) = hsv2rgb(t, h.wrapping_add(shift), s, v);
                assert_eq!(&a[3 * k..3 * k + 3], [r, g, b], "pixel {p:?} shift {shift}");
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
