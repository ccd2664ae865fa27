//! Per-stage timings of the pipeline on one JPEG (best of 10 × 5 runs each), to see where a
//! crop's time goes: `cargo run --release -p protodino-data --example stage_timings -- FILE.jpg`
//! (e.g. one of the photographs `reference/bench_torchvision.py --make-photos` writes).
use protodino_data::blur::GaussianBlur;
use protodino_data::color;
use protodino_data::resample::{Rect, Resampler};
use protodino_data::{Record, RecordKind, dataset::decode_record};

use std::time::Instant;
fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: stage_timings FILE.jpg");
    let bytes = std::fs::read(&path).expect("readable file");
    let rec = Record {
        kind: RecordKind::Encoded,
        bytes,
    };
    let mut img = None;
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        for _ in 0..5 {
            img = Some(decode_record(&rec).expect("decodable image"));
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e3 / 5.0);
    }
    println!("decode {:.3} ms", best);
    let img = img.expect("decoded");
    let mut rs = Resampler::default();
    let mut dst = vec![0u8; 3 * 224 * 224];
    let full = Rect {
        x: 0,
        y: 0,
        w: 224,
        h: 224,
    };
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        for _ in 0..5 {
            rs.resize_crop(
                &img,
                Rect {
                    x: 50,
                    y: 20,
                    w: 330,
                    h: 300,
                },
                224,
                224,
                full,
                &mut dst,
            );
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e3 / 5.0);
    }
    println!("resize 330x300->224 {:.3} ms", best);
    let mut d96 = vec![0u8; 3 * 96 * 96];
    let f96 = Rect {
        x: 0,
        y: 0,
        w: 96,
        h: 96,
    };
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        for _ in 0..5 {
            rs.resize_crop(
                &img,
                Rect {
                    x: 50,
                    y: 20,
                    w: 150,
                    h: 130,
                },
                96,
                96,
                f96,
                &mut d96,
            );
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e3 / 5.0);
    }
    println!("resize 150x130->96 {:.3} ms", best);
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        for _ in 0..5 {
            color::adjust_hue(&mut dst, 0.05);
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e3 / 5.0);
    }
    println!("hue 224 {:.3} ms", best);
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        for _ in 0..5 {
            color::adjust_contrast(&mut dst, 1.1);
            color::adjust_brightness(&mut dst, 0.9);
            color::adjust_saturation(&mut dst, 1.1);
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e3 / 5.0);
    }
    println!("b+c+s 224 {:.3} ms", best);
    let mut bl = GaussianBlur::default();
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        for _ in 0..5 {
            bl.apply(&mut dst, 224, 224, 1.5);
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e3 / 5.0);
    }
    println!("blur 224 s1.5 {:.3} ms", best);
    let mut out = vec![0f32; 3 * 224 * 224];
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        for _ in 0..5 {
            protodino_data::image::normalize_into(&dst, &mut out);
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e3 / 5.0);
    }
    println!("normalize 224 {:.3} ms", best);
}
