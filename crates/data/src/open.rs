//! Opening the data sets a configuration names, and where `cargo xtask data` puts the
//! provisioned ones under the data root.
//!
//! Empty paths mean "the provisioned default" (Fashion-MNIST shards): `data.train` empty →
//! `<data_root>/fashion-mnist/train`, whatever `data.format` says (the provisioned set is
//! always in the shard format). For k-NN evaluation, when `eval_train` and `eval_test` are
//! both empty *and* training uses the default set, the Fashion-MNIST train/test shards are used
//! (their labels were kept for exactly this); with a user training set, empty means no
//! evaluation, as the config documents.
//!
//! A relative path that does not exist relative to the working directory is looked up under the
//! data root, so configurations can name provisioned sets portably (e.g.
//! `data.train = "fashion-mnist/train-lt100"`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use protodino_config::{DataConfig, DatasetFormat};

use crate::dataset::{Limited, SharedDataset};
use crate::error::DataError;
use crate::folder::FileDataset;
use crate::shard::ShardDataset;

/// Shard directory of the provisioned Fashion-MNIST training split (60 000 images).
pub const FASHION_MNIST_TRAIN: &str = "fashion-mnist/train";
/// Shard directory of the provisioned Fashion-MNIST test split (10 000 images).
pub const FASHION_MNIST_TEST: &str = "fashion-mnist/test";
/// Shard directory of the long-tailed training variant (imbalance ratio 100).
pub const FASHION_MNIST_TRAIN_LT100: &str = "fashion-mnist/train-lt100";

/// Open one data set of the given format.
pub fn open_dataset(format: DatasetFormat, path: &Path) -> Result<SharedDataset, DataError> {
    Ok(match format {
        DatasetFormat::ImageFolder => Arc::new(FileDataset::image_folder(path)?),
        DatasetFormat::FileList => Arc::new(FileDataset::file_list(path)?),
        DatasetFormat::Shards => Arc::new(ShardDataset::open(path)?),
    })
}

/// A configured path: as given when absolute or present relative to the working directory,
/// else under the data root.
pub fn resolve_data_path(path: &str, data_root: &Path) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() || p.exists() {
        p.to_path_buf()
    } else {
        data_root.join(p)
    }
}

/// The training set of a configuration (with `data.limit` applied).
pub fn open_train(cfg: &DataConfig, data_root: &Path) -> Result<SharedDataset, DataError> {
    if cfg.limit < 0 {
        return Err(DataError::Config(format!("data.limit = {} < 0", cfg.limit)));
    }
    let ds = if cfg.train.is_empty() {
        open_dataset(DatasetFormat::Shards, &data_root.join(FASHION_MNIST_TRAIN))?
    } else {
        open_dataset(cfg.format, &resolve_data_path(&cfg.train, data_root))?
    };
    Ok(Arc::new(Limited::new(ds, cfg.limit as usize)))
}

/// The labelled k-NN evaluation sets (train, test), if any.
pub fn open_eval(
    cfg: &DataConfig,
    data_root: &Path,
) -> Result<Option<(SharedDataset, SharedDataset)>, DataError> {
    match (cfg.eval_train.is_empty(), cfg.eval_test.is_empty()) {
        (true, true) if cfg.train.is_empty() => {
            let p = |s: &str| -> PathBuf { data_root.join(s) };
            Ok(Some((
                open_dataset(DatasetFormat::Shards, &p(FASHION_MNIST_TRAIN))?,
                open_dataset(DatasetFormat::Shards, &p(FASHION_MNIST_TEST))?,
            )))
        }
        (true, true) => Ok(None),
        (false, false) => Ok(Some((
            open_dataset(cfg.format, &resolve_data_path(&cfg.eval_train, data_root))?,
            open_dataset(cfg.format, &resolve_data_path(&cfg.eval_test, data_root))?,
        ))),
        _ => Err(DataError::Config(
            "data.eval_train and data.eval_test must be both set or both empty".into(),
        )),
    }
}
