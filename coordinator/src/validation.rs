//! Job-spec validation: the one place where a user's `JobSpec` becomes a checked
//! [`TrainConfig`], and where every problem becomes an [`InvalidSpec`] naming the field as the
//! user wrote it (`spec.optim.lr`, `spec.koleo_weight`, …). Handlers map it to
//! `INVALID_ARGUMENT`.
//!
//! A spec starts from a preset in the configs directory (`cpu-demo`, `vit-s16-official`, …);
//! non-zero fields override the preset, and the result passes the same bounds as a TOML file
//! (`TrainConfig::validate`), plus the job-only rules (world sizes, paths under the roots).

use std::path::{Component, Path};

use protodino_config::{Arch, DatasetFormat, OptimizerKind, TrainConfig};
use protodino_proto::v1::JobSpec;

/// A rejected spec: `field` is the spec path of the offending value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct InvalidSpec {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        field: field.into(),
        message: message.into(),
    }
}

/// Config keys whose spec field has another name.
const RENAMES: &[(&str, &str)] = &[
    ("koleo.weight", "spec.koleo_weight"),
    ("train.batch_size_per_worker", "spec.batch_size_per_worker"),
    ("train.epochs", "spec.epochs"),
    (
        "train.checkpoint_every_steps",
        "spec.checkpoint_every_steps",
    ),
    ("crops.global_crops_scale", "spec.crops.global_scale_min"),
    ("crops.local_crops_scale", "spec.crops.local_scale_min"),
    ("loss.teacher_temp", "spec.optim.teacher_temp"),
    ("loss.warmup_teacher_temp", "spec.optim.warmup_teacher_temp"),
    (
        "loss.warmup_teacher_temp_epochs",
        "spec.optim.warmup_teacher_temp_epochs",
    ),
    ("data.format", "spec.dataset_format"),
];

/// Spec name of a config key (`optim.lr` → `spec.optim.lr`).
fn spec_field(config_field: &str) -> String {
    RENAMES
        .iter()
        .find(|(c, _)| *c == config_field)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| format!("spec.{config_field}"))
}

/// A relative path without `..`, so it cannot leave the configured root.
fn check_relative(field: &str, p: &str) -> Result<(), InvalidSpec> {
    let path = Path::new(p);
    if path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(invalid(
            field,
            format!("{p:?} must be a relative path below the configured root, without `..`"),
        ));
    }
    Ok(())
}

fn parse_enum<T: names::FromName>(field: &str, value: &str) -> Result<T, InvalidSpec> {
    T::from_name(value).ok_or_else(|| {
        invalid(
            field,
            format!("{value:?} is not one of {}", T::NAMES.join(", ")),
        )
    })
}

/// Names of the enums a spec carries as strings.
mod names {
    use super::*;

    pub trait FromName: Sized {
        const NAMES: &'static [&'static str];
        fn from_name(s: &str) -> Option<Self>;
    }
    impl FromName for Arch {
        const NAMES: &'static [&'static str] =
            &["vit_tiny", "vit_small", "vit_base", "resnet18", "resnet50"];
        fn from_name(s: &str) -> Option<Self> {
            Some(match s {
                "vit_tiny" => Arch::VitTiny,
                "vit_small" => Arch::VitSmall,
                "vit_base" => Arch::VitBase,
                "resnet18" => Arch::Resnet18,
                "resnet50" => Arch::Resnet50,
                _ => return None,
            })
        }
    }
    impl FromName for OptimizerKind {
        const NAMES: &'static [&'static str] = &["adamw", "sgd", "lars"];
        fn from_name(s: &str) -> Option<Self> {
            Some(match s {
                "adamw" => OptimizerKind::Adamw,
                "sgd" => OptimizerKind::Sgd,
                "lars" => OptimizerKind::Lars,
                _ => return None,
            })
        }
    }
    impl FromName for DatasetFormat {
        const NAMES: &'static [&'static str] = &["image_folder", "file_list", "shards"];
        fn from_name(s: &str) -> Option<Self> {
            Some(match s {
                "image_folder" => DatasetFormat::ImageFolder,
                "file_list" => DatasetFormat::FileList,
                "shards" => DatasetFormat::Shards,
                _ => return None,
            })
        }
    }
}

/// A validated job: the full training configuration and the world-size range.
#[derive(Debug, Clone)]
pub struct ValidJob {
    pub config: TrainConfig,
    pub min_world_size: i32,
    pub max_world_size: i32,
}

