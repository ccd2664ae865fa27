//! Job-spec validation: the one place where a user's `JobSpec` becomes a checked
//! [`TrainConfig`], and where every problem becomes an [`InvalidSpec`] naming the field as the
//! user wrote it (`spec.optim.lr`, `spec.koleo_weight`, …). Handlers map it to
//! `INVALID_ARGUMENT`.
//!
//! A spec starts from a preset in the configs directory (`cpu-demo`, `vit-s16-official`, …).
//! Every scalar of the spec is proto3 `optional`: an unset one keeps the preset's value, a set
//! one overrides it, zero and `false` included (`koleo_weight: 0` is plain DINO). Strings are
//! empty for "the preset's". The result passes the same bounds as a TOML file
//! ([`TrainConfig::validate`]), plus the job-only rules: bounded strings, paths that stay below
//! the coordinator's roots, finite numbers, world sizes and the global batch.
//!
//! [`dataset_size`] is the second half of a submission: it opens the training set once, under
//! the data root, and checks that one global batch fits in it.

use std::path::{Component, Path};

use protodino_config::{Arch, DatasetFormat, OptimizerKind, TrainConfig};
use protodino_proto::v1::JobSpec;

#[cfg(test)]
mod tests;

/// Longest accepted `idempotency_key`, in characters (printable ASCII).
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;
/// Longest accepted `preset` name, in characters of `[A-Za-z0-9_-]`.
pub const MAX_PRESET_CHARS: usize = 64;
/// Longest accepted `dataset` / `checkpoint_dir`, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Largest accepted global batch (samples per step over the whole group).
pub const MAX_GLOBAL_BATCH: i64 = 1_000_000;
/// The checkpoint directory (below the checkpoint root) of a spec that names none.
pub const DEFAULT_CHECKPOINT_DIR: &str = "jobs";
/// The preset of a spec that names none.
pub const DEFAULT_PRESET: &str = "default";

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

/// A validated job: the full training configuration, the world-size range and the global batch.
#[derive(Debug, Clone)]
pub struct ValidJob {
    /// Fully resolved (preset + overrides). `train.output_dir` is the checkpoint directory
    /// relative to the checkpoint root, without the job id ([`DEFAULT_CHECKPOINT_DIR`] when the
    /// spec names none); `data.train` is relative to the data root (empty: the demo set).
    pub config: TrainConfig,
    pub min_world_size: i32,
    pub max_world_size: i32,
    /// Samples per step over the whole group: `spec.global_batch_size`, else
    /// `batch_size_per_worker × max_world_size`; at least `min_world_size`. Any world size
    /// shares it out (member `r` of `W` takes entries `r, r + W, …`; shares may be uneven).
    pub global_batch: i64,
}

/// Config keys whose spec field has another name (`optim.lr` is `spec.optim.lr` and needs no
/// entry).
const RENAMES: &[(&str, &str)] = &[
    ("koleo.weight", "spec.koleo_weight"),
    ("train.batch_size_per_worker", "spec.batch_size_per_worker"),
    ("train.epochs", "spec.epochs"),
    (
        "train.checkpoint_every_steps",
        "spec.checkpoint_every_steps",
    ),
    ("train.seed", "spec.seed"),
    ("train.max_steps", "spec.max_steps"),
    ("train.threads", "spec.threads_per_worker"),
    ("train.output_dir", "spec.checkpoint_dir"),
    ("crops.global_crops_scale", "spec.crops.global_scale_min"),
    ("crops.local_crops_scale", "spec.crops.local_scale_min"),
    ("loss.teacher_temp", "spec.optim.teacher_temp"),
    ("loss.warmup_teacher_temp", "spec.optim.warmup_teacher_temp"),
    (
        "loss.warmup_teacher_temp_epochs",
        "spec.optim.warmup_teacher_temp_epochs",
    ),
    ("data.format", "spec.dataset_format"),
    ("data.train", "spec.dataset"),
    ("data.limit", "spec.data_limit"),
    ("eval.analysis_every_steps", "spec.analysis_every_steps"),
    // Only a crop size from the spec can break the ResNet-50 small-stem rule.
    ("model.small_input_stem", "spec.crops.global_crop_size"),
];

/// Spec name of a config key (`optim.lr` → `spec.optim.lr`).
fn spec_field(config_field: &str) -> String {
    RENAMES
        .iter()
        .find(|(c, _)| *c == config_field)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| format!("spec.{config_field}"))
}

/// A user string as shown in a message: quoted, escaped and cut to 64 characters, so a huge
/// value is never echoed back whole.
fn shown(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}… ({} characters)", s.chars().count())
    }
}

