//! Data set formats and corrupt-record handling with real files: ImageFolder, text file lists,
//! iNaturalist JSON, shards (conversion, checksum, truncation), and the loader reporting every
//! skipped record.

mod support;

use std::fs;
use std::sync::Arc;

use protodino_config::DatasetFormat;
use protodino_data::dataset::Dataset;
use protodino_data::folder::FileDataset;
use protodino_data::shard::{self, ShardDataset};
use protodino_data::{Loader, open_dataset};

#[test]
fn image_folder_indexes_sorted_classes_and_reports_non_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    support::write_image_folder(dir.path(), 3, 4);
    fs::write(dir.path().join("class1/README.txt"), "notes").expect("write");
    let ds = FileDataset::image_folder(dir.path()).expect("index");
    assert_eq!(ds.len(), 12);
    assert_eq!(ds.classes(), ["class0", "class1", "class2"]);
    assert_eq!(ds.label(0), 0);
    assert_eq!(ds.label(11), 2);
    assert_eq!(ds.ignored_entries().len(), 1);
    assert!(ds.ignored_entries()[0].ends_with("README.txt"));
    let img = ds.load(1).expect("jpeg decodes");
    assert_eq!((img.width, img.height), (47, 30));
}

#[test]
fn text_and_inat_file_lists() {
    let dir = tempfile::tempdir().expect("tempdir");
    support::write_image_folder(dir.path(), 2, 2);
    fs::write(
        dir.path().join("train.txt"),
        "# ImageNet-style list\nclass0/img000.png 0\nclass1/img001.jpg 1\n\nclass1/img000.png\n../escape.png 3\n",
    )
    .expect("write");
    let ds = FileDataset::file_list(&dir.path().join("train.txt")).expect("list");
    assert_eq!(ds.len(), 3);
    assert_eq!([ds.label(0), ds.label(1), ds.label(2)], [0, 1, -1]);
    assert_eq!(
        ds.ignored_entries().len(),
        1,
        "the ../ path is refused and reported"
    );
    ds.load(1).expect("decodes");

    let json = r#"{"images": [{"id": 10, "file_name": "class1/img001.jpg"},
                              {"id": 11, "file_name": "class0/img000.png"}],
                   "annotations": [{"image_id": 10, "category_id": 5},
                                   {"image_id": 11, "category_id": 2}],
                   "categories": [{"id": 2, "name": "Aves"}, {"id": 5, "name": "Plantae"}]}"#;
    fs::write(dir.path().join("train2018.json"), json).expect("write");
    let inat = open_dataset(DatasetFormat::FileList, &dir.path().join("train2018.json"))
        .expect("inat json");
    assert_eq!(inat.len(), 2);
    assert_eq!([inat.label(0), inat.label(1)], [5, 2]);
    assert_eq!(inat.classes()[5], "Plantae");
    inat.load(0).expect("decodes");
}

#[test]
fn shards_round_trip_and_detect_corruption_and_truncation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src_dir = dir.path().join("folder");
    support::write_image_folder(&src_dir, 2, 5);
    let src = FileDataset::image_folder(&src_dir).expect("index");
    let out = dir.path().join("shards");
    // Tiny shard size: several shard files.
    let (meta, skipped) = shard::convert(&src, &out, 4096).expect("convert");
    assert!(skipped.is_empty());
    assert_eq!(meta.num_records, 10);
    assert!(
        meta.shards.len() > 1,
        "rolled over into {} shards",
        meta.shards.len()
    );
    let ds = ShardDataset::open(&out).expect("open");
    for id in 0..10 {
        assert_eq!(ds.label(id), src.label(id));
        assert_eq!(
            ds.load(id).expect("decodes"),
            src.load(id).expect("decodes")
        );
    }
    // Flip one payload byte of record 3: checksum error, other records unaffected.
    let e = *ds.entry(3).expect("entry");
    let path = out.join(&meta.shards[e.shard as usize]);
    let mut bytes = fs::read(&path).expect("read shard");
    bytes[e.offset as usize + shard::HEADER_LEN + 20] ^= 0x5a;
    fs::write(&path, &bytes).expect("write shard");
    let ds = ShardDataset::open(&out).expect("open");
    let err = ds.load(3).expect_err("corrupt record");
    assert!(err.to_string().contains("checksum"), "{err}");
    ds.load(2).expect("neighbour intact");
    // Truncate the last shard in the middle of its last record.
    let last = ds.entry(9).expect("entry");
    let lpath = out.join(&meta.shards[last.shard as usize]);
    let len = fs::metadata(&lpath).expect("meta").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&lpath)
        .and_then(|f| f.set_len(len - 10))
        .expect("truncate");
    let ds = ShardDataset::open(&out).expect("open");
    let err = ds.load(9).expect_err("truncated record");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn loader_skips_counts_and_reports_corrupt_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    support::write_image_folder(dir.path(), 2, 4);
    // A truncated PNG, a text file named .jpg, an empty file.
    let good = fs::read(dir.path().join("class0/img000.png")).expect("read");
    fs::write(dir.path().join("class0/trunc.png"), &good[..good.len() / 2]).expect("write");
    fs::write(dir.path().join("class1/fake.jpg"), "this is not a JPEG").expect("write");
    fs::write(dir.path().join("class1/empty.png"), b"").expect("write");
    let ds = Arc::new(FileDataset::image_folder(dir.path()).expect("index"));
    assert_eq!(ds.len(), 11);
    let bad: Vec<u64> = (0..11).filter(|&i| ds.load(i).is_err()).collect();
    assert_eq!(bad.len(), 3);
    let loader = Loader::new(
        ds.clone(),
        &support::small_crops(),
        &support::data_config(2),
        0,
    )
    .expect("loader");
    let ids: Vec<u64> = (0..11).collect();
    let batch = loader.make_batch(0, &ids);
    assert_eq!(batch.batch_size, 8);
    assert_eq!(batch.skipped.len(), 3);
    let skipped: Vec<u64> = batch.skipped.iter().map(|s| s.sample_id).collect();
    assert_eq!(skipped, bad);
    assert!(batch.skipped.iter().all(|s| !s.reason.is_empty()));
    assert_eq!(batch.global_crops.len(), 2 * 8 * 3 * 32 * 32);
    assert_eq!(batch.local_crops.len(), 4 * 8 * 3 * 16 * 16);
    let kept: Vec<i64> = ids
        .iter()
        .filter(|i| !bad.contains(i))
        .map(|&i| i as i64)
        .collect();
    assert_eq!(batch.sample_ids, kept);
    // The compacted batch equals a batch made of the good ids only.
    let good_ids: Vec<u64> = kept.iter().map(|&i| i as u64).collect();
    let clean = loader.make_batch(0, &good_ids);
    assert_eq!(clean.global_crops, batch.global_crops);
    assert_eq!(clean.local_crops, batch.local_crops);
    assert!(batch.global_crops.iter().all(|v| v.is_finite()));
}
