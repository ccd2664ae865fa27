//! Test helpers of the training modules: a tiny model configuration that builds in milliseconds
//! and a small in-memory image set, so unit tests can run real steps without the provisioned
//! data.

use std::sync::Arc;

use protodino_config::TrainConfig;
use protodino_data::dataset::raw_record;
use protodino_data::{Dataset, Record, RecordError, SharedDataset};

/// A one-block ViT on 16 px crops, K = 16, global crops only, one data thread.
pub fn tiny_config() -> TrainConfig {
    TrainConfig::from_toml_str(
        r#"
[model]
arch = "vit_tiny"
patch_size = 4
img_size = 16
depth = 1
drop_path_rate = 0.0
[head]
out_dim = 16
hidden_dim = 16
bottleneck_dim = 8
[crops]
global_crop_size = 16
local_crops_number = 0
[data]
num_threads = 1
eval_resize = 16
eval_crop_size = 16
[train]
batch_size_per_worker = 4
threads = 1
"#,
    )
    .expect("tiny configuration")
}

/// `n` grey 20×20 images of deterministic noise.
pub struct NoiseImages(pub usize);

impl Dataset for NoiseImages {
    fn len(&self) -> usize {
        self.0
    }

    fn label(&self, id: u64) -> i64 {
        (id % 2) as i64
    }

    fn classes(&self) -> &[String] {
        &[]
    }

    fn read_record(&self, id: u64) -> Result<Record, RecordError> {
        if id as usize >= self.0 {
            return Err(RecordError::OutOfRange(id));
        }
        let pixels: Vec<u8> = (0..400u64)
            .map(|i| ((i * 31 + id * 17) % 251) as u8)
            .collect();
        Ok(raw_record(20, 20, 1, &pixels))
    }
}

pub fn noise_images(n: usize) -> SharedDataset {
    Arc::new(NoiseImages(n))
}