fn check_idempotency_key(key: &str) -> Result<(), InvalidSpec> {
    const FIELD: &str = "spec.idempotency_key";
    let n = key.chars().count();
    if n > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(invalid(
            FIELD,
            format!("{n} characters; at most {MAX_IDEMPOTENCY_KEY_CHARS} are allowed"),
        ));
    }
    if let Some((i, c)) = key.char_indices().find(|(_, c)| !(' '..='~').contains(c)) {
        return Err(invalid(
            FIELD,
            format!("character {c:?} at byte {i} is not printable ASCII"),
        ));
    }
    Ok(())
}

fn check_preset_name(preset: &str) -> Result<(), InvalidSpec> {
    const FIELD: &str = "spec.preset";
    let n = preset.chars().count();
    if n > MAX_PRESET_CHARS {
        return Err(invalid(
            FIELD,
            format!("{n} characters; at most {MAX_PRESET_CHARS} are allowed"),
        ));
    }
    if !preset
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            FIELD,
            format!(
                "{} is not a preset name (letters, digits, `-` and `_` only)",
                shown(preset)
            ),
        ));
    }
    Ok(())
}

/// A bounded relative path without `..` or control characters, so it cannot leave the
/// configured root.
fn check_relative(field: &str, p: &str) -> Result<(), InvalidSpec> {
    if p.len() > MAX_PATH_BYTES {
        return Err(invalid(
            field,
            format!("{} bytes; at most {MAX_PATH_BYTES} are allowed", p.len()),
        ));
    }
    if let Some((i, c)) = p.char_indices().find(|(_, c)| c.is_control()) {
        return Err(invalid(
            field,
            format!("control character {c:?} at byte {i}"),
        ));
    }
    let path = Path::new(p);
    if path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(invalid(
            field,
            format!(
                "{} must be a relative path below the configured root, without `..`",
                shown(p)
            ),
        ));
    }
    Ok(())
}

