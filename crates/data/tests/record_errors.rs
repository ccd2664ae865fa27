//! Every error about one record names where the record is stored: the image file of a folder
//! or a file list, the shard file plus the record's index and offset for shards, through
//! `data.limit` and subsets too; the loader's skipped-record reasons and `protodino-data verify`
//! carry the same names. Corrupt records are still skipped and counted.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use protodino_data::dataset::{Dataset, Limited, Location, RecordError, Subset};
use protodino_data::folder::FileDataset;
use protodino_data::idx::read_idx;
use protodino_data::shard::{self, ShardDataset};
use protodino_data::{Loader, SharedDataset};

/// A JPEG start-of-image and APP0 marker followed by bytes that are no JPEG.
const BROKEN_JPEG: &[u8] = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00garbage that is not a JPEG stream";

/// An ImageFolder of 2 classes × 3 images plus a broken JPEG (`class0/broken.jpg`) and a PNG cut
/// in half (`class1/cut.png`). Returns the data set and the ids of the two bad files.
fn folder_with_corrupt_images(root: &Path) -> (FileDataset, u64, u64) {
    support::write_image_folder(root, 2, 3);
    fs::write(root.join("class0/broken.jpg"), BROKEN_JPEG).expect("write");
    let png = fs::read(root.join("class1/img000.png")).expect("read");
    fs::write(root.join("class1/cut.png"), &png[..png.len() / 2]).expect("write");
    let ds = FileDataset::image_folder(root).expect("index");
    let id_of = |name: &str| {
        (0..ds.len() as u64)
            .find(|&i| ds.path(i).is_some_and(|p| p.ends_with(name)))
            .unwrap_or_else(|| panic!("{name} not indexed"))
    };
    let (jpeg, png) = (id_of("class0/broken.jpg"), id_of("class1/cut.png"));
    (ds, jpeg, png)
}

#[test]
fn a_corrupt_image_in_a_folder_names_its_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ds, jpeg, png) = folder_with_corrupt_images(dir.path());
    for (id, name) in [(jpeg, "class0/broken.jpg"), (png, "class1/cut.png")] {
        let err = ds.load(id).expect_err("corrupt image");
        let file = dir.path().join(name);
        assert!(matches!(err, RecordError::Decode { .. }), "{err:?}");
        assert_eq!(err.location(), Some(&Location::File(file.clone())));
        let text = err.to_string();
        assert!(
            text.starts_with(&file.display().to_string()),
            "the message names {}: {text}",
            file.display()
        );
        assert!(text.contains("not a decodable image"), "{text}");
    }
    // The neighbours decode.
    let good = (0..ds.len() as u64).filter(|&i| ds.load(i).is_ok()).count();
    assert_eq!(good, ds.len() - 2);
}

#[test]
fn a_missing_file_of_a_list_names_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    support::write_image_folder(dir.path(), 1, 1);
    fs::write(
        dir.path().join("list.txt"),
        "class0/img000.png 0\nclass0/gone.png 0\n",
    )
    .expect("write");
    let ds = FileDataset::file_list(&dir.path().join("list.txt")).expect("list");
    let err = ds.load(1).expect_err("missing file");
    let file = dir.path().join("class0/gone.png");
    assert!(matches!(err, RecordError::Io { .. }), "{err:?}");
    assert_eq!(
        err.location().and_then(Location::file),
        Some(file.as_path())
    );
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
}

#[test]
fn limited_and_subset_name_the_inner_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ds, jpeg, _) = folder_with_corrupt_images(dir.path());
    let n = ds.len();
    let inner: SharedDataset = Arc::new(ds);
    let file = dir.path().join("class0/broken.jpg");
    // Every record kept: new ids are the inner ids.
    let limited = Limited::new(inner.clone(), n);
    let err = limited.load(jpeg).expect_err("corrupt image");
    assert_eq!(err.location(), Some(&Location::File(file.clone())), "{err}");
    // New id 0 of the subset is the broken file.
    let subset = Subset::new(inner, vec![jpeg]);
    let err = subset.load(0).expect_err("corrupt image");
    assert_eq!(err.location(), Some(&Location::File(file)), "{err}");
}

#[test]
fn the_loader_skips_counts_and_names_corrupt_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ds, jpeg, png) = folder_with_corrupt_images(dir.path());
    let ds = Arc::new(ds);
    let loader = Loader::new(
        ds.clone(),
        &support::small_crops(),
        &support::data_config(2),
        0,
    )
    .expect("loader");
    let ids: Vec<u64> = (0..ds.len() as u64).collect();
    let batch = loader.make_batch(0, &ids);
    assert_eq!(batch.batch_size, ds.len() - 2);
    let mut skipped: Vec<(u64, &str)> = batch
        .skipped
        .iter()
        .map(|s| (s.sample_id, s.reason.as_str()))
        .collect();
    skipped.sort();
    let mut want = vec![(jpeg, "broken.jpg"), (png, "cut.png")];
    want.sort();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    for ((id, reason), (want_id, name)) in skipped.iter().zip(&want) {
        assert_eq!(id, want_id);
        assert!(reason.contains(name), "{reason}");
    }
}

#[test]
fn shard_errors_name_the_shard_file_and_the_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src_dir = dir.path().join("folder");
    support::write_image_folder(&src_dir, 2, 4);
    let src = FileDataset::image_folder(&src_dir).expect("index");
    let out = dir.path().join("shards");
    // Small shards: the records spread over several files.
    let (meta, _) = shard::convert(&src, &out, 4096).expect("convert");
    assert!(meta.shards.len() > 1);
    let ds = ShardDataset::open(&out).expect("open");
    let e = *ds.entry(5).expect("entry");
    let shard_file = out.join(&meta.shards[e.shard as usize]);
    let mut bytes = fs::read(&shard_file).expect("read shard");
    bytes[e.offset as usize + shard::HEADER_LEN + 10] ^= 0x33;
    fs::write(&shard_file, &bytes).expect("write shard");
    let ds = ShardDataset::open(&out).expect("open");
    let err = ds.load(5).expect_err("corrupt record");
    assert!(matches!(err, RecordError::Checksum { .. }), "{err:?}");
    assert_eq!(
        err.location(),
        Some(&Location::Packed {
            file: shard_file.clone(),
            record: 5,
            offset: e.offset,
        })
    );
    let text = err.to_string();
    assert!(
        text.contains(&shard_file.display().to_string()) && text.contains("record 5"),
        "{text}"
    );
    // Converting the corrupt shards skips the record, and the reason names it too.
    let (_, skipped) = shard::convert(&ds, &dir.path().join("again"), 1 << 20).expect("convert");
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].reason.contains("record 5"), "{:?}", skipped[0]);
}

#[test]
fn a_malformed_idx_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("train-images-idx3-ubyte");
    fs::write(&path, b"\x00\x00\x08\x03\x00\x00\x00\x02").expect("write");
    let err = read_idx(&path).expect_err("truncated header");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn verify_lists_each_bad_file_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ds, _, _) = folder_with_corrupt_images(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_protodino-data"))
        .args(["verify", "image_folder"])
        .arg(dir.path())
        .output()
        .expect("run protodino-data");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    for name in ["class0/broken.jpg", "class1/cut.png"] {
        let file = dir.path().join(name).display().to_string();
        assert!(
            stderr.lines().any(|l| l.contains(&file)),
            "no line names {file}:\n{stderr}"
        );
    }
    assert!(
        stdout.contains(&format!("{} decodable, 2 bad", ds.len() - 2)),
        "{stdout}"
    );
}
