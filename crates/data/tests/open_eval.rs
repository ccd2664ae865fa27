//! Opening what a `DataConfig` names (provisioned default, limit, eval sets) and the
//! evaluation batch layout.

mod support;

use std::sync::Arc;

use protodino_config::{DataConfig, DatasetFormat, TrainConfig};
use protodino_data::dataset::raw_record;
use protodino_data::folder::FileDataset;
use protodino_data::open::{FASHION_MNIST_TEST, FASHION_MNIST_TRAIN};
use protodino_data::shard::ShardWriter;
use protodino_data::{Dataset, Loader, open_eval, open_train};

/// A miniature provisioned data root: grey 28x28 shards for train and test.
fn data_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    for (split, n) in [(FASHION_MNIST_TRAIN, 30usize), (FASHION_MNIST_TEST, 10)] {
        let mut w = ShardWriter::create(&root.path().join(split), 1 << 20).expect("writer");
        for i in 0..n {
            let px: Vec<u8> = (0..28 * 28)
                .map(|k| ((k * 7 + i * 13) % 256) as u8)
                .collect();
            w.push(&raw_record(28, 28, 1, &px), (i % 10) as i64)
                .expect("push");
        }
        w.finish((0..10).map(|c| c.to_string()).collect())
            .expect("finish");
    }
    root
}

#[test]
fn empty_paths_mean_the_provisioned_fashion_mnist_and_limit_applies() {
    let root = data_root();
    let cfg = DataConfig {
        limit: 12,
        ..TrainConfig::defaults().expect("defaults").data
    };
    let train = open_train(&cfg, root.path()).expect("default train set");
    assert_eq!(train.len(), 12);
    assert!(train.load(11).is_ok());
    assert!(
        train.load(12).is_err(),
        "ids past the limit are out of range"
    );
    // Evenly spaced: new id i is inner id 30·i/12, so labels (i % 10 inside) follow.
    let want: Vec<i64> = (0..12).map(|i| ((i * 30 / 12) % 10) as i64).collect();
    assert_eq!((0..12).map(|i| train.label(i)).collect::<Vec<_>>(), want);
    let (etrain, etest) = open_eval(&cfg, root.path())
        .expect("eval sets")
        .expect("default eval sets");
    assert_eq!((etrain.len(), etest.len()), (30, 10));
    assert_eq!(etest.label(3), 3);
    // A user training set without eval paths: no evaluation; half-set paths are an error.
    let user = DataConfig {
        train: "somewhere".into(),
        format: DatasetFormat::Shards,
        ..cfg.clone()
    };
    assert!(open_eval(&user, root.path()).expect("ok").is_none());
    let half = DataConfig {
        eval_train: "x".into(),
        ..cfg
    };
    assert!(open_eval(&half, root.path()).is_err());
}

#[test]
fn relative_paths_missing_here_resolve_under_the_data_root() {
    let root = data_root();
    let cfg = DataConfig {
        format: DatasetFormat::Shards,
        train: FASHION_MNIST_TEST.into(),
        eval_train: FASHION_MNIST_TEST.into(),
        eval_test: FASHION_MNIST_TRAIN.into(),
        ..TrainConfig::defaults().expect("defaults").data
    };
    assert_eq!(open_train(&cfg, root.path()).expect("resolved").len(), 10);
    let (a, b) = open_eval(&cfg, root.path()).expect("ok").expect("sets");
    assert_eq!((a.len(), b.len()), (10, 30));
    // Absolute paths are taken as they are.
    let abs = root.path().join(FASHION_MNIST_TRAIN);
    assert_eq!(
        protodino_data::resolve_data_path(abs.to_str().unwrap(), std::path::Path::new("/nope")),
        abs
    );
}

#[test]
fn eval_batch_is_contiguous_normalised_and_reports_skips() {
    let dir = tempfile::tempdir().expect("tempdir");
    support::write_image_folder(dir.path(), 2, 3);
    std::fs::write(dir.path().join("class1/broken.png"), b"\x89PNG broken").expect("write");
    let ds = Arc::new(FileDataset::image_folder(dir.path()).expect("index"));
    let data = DataConfig {
        eval_resize: 40,
        eval_crop_size: 32,
        ..support::data_config(2)
    };
    let loader = Loader::new(ds.clone(), &support::small_crops(), &data, 0).expect("loader");
    let ids: Vec<u64> = (0..ds.len() as u64).collect();
    let b = loader.eval_batch(&ids);
    assert_eq!(b.size, 32);
    assert_eq!(b.skipped.len(), 1);
    assert_eq!(b.sample_ids.len(), 6);
    assert_eq!(b.images.len(), 6 * 3 * 32 * 32);
    assert_eq!(b.labels, [0, 0, 0, 1, 1, 1]);
    // Deterministic (no randomness) and equal per image to a batch of that image alone.
    let one = loader.eval_batch(&[b.sample_ids[4] as u64]);
    assert_eq!(&b.images[4 * 3072..5 * 3072], &one.images[..]);
    let other = loader.eval_batch_of(&*ds, &ids);
    assert_eq!(other, b);
    // Normalised: values within the ImageNet-normalised range of [0, 1].
    assert!(b.images.iter().all(|v| (-2.2..=2.7).contains(v)));
}