fn parse_enum<T: names::FromName>(field: &str, value: &str) -> Result<T, InvalidSpec> {
    T::from_name(value).ok_or_else(|| {
        invalid(
            field,
            format!("{} is not one of {}", shown(value), T::NAMES.join(", ")),
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

/// Override a float with a set spec value, which must be finite (its range is
/// [`TrainConfig::validate`]'s).
fn set_f64(dst: &mut f64, field: &str, v: Option<f64>) -> Result<(), InvalidSpec> {
    if let Some(v) = v {
        if !v.is_finite() {
            return Err(invalid(field, format!("{v} is not a finite number")));
        }
        *dst = v;
    }
    Ok(())
}

/// Override an integer with a set spec value, which must not be negative (every integer of a
/// spec is a size, a count or a cadence; the upper bounds are [`TrainConfig::validate`]'s).
fn set_i64<T: Into<i64>>(dst: &mut i64, field: &str, v: Option<T>) -> Result<(), InvalidSpec> {
    if let Some(v) = v {
        let v = v.into();
        if v < 0 {
            return Err(invalid(field, format!("{v} is negative")));
        }
        *dst = v;
    }
    Ok(())
}

/// Override a bool with a set spec value (`Some(false)` sets false).
fn set_bool(dst: &mut bool, v: Option<bool>) {
    if let Some(v) = v {
        *dst = v;
    }
}

/// Override one crop-scale bound: finite and in `(0, 1]`; then `min <= max`, naming the bound
/// the spec set (the minimum when it set both).
fn set_scale(
    dst: &mut [f64; 2],
    (min_field, min): (&str, Option<f64>),
    (max_field, max): (&str, Option<f64>),
) -> Result<(), InvalidSpec> {
    for (field, v) in [(min_field, min), (max_field, max)] {
        if let Some(v) = v
            && !(v.is_finite() && v > 0.0 && v <= 1.0)
        {
            return Err(invalid(field, format!("{v} is outside (0, 1]")));
        }
    }
    let lo = min.unwrap_or(dst[0]);
    let hi = max.unwrap_or(dst[1]);
    if lo > hi {
        let field = if min.is_some() { min_field } else { max_field };
        return Err(invalid(
            field,
            format!("the scale range [{lo}, {hi}] has its minimum above its maximum"),
        ));
    }
    *dst = [lo, hi];
    Ok(())
}

/// Check a spec against the presets in `configs_dir`; `max_workers` bounds the world size.
pub fn validate_spec(
    spec: &JobSpec,
    configs_dir: &Path,
    max_workers: i32,
) -> Result<ValidJob, InvalidSpec> {
    // Strings first: they are what a hostile or careless client makes huge.
    check_idempotency_key(&spec.idempotency_key)?;
    check_preset_name(&spec.preset)?;
    if !spec.dataset.is_empty() {
        check_relative("spec.dataset", &spec.dataset)?;
    }
    if !spec.checkpoint_dir.is_empty() {
        check_relative("spec.checkpoint_dir", &spec.checkpoint_dir)?;
    }

    let mut c = load_preset(&spec.preset, configs_dir, &spec.config_toml)?;
    apply_overrides(spec, &mut c)?;
    // Every bound and cross-field rule of a TOML file; the preset passed them on its own, so
    // a violation comes from the spec's values.
    c.validate()
        .map_err(|e| invalid(&spec_field(&e.field), e.message))?;

    let (min_world_size, max_world_size) = world_sizes(spec, max_workers)?;
    let global_batch = global_batch(spec, &c, min_world_size, max_world_size)?;
    Ok(ValidJob {
        config: c,
        min_world_size,
        max_world_size,
        global_batch,
    })
}

/// Largest `spec.config_toml`.
pub const MAX_CONFIG_TOML_BYTES: usize = 64 * 1024;

/// The preset named by the spec (the default when empty), from the configs directory, with the
/// spec's TOML configuration layered over it. Errors of that layer name `spec.config_toml` and
/// the key (`spec.config_toml.optim.lr`).
fn load_preset(
    preset: &str,
    configs_dir: &Path,
    config_toml: &str,
) -> Result<TrainConfig, InvalidSpec> {
    const FIELD: &str = "spec.preset";
    const TOML_FIELD: &str = "spec.config_toml";
    if config_toml.len() > MAX_CONFIG_TOML_BYTES {
        return Err(invalid(
            TOML_FIELD,
            format!(
                "{} bytes is over the limit of {MAX_CONFIG_TOML_BYTES}",
                config_toml.len()
            ),
        ));
    }
    let preset = if preset.is_empty() {
        DEFAULT_PRESET
    } else {
        preset
    };
    let file = configs_dir.join(format!("{preset}.toml"));
    if !file.is_file() {
        return Err(invalid(
            FIELD,
            format!("no preset {} in the coordinator's configs", shown(preset)),
        ));
    }
    let c = TrainConfig::load_files(&[&file]).map_err(|e| invalid(FIELD, e.to_string()))?;
    let c = if config_toml.is_empty() {
        c
    } else {
        TrainConfig::load_files_with_overlay(&[&file], config_toml).map_err(|e| match e {
            protodino_config::ConfigError::Invalid(f) => {
                invalid(&format!("{TOML_FIELD}.{}", f.field), f.message)
            }
            other => invalid(TOML_FIELD, other.to_string()),
        })?
    };
    // A preset is the operator's, but the paths it names must stay below the roots too (and
    // the spec's own TOML is the user's).
    let field = if config_toml.is_empty() {
        FIELD
    } else {
        TOML_FIELD
    };
    for (what, p) in [
        ("data.train", &c.data.train),
        ("data.eval_train", &c.data.eval_train),
        ("data.eval_test", &c.data.eval_test),
    ] {
        if !p.is_empty() {
            check_relative(field, p)
                .map_err(|e| invalid(field, format!("preset {preset:?}: {what}: {}", e.message)))?;
        }
    }
    Ok(c)
}

/// Every set field of the spec over the preset's value, each one pre-checked (finite floats,
/// non-negative integers, known names).
fn apply_overrides(spec: &JobSpec, c: &mut TrainConfig) -> Result<(), InvalidSpec> {
    if let Some(m) = &spec.model {
        if !m.arch.is_empty() {
            c.model.arch = parse_enum("spec.model.arch", &m.arch)?;
        }
        set_i64(
            &mut c.model.patch_size,
            "spec.model.patch_size",
            m.patch_size,
        )?;
        set_i64(&mut c.model.img_size, "spec.model.img_size", m.img_size)?;
        set_f64(
            &mut c.model.drop_path_rate,
            "spec.model.drop_path_rate",
            m.drop_path_rate,
        )?;
        set_i64(&mut c.model.depth, "spec.model.depth", m.depth)?;
        // `validate` bounds the patch and image sizes of ViTs only; a ResNet ignores them, but a
        // value a spec sets is still held to the same bounds.
        if !c.model.arch.is_vit() {
            if let Some(p) = m.patch_size
                && ![4, 8, 14, 16].contains(&p)
            {
                return Err(invalid(
                    "spec.model.patch_size",
                    format!("{p} is not one of 4, 8, 14, 16"),
                ));
            }
            if let Some(s) = m.img_size
                && !(16..=1024).contains(&s)
            {
                return Err(invalid(
                    "spec.model.img_size",
                    format!("{s} is outside [16, 1024]"),
                ));
            }
        }
    }
    if let Some(h) = &spec.head {
        set_i64(&mut c.head.out_dim, "spec.head.out_dim", h.out_dim)?;
        set_i64(&mut c.head.hidden_dim, "spec.head.hidden_dim", h.hidden_dim)?;
        set_i64(
            &mut c.head.bottleneck_dim,
            "spec.head.bottleneck_dim",
            h.bottleneck_dim,
        )?;
        set_bool(&mut c.head.use_bn, h.use_bn);
        set_bool(&mut c.head.norm_last_layer, h.norm_last_layer);
    }
    set_f64(&mut c.koleo.weight, "spec.koleo_weight", spec.koleo_weight)?;
    if let Some(k) = &spec.crops {
        set_i64(
            &mut c.crops.global_crop_size,
            "spec.crops.global_crop_size",
            k.global_crop_size,
        )?;
        set_scale(
            &mut c.crops.global_crops_scale,
            ("spec.crops.global_scale_min", k.global_scale_min),
            ("spec.crops.global_scale_max", k.global_scale_max),
        )?;
        set_i64(
            &mut c.crops.local_crops_number,
            "spec.crops.local_crops_number",
            k.local_crops_number,
        )?;
        set_i64(
            &mut c.crops.local_crop_size,
            "spec.crops.local_crop_size",
            k.local_crop_size,
        )?;
        set_scale(
            &mut c.crops.local_crops_scale,
            ("spec.crops.local_scale_min", k.local_scale_min),
            ("spec.crops.local_scale_max", k.local_scale_max),
        )?;
    }
    if let Some(o) = &spec.optim {
        if !o.optimizer.is_empty() {
            c.optim.optimizer = parse_enum("spec.optim.optimizer", &o.optimizer)?;
        }
        set_f64(&mut c.optim.lr, "spec.optim.lr", o.lr)?;
        set_f64(&mut c.optim.min_lr, "spec.optim.min_lr", o.min_lr)?;
        set_i64(
            &mut c.optim.warmup_epochs,
            "spec.optim.warmup_epochs",
            o.warmup_epochs,
        )?;
        set_f64(
            &mut c.optim.weight_decay,
            "spec.optim.weight_decay",
            o.weight_decay,
        )?;
        set_f64(
            &mut c.optim.weight_decay_end,
            "spec.optim.weight_decay_end",
            o.weight_decay_end,
        )?;
        set_f64(&mut c.optim.clip_grad, "spec.optim.clip_grad", o.clip_grad)?;
        set_i64(
            &mut c.optim.freeze_last_layer,
            "spec.optim.freeze_last_layer",
            o.freeze_last_layer,
        )?;
        set_f64(
            &mut c.optim.momentum_teacher,
            "spec.optim.momentum_teacher",
            o.momentum_teacher,
        )?;
        set_f64(
            &mut c.loss.teacher_temp,
            "spec.optim.teacher_temp",
            o.teacher_temp,
        )?;
        set_f64(
            &mut c.loss.warmup_teacher_temp,
            "spec.optim.warmup_teacher_temp",
            o.warmup_teacher_temp,
        )?;
        set_i64(
            &mut c.loss.warmup_teacher_temp_epochs,
            "spec.optim.warmup_teacher_temp_epochs",
            o.warmup_teacher_temp_epochs,
        )?;
    }
    set_i64(
        &mut c.train.batch_size_per_worker,
        "spec.batch_size_per_worker",
        spec.batch_size_per_worker,
    )?;
    set_i64(&mut c.train.epochs, "spec.epochs", spec.epochs)?;
    set_i64(
        &mut c.train.checkpoint_every_steps,
        "spec.checkpoint_every_steps",
        spec.checkpoint_every_steps,
    )?;
    if let Some(seed) = spec.seed {
        c.train.seed = seed;
    }
    set_i64(&mut c.train.max_steps, "spec.max_steps", spec.max_steps)?;
    set_i64(
        &mut c.train.threads,
        "spec.threads_per_worker",
        spec.threads_per_worker,
    )?;
    set_i64(&mut c.data.limit, "spec.data_limit", spec.data_limit)?;
    set_i64(
        &mut c.eval.analysis_every_steps,
        "spec.analysis_every_steps",
        spec.analysis_every_steps,
    )?;
    if !spec.dataset_format.is_empty() {
        c.data.format = parse_enum("spec.dataset_format", &spec.dataset_format)?;
    }
    if !spec.dataset.is_empty() {
        c.data.train = spec.dataset.clone();
    }
    c.train.output_dir = if spec.checkpoint_dir.is_empty() {
        DEFAULT_CHECKPOINT_DIR.to_string()
    } else {
        spec.checkpoint_dir.clone()
    };
    Ok(())
}

/// `1 <= min <= max <= max_workers`; min defaults to 1, max to min.
fn world_sizes(spec: &JobSpec, max_workers: i32) -> Result<(i32, i32), InvalidSpec> {
    let min = spec.min_world_size.unwrap_or(1);
    if min < 1 || min > max_workers {
        return Err(invalid(
            "spec.min_world_size",
            format!("{min} is outside [1, {max_workers}] (the coordinator's --max-workers)"),
        ));
    }
    let max = spec.max_world_size.unwrap_or(min);
    if max < min || max > max_workers {
        return Err(invalid(
            "spec.max_world_size",
            format!("{max} is outside [min_world_size {min}, {max_workers}]"),
        ));
    }
    Ok((min, max))
}

/// The job's global batch: set, or `batch_size_per_worker × max_world_size`; bounded, and
/// divisible by at least one world size of the range (groups only form at such sizes).
fn global_batch(spec: &JobSpec, c: &TrainConfig, min: i32, max: i32) -> Result<i64, InvalidSpec> {
    let (field, g) = match spec.global_batch_size {
        Some(g) => ("spec.global_batch_size", i64::from(g)),
        None => (
            "spec.batch_size_per_worker",
            c.train.batch_size_per_worker * i64::from(max),
        ),
    };
    if !(1..=MAX_GLOBAL_BATCH).contains(&g) {
        let what = if spec.global_batch_size.is_some() {
            format!("{g}")
        } else {
            format!(
                "the default global batch {g} (batch_size_per_worker {} × max_world_size {max})",
                c.train.batch_size_per_worker
            )
        };
        return Err(invalid(
            field,
            format!("{what} is outside [1, {MAX_GLOBAL_BATCH}]"),
        ));
    }
    if g < i64::from(min) {
        return Err(invalid(
            "spec.global_batch_size",
            format!(
                "{g} is smaller than min_world_size {min}: every member of a group needs at \
                 least one sample of each step"
            ),
        ));
    }
    Ok(g)
}

/// Opens the training set named by `cfg` (relative to `data_root`, via
/// [`protodino_data::open_train`]) and returns its size (after `data.limit`).
///
/// Errors name `spec.dataset` (missing, unreadable, empty, or a path that leaves the root); a
/// global batch larger than the set names `spec.global_batch_size`.
pub fn dataset_size(
    cfg: &TrainConfig,
    global_batch: i64,
    data_root: &Path,
) -> Result<u64, InvalidSpec> {
    const FIELD: &str = "spec.dataset";
    let mut data = cfg.data.clone();
    if !data.train.is_empty() {
        check_relative(FIELD, &data.train)?;
        // Anchor the path at the data root: `open_train` would otherwise first look for it
        // relative to the coordinator's working directory.
        let under_root = data_root.join(&data.train);
        data.train = under_root
            .to_str()
            .ok_or_else(|| {
                invalid(
                    FIELD,
                    format!(
                        "{} under the data root is not UTF-8",
                        shown(&cfg.data.train)
                    ),
                )
            })?
            .to_string();
    }
    let ds = protodino_data::open_train(&data, data_root).map_err(|e| {
        let name = if cfg.data.train.is_empty() {
            format!(
                "the demo set ({})",
                protodino_data::open::FASHION_MNIST_TRAIN
            )
        } else {
            shown(&cfg.data.train)
        };
        invalid(
            FIELD,
            format!("cannot open {name} under the data root: {e}"),
        )
    })?;
    let n = ds.len() as u64;
    if n == 0 {
        return Err(invalid(FIELD, "the training set has no images"));
    }
    if global_batch < 1 || global_batch as u64 > n {
        return Err(invalid(
            "spec.global_batch_size",
            format!(
                "the global batch {global_batch} is outside [1, {n}] (the training set's size{})",
                if cfg.data.limit > 0 {
                    format!(" after data_limit {}", cfg.data.limit)
                } else {
                    String::new()
                }
            ),
        ));
    }
    Ok(n)
}
