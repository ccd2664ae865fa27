//! Statistical tests of the random parameters over 10 000 draws: RandomResizedCrop area and
//! log-ratio distributions (Kolmogorov–Smirnov against the uniform laws torchvision samples
//! from), the centre-crop fallback, and every probability of docs/algorithm.md §1.2.

use protodino_data::augment::{CropSpec, sample_crop_params, sample_rrc};
use protodino_data::rng::CounterRng;

const N: usize = 10_000;

/// KS distance of `xs` to U(lo, hi).
fn ks_uniform(xs: &mut [f64], lo: f64, hi: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len() as f64;
    xs.iter()
        .enumerate()
        .map(|(i, &x)| {
            let f = ((x - lo) / (hi - lo)).clamp(0.0, 1.0);
            (f - i as f64 / n).abs().max((f - (i + 1) as f64 / n).abs())
        })
        .fold(0.0, f64::max)
}

/// |k − np| within 5 standard deviations.
fn assert_rate(k: usize, p: f64, what: &str) {
    let sd = (N as f64 * p * (1.0 - p)).sqrt().max(1e-9);
    let z = (k as f64 - N as f64 * p).abs() / sd;
    assert!(
        z < 5.0 || (p == 0.0 && k == 0) || (p == 1.0 && k == N),
        "{what}: {k}/{N} vs p = {p} (z = {z:.1})"
    );
}

// KS critical value at α = 0.001 for n = 10 000 is 1.95/√n ≈ 0.0195.
const KS_CRIT: f64 = 0.0195;

#[test]
fn rrc_area_and_log_ratio_follow_torchvision_laws() {
    // A huge square image: the first try always fits and rounding is negligible, so the
    // accepted crops show the sampling laws directly.
    let (w, h) = (20_000usize, 20_000usize);
    let scale = [0.05, 0.4];
    let mut area = Vec::with_capacity(N);
    let mut log_ratio = Vec::with_capacity(N);
    for i in 0..N as u64 {
        let mut rng = CounterRng::for_sample(1, 0, i, 0);
        let r = sample_rrc(&mut rng, w, h, scale);
        assert!(r.x + r.w <= w && r.y + r.h <= h);
        area.push((r.w * r.h) as f64 / (w * h) as f64);
        log_ratio.push((r.w as f64 / r.h as f64).ln());
    }
    let d_area = ks_uniform(&mut area, scale[0], scale[1]);
    let (l0, l1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    let d_ratio = ks_uniform(&mut log_ratio, l0, l1);
    assert!(d_area < KS_CRIT, "area KS {d_area}");
    assert!(d_ratio < KS_CRIT, "log-ratio KS {d_ratio}");
    // A plain uniform ratio (a classic mistake) would be rejected by the same test.
    let mut ratio: Vec<f64> = log_ratio.iter().map(|v| v.exp()).collect();
    assert!(ks_uniform(&mut ratio, 0.75, 4.0 / 3.0) > KS_CRIT);
}

#[test]
fn rrc_positions_are_uniform_and_fallback_is_the_centre_crop() {
    // Offsets: for a fixed-size window the left offset is uniform on [0, W − w].
    let mut rel = Vec::with_capacity(N);
    for i in 0..N as u64 {
        let mut rng = CounterRng::for_sample(2, 0, i, 0);
        let r = sample_rrc(&mut rng, 5000, 5000, [0.3, 0.3]);
        rel.push((r.x as f64 + 0.5) / (5000 - r.w + 1) as f64);
    }
    assert!(ks_uniform(&mut rel, 0.0, 1.0) < KS_CRIT + 0.001);
    // 1000 x 10: no try can fit a ratio in [3/4, 4/3] with enough area → centre crop with the
    // ratio clamped to 4/3: w = round(10 · 4/3) = 13, h = 10.
    let mut rng = CounterRng::for_sample(3, 0, 0, 0);
    let r = sample_rrc(&mut rng, 1000, 10, [0.5, 1.0]);
    assert_eq!((r.x, r.y, r.w, r.h), ((1000 - 13) / 2, 0, 13, 10));
    let r = sample_rrc(&mut rng, 10, 1000, [0.5, 1.0]);
    assert_eq!((r.x, r.y, r.w, r.h), (0, (1000 - 13) / 2, 10, 13));
}

#[test]
fn augmentation_probabilities_and_ranges() {
    let specs = [
        CropSpec {
            size: 224,
            scale: [0.25, 1.0],
            blur_prob: 1.0,
            solarize_prob: 0.0,
        },
        CropSpec {
            size: 224,
            scale: [0.25, 1.0],
            blur_prob: 0.1,
            solarize_prob: 0.2,
        },
        CropSpec {
            size: 96,
            scale: [0.05, 0.25],
            blur_prob: 0.5,
            solarize_prob: 0.0,
        },
    ];
    for (v, spec) in specs.iter().enumerate() {
        let (mut flip, mut jitter, mut gray, mut blur, mut sol) = (0, 0, 0, 0, 0);
        let mut first_op = [0usize; 4];
        let (mut b, mut hue, mut sigma) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..N as u64 {
            let mut rng = CounterRng::for_sample(7, 1, i, v as u64);
            let p = sample_crop_params(&mut rng, 500, 375, spec);
            flip += p.flip as usize;
            gray += p.grayscale as usize;
            sol += p.solarize as usize;
            if let Some(j) = p.jitter {
                jitter += 1;
                first_op[j.order[0]] += 1;
                let mut o = j.order;
                o.sort_unstable();
                assert_eq!(o, [0, 1, 2, 3]);
                assert!((0.6..=1.4).contains(&j.brightness) && (0.6..=1.4).contains(&j.contrast));
                assert!((0.8..=1.2).contains(&j.saturation));
                b.push(j.brightness);
                hue.push(j.hue);
            }
            if let Some(s) = p.blur_sigma {
                blur += 1;
                sigma.push(s);
            }
        }
        assert_rate(flip, 0.5, "flip");
        assert_rate(jitter, 0.8, "colour jitter");
        assert_rate(gray, 0.2, "grayscale");
        assert_rate(blur, spec.blur_prob, "blur");
        assert_rate(sol, spec.solarize_prob, "solarize");
        for f in first_op {
            let sd = (jitter as f64 * 0.25 * 0.75).sqrt();
            assert!(
                (f as f64 - jitter as f64 / 4.0).abs() < 5.0 * sd,
                "op order {first_op:?}"
            );
        }
        let kb = ks_uniform(&mut b, 0.6, 1.4);
        let kh = ks_uniform(&mut hue, -0.1, 0.1);
        assert!(kb < 0.03 && kh < 0.03, "jitter factors KS {kb} {kh}");
        if sigma.len() > 500 {
            let ks = ks_uniform(&mut sigma, 0.1, 2.0);
            assert!(
                ks < 2.0 / (sigma.len() as f64).sqrt(),
                "blur radius KS {ks}"
            );
        }
    }
}
