//! Shared helpers of the integration tests: real image files and shard sets in temporary
//! directories.

#![allow(dead_code)]

use std::path::Path;

use protodino_config::{CropsConfig, DataConfig, TrainConfig};

/// A deterministic colour test image (smooth pattern + hashed noise), `w × h` RGB.
pub fn pattern(w: u32, h: u32, salt: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let n = (x.wrapping_mul(73_856_093)
            ^ y.wrapping_mul(19_349_663)
            ^ salt.wrapping_mul(83_492_791))
            % 61;
        image::Rgb([
            ((x * 255 / w.max(1)) as u8).wrapping_add(n as u8),
            ((y * 255 / h.max(1)) as u8).wrapping_add(salt as u8),
            (((x + y + salt) * 7) % 256) as u8,
        ])
    })
}

/// Write an ImageFolder tree with `per_class` PNG/JPEG files in each of `classes` classes.
pub fn write_image_folder(root: &Path, classes: usize, per_class: usize) {
    for c in 0..classes {
        let dir = root.join(format!("class{c}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for i in 0..per_class {
            let img = pattern(40 + 7 * i as u32, 30 + 5 * c as u32, (c * 100 + i) as u32);
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            img.save(dir.join(format!("img{i:03}.{ext}")))
                .expect("write image");
        }
    }
}

/// Small crops for fast tests.
pub fn small_crops() -> CropsConfig {
    CropsConfig {
        global_crop_size: 32,
        local_crop_size: 16,
        local_crops_number: 4,
        ..TrainConfig::defaults().expect("defaults").crops
    }
}

pub fn data_config(threads: i64) -> DataConfig {
    DataConfig {
        num_threads: threads,
        prefetch_batches: 2,
        ..TrainConfig::defaults().expect("defaults").data
    }
}