/// Set `dst` from a spec value when it is non-zero (proto3 scalars default to zero = "preset").
fn set_if<T: PartialEq + Default + Copy, U>(dst: &mut U, v: T, f: impl FnOnce(T) -> U) {
    if v != T::default() {
        *dst = f(v);
    }
}

/// Check a spec against the presets in `configs_dir`; `max_workers` bounds the world size.
pub fn validate_spec(
    spec: &JobSpec,
    configs_dir: &Path,
    max_workers: i32,
) -> Result<ValidJob, InvalidSpec> {
    let preset = if spec.preset.is_empty() {
        "default"
    } else {
        spec.preset.as_str()
    };
    if !preset
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            "spec.preset",
            format!("{preset:?} is not a preset name"),
        ));
    }
    let file = configs_dir.join(format!("{preset}.toml"));
    if !file.is_file() {
        return Err(invalid(
            "spec.preset",
            format!("no preset {preset:?} in the coordinator's configs"),
        ));
    }
    let mut c =
        TrainConfig::load_files(&[&file]).map_err(|e| invalid("spec.preset", e.to_string()))?;

    if let Some(m) = &spec.model {
        if !m.arch.is_empty() {
            c.model.arch = parse_enum("spec.model.arch", &m.arch)?;
        }
        set_if(&mut c.model.patch_size, m.patch_size, i64::from);
        set_if(&mut c.model.img_size, m.img_size, i64::from);
        set_if(&mut c.model.drop_path_rate, m.drop_path_rate, |v| v);
    }
    if let Some(h) = &spec.head {
        set_if(&mut c.head.out_dim, h.out_dim, i64::from);
        set_if(&mut c.head.hidden_dim, h.hidden_dim, i64::from);
        set_if(&mut c.head.bottleneck_dim, h.bottleneck_dim, i64::from);
        c.head.use_bn |= h.use_bn;
        c.head.norm_last_layer |= h.norm_last_layer;
    }
    if spec.koleo_weight < 0.0 || spec.koleo_weight.is_nan() {
        return Err(invalid(
            "spec.koleo_weight",
            format!("{} is negative", spec.koleo_weight),
        ));
    }
    set_if(&mut c.koleo.weight, spec.koleo_weight, |v| v);
    if let Some(k) = &spec.crops {
        set_if(&mut c.crops.global_crop_size, k.global_crop_size, i64::from);
        set_if(
            &mut c.crops.global_crops_scale[0],
            k.global_scale_min,
            |v| v,
        );
        set_if(
            &mut c.crops.global_crops_scale[1],
            k.global_scale_max,
            |v| v,
        );
        set_if(
            &mut c.crops.local_crops_number,
            k.local_crops_number,
            i64::from,
        );
        set_if(&mut c.crops.local_crop_size, k.local_crop_size, i64::from);
        set_if(&mut c.crops.local_crops_scale[0], k.local_scale_min, |v| v);
        set_if(&mut c.crops.local_crops_scale[1], k.local_scale_max, |v| v);
    }
    if let Some(o) = &spec.optim {
        if !o.optimizer.is_empty() {
            c.optim.optimizer = parse_enum("spec.optim.optimizer", &o.optimizer)?;
        }
        set_if(&mut c.optim.lr, o.lr, |v| v);
        set_if(&mut c.optim.min_lr, o.min_lr, |v| v);
        set_if(&mut c.optim.warmup_epochs, o.warmup_epochs, i64::from);
        set_if(&mut c.optim.weight_decay, o.weight_decay, |v| v);
        set_if(&mut c.optim.weight_decay_end, o.weight_decay_end, |v| v);
        set_if(&mut c.optim.clip_grad, o.clip_grad, |v| v);
        set_if(
            &mut c.optim.freeze_last_layer,
            o.freeze_last_layer,
            i64::from,
        );
        set_if(&mut c.optim.momentum_teacher, o.momentum_teacher, |v| v);
        set_if(&mut c.loss.teacher_temp, o.teacher_temp, |v| v);
        set_if(
            &mut c.loss.warmup_teacher_temp,
            o.warmup_teacher_temp,
            |v| v,
        );
        set_if(
            &mut c.loss.warmup_teacher_temp_epochs,
            o.warmup_teacher_temp_epochs,
            i64::from,
        );
    }
    set_if(
        &mut c.train.batch_size_per_worker,
        spec.batch_size_per_worker,
        i64::from,
    );
    set_if(&mut c.train.epochs, spec.epochs, i64::from);
    set_if(
        &mut c.train.checkpoint_every_steps,
        spec.checkpoint_every_steps,
        i64::from,
    );
    set_if(&mut c.train.seed, spec.seed, |v| v);
    if !spec.dataset_format.is_empty() {
        c.data.format = parse_enum("spec.dataset_format", &spec.dataset_format)?;
    }
    if !spec.dataset.is_empty() {
        check_relative("spec.dataset", &spec.dataset)?;
        c.data.train = spec.dataset.clone();
    }
    if !spec.checkpoint_dir.is_empty() {
        check_relative("spec.checkpoint_dir", &spec.checkpoint_dir)?;
        c.train.output_dir = spec.checkpoint_dir.clone();
    }
    // Negative values of fields that the preset would otherwise keep are caught here too:
    // `set_if` copies any non-zero value and `validate` bounds it.
    c.validate()
        .map_err(|e| invalid(&spec_field(&e.field), e.message))?;

    let min = if spec.min_world_size == 0 {
        1
    } else {
        spec.min_world_size
    };
    let max = if spec.max_world_size == 0 {
        min
    } else {
        spec.max_world_size
    };
    if !(1..=max_workers).contains(&min) {
        return Err(invalid(
            "spec.min_world_size",
            format!("{min} is outside [1, {max_workers}]"),
        ));
    }
    if max < min || max > max_workers {
        return Err(invalid(
            "spec.max_world_size",
            format!("{max} is outside [{min}, {max_workers}]"),
        ));
    }
    Ok(ValidJob {
        config: c,
        min_world_size: min,
        max_world_size: max,
    })
}

