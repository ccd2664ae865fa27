//! A set of frozen features with two views per sample, and its safetensors cache.
//!
//! Both feature sources end here: `views[v]` is `[N, D]` f32 on the CPU (row `i` of each view
//! describes sample `i`), `labels` the class of each sample (−1 where unknown). The two views
//! play DINO's two global crops: the teacher sees both, the student sees both, and each view is
//! matched against the other.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Where a feature set came from and what it holds (recorded in the experiment's JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureInfo {
    /// `"synthetic"` or `"fashion-mnist"`.
    pub source: String,
    pub samples: i64,
    pub dim: i64,
    /// Distinct labels (the true number of clusters for synthetic data; classes for real data).
    pub classes: i64,
    /// Samples per label, label 0 first.
    pub class_counts: Vec<i64>,
    /// How the features were made (generator parameters, encoder and checkpoint).
    pub details: serde_json::Value,
}

/// Two views of N frozen feature vectors.
#[derive(Debug)]
pub struct FeatureSet {
    pub info: FeatureInfo,
    /// `[view 0, view 1]`, each `[N, D]` f32 on the CPU.
    pub views: [Tensor; 2],
    pub labels: Vec<i64>,
}

/// Name of the metadata tensor (the [`FeatureInfo`] as UTF-8 JSON bytes) in a cache file.
const INFO_TENSOR: &str = "info_json";

impl FeatureSet {
    /// Checks shapes and builds the set; `class_counts` and `classes` are derived from labels.
    pub fn new(
        source: &str,
        views: [Tensor; 2],
        labels: Vec<i64>,
        details: serde_json::Value,
    ) -> Result<Self> {
        let size = views[0].size();
        ensure!(
            size.len() == 2 && size[0] >= 1 && size[1] >= 1,
            "feature views must be [N, D], found {size:?}"
        );
        ensure!(
            views[1].size() == size,
            "the two views differ in shape: {size:?} and {:?}",
            views[1].size()
        );
        ensure!(
            labels.len() as i64 == size[0],
            "{} labels for {} samples",
            labels.len(),
            size[0]
        );
        let max = labels.iter().copied().max().unwrap_or(-1);
        let mut class_counts = vec![0i64; (max + 1).max(0) as usize];
        for &l in labels.iter().filter(|&&l| l >= 0) {
            class_counts[l as usize] += 1;
        }
        let views = views.map(|v| v.to_device(tch::Device::Cpu).to_kind(Kind::Float));
        Ok(FeatureSet {
            info: FeatureInfo {
                source: source.to_string(),
                samples: size[0],
                dim: size[1],
                classes: class_counts.iter().filter(|&&c| c > 0).count() as i64,
                class_counts,
                details,
            },
            views,
            labels,
        })
    }

    pub fn len(&self) -> i64 {
        self.info.samples
    }

    pub fn is_empty(&self) -> bool {
        self.info.samples == 0
    }

    pub fn dim(&self) -> i64 {
        self.info.dim
    }

    /// The set under a fixed affine map: each dimension centred and scaled to unit variance
    /// (statistics over both views together), then every row L2-normalised. Features of a
    /// barely trained encoder share one large common direction; this removes it, as the
    /// synthetic features have none.
    pub fn standardized(&self) -> Result<FeatureSet> {
        let both = Tensor::cat(&[&self.views[0], &self.views[1]], 0);
        let mean = both.mean_dim(0, true, Kind::Float);
        let std = (&both - &mean)
            .square()
            .mean_dim(0, true, Kind::Float)
            .sqrt()
            .clamp_min(1e-6);
        let map = |v: &Tensor| {
            let z = (v - &mean) / &std;
            &z / z.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
        };
        let mut details = self.info.details.clone();
        details["standardized"] = serde_json::Value::Bool(true);
        FeatureSet::new(
            &self.info.source,
            [map(&self.views[0]), map(&self.views[1])],
            self.labels.clone(),
            details,
        )
    }

    /// Writes `view0`, `view1`, `labels` and the info to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let info = serde_json::to_vec(&self.info)?;
        let tensors = [
            ("view0", self.views[0].shallow_clone()),
            ("view1", self.views[1].shallow_clone()),
            ("labels", Tensor::from_slice(&self.labels)),
            (INFO_TENSOR, Tensor::from_slice(&info)),
        ];
        Tensor::write_safetensors(&tensors, path)
            .with_context(|| format!("writing the feature cache {}", path.display()))
    }

    /// Reads a file written by [`FeatureSet::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let named = Tensor::read_safetensors(path)
            .with_context(|| format!("reading the feature cache {}", path.display()))?;
        let get = |name: &str| -> Result<Tensor> {
            match named.iter().find(|(n, _)| n == name) {
                Some((_, t)) => Ok(t.shallow_clone()),
                None => bail!("{} has no tensor `{name}`", path.display()),
            }
        };
        let info_bytes: Vec<u8> = Vec::<u8>::try_from(&get(INFO_TENSOR)?)?;
        let info: FeatureInfo = serde_json::from_slice(&info_bytes)
            .with_context(|| format!("the info record of {}", path.display()))?;
        let labels: Vec<i64> = Vec::<i64>::try_from(&get("labels")?)?;
        let set = FeatureSet::new(
            &info.source,
            [get("view0")?, get("view1")?],
            labels,
            info.details.clone(),
        )?;
        ensure!(
            set.info == info,
            "{}: the tensors do not match the info record",
            path.display()
        );
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trip_keeps_everything() {
        let v0 = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([3, 2]);
        let v1 = &v0 * 2.0;
        let set = FeatureSet::new(
            "synthetic",
            [v0, v1],
            vec![0, 2, 2],
            serde_json::json!({"a": 1}),
        )
        .unwrap();
        assert_eq!(set.info.class_counts, vec![1, 0, 2]);
        assert_eq!(set.info.classes, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.safetensors");
        set.save(&path).unwrap();
        let back = FeatureSet::load(&path).unwrap();
        assert_eq!(back.info, set.info);
        assert_eq!(back.labels, set.labels);
        for v in 0..2 {
            assert!(back.views[v].equal(&set.views[v]));
        }
    }

    #[test]
    fn standardized_rows_are_unit_and_centred() {
        let v0 = Tensor::from_slice(&[10.0f32, 1.0, 12.0, 3.0, 14.0, 2.0]).reshape([3, 2]);
        let set = FeatureSet::new(
            "x",
            [v0.shallow_clone(), &v0 + 1.0],
            vec![0; 3],
            serde_json::json!({}),
        )
        .unwrap()
        .standardized()
        .unwrap();
        let norms = set.views[0].norm_scalaropt_dim(2, [1], false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-5);
        assert_eq!(set.info.details["standardized"], true);
    }

    #[test]
    fn shapes_are_checked() {
        let a = Tensor::zeros([3, 2], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::zeros([3, 4], (Kind::Float, tch::Device::Cpu));
        assert!(
            FeatureSet::new(
                "x",
                [a.shallow_clone(), b],
                vec![0; 3],
                serde_json::Value::Null
            )
            .is_err()
        );
        assert!(
            FeatureSet::new(
                "x",
                [a.shallow_clone(), a],
                vec![0; 2],
                serde_json::Value::Null
            )
            .is_err()
        );
    }
}
