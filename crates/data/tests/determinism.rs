//! Determinism: a sample's crops depend only on (seed, epoch, sample id) — not on the thread
//! count, the batch it is in, its position, the prefetching producer, or the process.

mod support;

use std::process::Command;
use std::sync::Arc;

use protodino_config::{CropsConfig, DataConfig, TrainConfig};
use protodino_data::Dataset;
use protodino_data::folder::FileDataset;
use protodino_data::{Loader, MultiCropBatch, epoch_permutation};

fn crop_of(b: &MultiCropBatch, n: usize, v: usize) -> &[f32] {
    if v < 2 {
        let s = 3 * b.global_size * b.global_size;
        &b.global_crops[(v * b.batch_size + n) * s..(v * b.batch_size + n + 1) * s]
    } else {
        let s = 3 * b.local_size * b.local_size;
        let v = v - 2;
        &b.local_crops[(v * b.batch_size + n) * s..(v * b.batch_size + n + 1) * s]
    }
}

fn folder(n_per_class: usize) -> (tempfile::TempDir, Arc<FileDataset>) {
    let dir = tempfile::tempdir().expect("tempdir");
    support::write_image_folder(dir.path(), 2, n_per_class);
    let ds = Arc::new(FileDataset::image_folder(dir.path()).expect("index"));
    (dir, ds)
}

#[test]
fn same_crops_for_any_thread_count_batch_and_position() {
    let (_dir, ds) = folder(5);
    let crops = support::small_crops();
    let l1 = Loader::new(ds.clone(), &crops, &support::data_config(1), 42).expect("loader");
    let l3 = Loader::new(ds.clone(), &crops, &support::data_config(3), 42).expect("loader");
    let a = l1.make_batch(4, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let b = l3.make_batch(4, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(a, b);
    // Sample 7 alone, and at another position of another batch.
    let c = l3.make_batch(4, &[7]);
    let d = l1.make_batch(4, &[9, 7, 2]);
    for v in 0..6 {
        assert_eq!(crop_of(&a, 7, v), crop_of(&c, 0, v));
        assert_eq!(crop_of(&a, 7, v), crop_of(&d, 1, v));
    }
    // Another epoch or seed changes the crops.
    let e = l1.make_batch(5, &[7]);
    assert_ne!(crop_of(&c, 0, 0), crop_of(&e, 0, 0));
    let l_other = Loader::new(ds, &crops, &support::data_config(1), 43).expect("loader");
    assert_ne!(
        crop_of(&c, 0, 0),
        crop_of(&l_other.make_batch(4, &[7]), 0, 0)
    );
    // Distinct crops of one sample differ from each other.
    assert_ne!(crop_of(&a, 7, 2), crop_of(&a, 7, 3));
}

#[test]
fn prefetching_epoch_stream_yields_the_same_batches_in_order() {
    let (_dir, ds) = folder(6);
    let crops = support::small_crops();
    let loader = Loader::new(ds.clone(), &crops, &support::data_config(2), 5).expect("loader");
    let perm = epoch_permutation(5, 2, ds.len() as u64);
    let steps: Vec<Vec<u64>> = perm.chunks(4).map(<[u64]>::to_vec).collect();
    let mut stream = loader.epoch(2, steps.clone());
    assert!(stream.is_running());
    let mut n = 0;
    while let Some(batch) = stream.next() {
        let want = loader.make_batch(2, &steps[n]);
        assert_eq!(batch, want, "step {n}");
        stream.recycle(batch);
        n += 1;
    }
    assert_eq!(n, steps.len());
    // Dropping a stream early stops its producer (no hang).
    let mut early = loader.epoch(3, steps);
    assert!(early.next().is_some());
    drop(early);
}

/// The same digest the `protodino-data digest` command prints.
fn digest(b: &MultiCropBatch) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in b.global_crops.iter().chain(&b.local_crops) {
        for byte in v.to_bits().to_le_bytes() {
            h ^= byte as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x} {} {}", b.batch_size, b.skipped.len())
}

#[test]
fn separate_processes_produce_identical_crops() {
    let (dir, ds) = folder(4);
    let cfg = TrainConfig::defaults().expect("defaults");
    let crops = CropsConfig {
        global_crop_size: 32,
        local_crop_size: 16,
        local_crops_number: 3,
        ..cfg.crops
    };
    let data = DataConfig {
        num_threads: 2,
        ..cfg.data
    };
    let loader = Loader::new(ds, &crops, &data, 11).expect("loader");
    let want = digest(&loader.make_batch(3, &[6, 0, 5, 2]));
    for threads in ["1", "3"] {
        let out = Command::new(env!("CARGO_BIN_EXE_protodino-data"))
            .args(["digest", "image_folder"])
            .arg(dir.path())
            .args(["11", "3", threads, "6,0,5,2"])
            .output()
            .expect("run protodino-data");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want,
            "threads {threads}"
        );
    }
}