#[cfg(test)]
mod tests {
    use protodino_proto::v1::{CropsSpec, OptimSpec};

    use super::*;

    fn configs() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
    }

    fn field_of(spec: JobSpec) -> String {
        validate_spec(&spec, &configs(), 64).unwrap_err().field
    }

    #[test]
    fn preset_with_overrides_is_accepted() {
        let spec = JobSpec {
            preset: "cpu-demo".into(),
            koleo_weight: 1.0,
            epochs: 3,
            optim: Some(OptimSpec {
                lr: 1e-3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let job = validate_spec(&spec, &configs(), 4).unwrap();
        assert_eq!(job.config.koleo.weight, 1.0);
        assert_eq!(job.config.train.epochs, 3);
        assert_eq!(job.config.optim.lr, 1e-3);
        assert_eq!(job.config.head.out_dim, 1024);
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = || JobSpec {
            preset: "cpu-demo".into(),
            ..Default::default()
        };
        assert_eq!(
            field_of(JobSpec {
                preset: "../etc".into(),
                ..base()
            }),
            "spec.preset"
        );
        assert_eq!(
            field_of(JobSpec {
                preset: "nope".into(),
                ..base()
            }),
            "spec.preset"
        );
        assert_eq!(
            field_of(JobSpec {
                koleo_weight: -1.0,
                ..base()
            }),
            "spec.koleo_weight"
        );
        assert_eq!(
            field_of(JobSpec {
                epochs: -2,
                ..base()
            }),
            "spec.epochs"
        );
        assert_eq!(
            field_of(JobSpec {
                batch_size_per_worker: -1,
                ..base()
            }),
            "spec.batch_size_per_worker"
        );
        assert_eq!(
            field_of(JobSpec {
                optim: Some(OptimSpec {
                    lr: -0.5,
                    ..Default::default()
                }),
                ..base()
            }),
            "spec.optim.lr"
        );
        assert_eq!(
            field_of(JobSpec {
                optim: Some(OptimSpec {
                    optimizer: "adam".into(),
                    ..Default::default()
                }),
                ..base()
            }),
            "spec.optim.optimizer"
        );
        assert_eq!(
            field_of(JobSpec {
                crops: Some(CropsSpec {
                    local_crop_size: 18,
                    ..Default::default()
                }),
                ..base()
            }),
            "spec.crops.local_crop_size"
        );
        assert_eq!(
            field_of(JobSpec {
                dataset: "/etc/passwd".into(),
                ..base()
            }),
            "spec.dataset"
        );
        assert_eq!(
            field_of(JobSpec {
                checkpoint_dir: "a/../../b".into(),
                ..base()
            }),
            "spec.checkpoint_dir"
        );
        assert_eq!(
            field_of(JobSpec {
                min_world_size: 100,
                ..base()
            }),
            "spec.min_world_size"
        );
        assert_eq!(
            field_of(JobSpec {
                min_world_size: 2,
                max_world_size: 1,
                ..base()
            }),
            "spec.max_world_size"
        );
    }
}
