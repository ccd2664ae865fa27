use std::path::PathBuf;

use protodino_proto::v1::{CropsSpec, HeadSpec, ModelSpec, OptimSpec};

use super::*;

/// `max_workers` of every test unless it says otherwise.
const MAX_WORKERS: i32 = 16;

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn demo() -> JobSpec {
    JobSpec {
        preset: "cpu-demo".into(),
        ..Default::default()
    }
}

fn demo_preset() -> TrainConfig {
    TrainConfig::load_files(&[configs().join("cpu-demo.toml")]).unwrap()
}

fn valid(spec: &JobSpec) -> ValidJob {
    validate_spec(spec, &configs(), MAX_WORKERS)
        .unwrap_or_else(|e| panic!("spec should be valid, got {e}"))
}

fn model(s: &mut JobSpec) -> &mut ModelSpec {
    s.model.get_or_insert_with(Default::default)
}
fn head(s: &mut JobSpec) -> &mut HeadSpec {
    s.head.get_or_insert_with(Default::default)
}
fn crops(s: &mut JobSpec) -> &mut CropsSpec {
    s.crops.get_or_insert_with(Default::default)
}
fn optim(s: &mut JobSpec) -> &mut OptimSpec {
    s.optim.get_or_insert_with(Default::default)
}

type Case = (&'static str, fn(&mut JobSpec), &'static str);

/// One malformed or out-of-range spec per row (each a single change to the cpu-demo spec) and
/// the field its rejection must name.
const BAD: &[Case] = &[
    // Floats: negative, NaN, infinite, out of range.
    ("negative lr", |s| optim(s).lr = Some(-0.5), "spec.optim.lr"),
    ("NaN lr", |s| optim(s).lr = Some(f64::NAN), "spec.optim.lr"),
    ("lr above 100", |s| optim(s).lr = Some(1e3), "spec.optim.lr"),
    (
        "infinite min_lr",
        |s| optim(s).min_lr = Some(f64::INFINITY),
        "spec.optim.min_lr",
    ),
    (
        "infinite teacher_temp",
        |s| optim(s).teacher_temp = Some(f64::INFINITY),
        "spec.optim.teacher_temp",
    ),
    (
        "teacher_temp 0",
        |s| optim(s).teacher_temp = Some(0.0),
        "spec.optim.teacher_temp",
    ),
    (
        "NaN warmup_teacher_temp",
        |s| optim(s).warmup_teacher_temp = Some(f64::NAN),
        "spec.optim.warmup_teacher_temp",
    ),
    (
        "negative warmup_teacher_temp_epochs",
        |s| optim(s).warmup_teacher_temp_epochs = Some(-1),
        "spec.optim.warmup_teacher_temp_epochs",
    ),
    (
        "momentum_teacher above 1",
        |s| optim(s).momentum_teacher = Some(1.5),
        "spec.optim.momentum_teacher",
    ),
    (
        "NaN weight_decay",
        |s| optim(s).weight_decay = Some(f64::NAN),
        "spec.optim.weight_decay",
    ),
    (
        "weight_decay_end 20",
        |s| optim(s).weight_decay_end = Some(20.0),
        "spec.optim.weight_decay_end",
    ),
    (
        "negative clip_grad",
        |s| optim(s).clip_grad = Some(-1.0),
        "spec.optim.clip_grad",
    ),
    (
        "negative freeze_last_layer",
        |s| optim(s).freeze_last_layer = Some(-1),
        "spec.optim.freeze_last_layer",
    ),
    (
        "negative warmup_epochs",
        |s| optim(s).warmup_epochs = Some(-3),
        "spec.optim.warmup_epochs",
    ),
    (
        "unknown optimizer",
        |s| optim(s).optimizer = "adam".into(),
        "spec.optim.optimizer",
    ),
    (
        "negative koleo_weight",
        |s| s.koleo_weight = Some(-1.0),
        "spec.koleo_weight",
    ),
    (
        "NaN koleo_weight",
        |s| s.koleo_weight = Some(f64::NAN),
        "spec.koleo_weight",
    ),
    (
        "koleo_weight above 100",
        |s| s.koleo_weight = Some(1e3),
        "spec.koleo_weight",
    ),
    // Model and head.
    (
        "drop_path_rate 1.5",
        |s| model(s).drop_path_rate = Some(1.5),
        "spec.model.drop_path_rate",
    ),
    (
        "infinite drop_path_rate",
        |s| model(s).drop_path_rate = Some(f64::NEG_INFINITY),
        "spec.model.drop_path_rate",
    ),
    (
        "unknown arch",
        |s| model(s).arch = "vit_huge".into(),
        "spec.model.arch",
    ),
    (
        "ViT patch_size 3",
        |s| model(s).patch_size = Some(3),
        "spec.model.patch_size",
    ),
    (
        "negative patch_size",
        |s| model(s).patch_size = Some(-8),
        "spec.model.patch_size",
    ),
    (
        "img_size not a patch multiple",
        |s| model(s).img_size = Some(36),
        "spec.model.img_size",
    ),
    (
        "depth 100",
        |s| model(s).depth = Some(100),
        "spec.model.depth",
    ),
    (
        "negative depth",
        |s| model(s).depth = Some(-1),
        "spec.model.depth",
    ),
    (
        "ResNet patch_size 5",
        |s| {
            model(s).arch = "resnet50".into();
            model(s).patch_size = Some(5);
        },
        "spec.model.patch_size",
    ),
    (
        "ResNet img_size 0",
        |s| {
            model(s).arch = "resnet18".into();
            model(s).img_size = Some(0);
        },
        "spec.model.img_size",
    ),
    (
        "out_dim 0",
        |s| head(s).out_dim = Some(0),
        "spec.head.out_dim",
    ),
    (
        "hidden_dim 0",
        |s| head(s).hidden_dim = Some(0),
        "spec.head.hidden_dim",
    ),
    (
        "negative bottleneck_dim",
        |s| head(s).bottleneck_dim = Some(-256),
        "spec.head.bottleneck_dim",
    ),
    // Crops.
    (
        "local_crops_number -1",
        |s| crops(s).local_crops_number = Some(-1),
        "spec.crops.local_crops_number",
    ),
    (
        "local_crops_number 65",
        |s| crops(s).local_crops_number = Some(65),
        "spec.crops.local_crops_number",
    ),
    (
        "local_crop_size not a patch multiple",
        |s| crops(s).local_crop_size = Some(18),
        "spec.crops.local_crop_size",
    ),
    (
        "global_crop_size 4",
        |s| crops(s).global_crop_size = Some(4),
        "spec.crops.global_crop_size",
    ),
    (
        "global_scale_min above max",
        |s| {
            crops(s).global_scale_min = Some(0.9);
            crops(s).global_scale_max = Some(0.5);
        },
        "spec.crops.global_scale_min",
    ),
    (
        "global_scale_min 0",
        |s| crops(s).global_scale_min = Some(0.0),
        "spec.crops.global_scale_min",
    ),
    (
        "NaN global_scale_max",
        |s| crops(s).global_scale_max = Some(f64::NAN),
        "spec.crops.global_scale_max",
    ),
    (
        "local_scale_max 1.5",
        |s| crops(s).local_scale_max = Some(1.5),
        "spec.crops.local_scale_max",
    ),
    (
        "local_scale_max below the preset's min",
        |s| crops(s).local_scale_max = Some(0.05),
        "spec.crops.local_scale_max",
    ),
    // Run.
    ("negative epochs", |s| s.epochs = Some(-2), "spec.epochs"),
    ("epochs 0", |s| s.epochs = Some(0), "spec.epochs"),
    (
        "batch 0",
        |s| s.batch_size_per_worker = Some(0),
        "spec.batch_size_per_worker",
    ),
    (
        "negative batch",
        |s| s.batch_size_per_worker = Some(-1),
        "spec.batch_size_per_worker",
    ),
    (
        "batch 100 000",
        |s| s.batch_size_per_worker = Some(100_000),
        "spec.batch_size_per_worker",
    ),
    (
        "negative max_steps",
        |s| s.max_steps = Some(-1),
        "spec.max_steps",
    ),
    (
        "negative data_limit",
        |s| s.data_limit = Some(-5),
        "spec.data_limit",
    ),
    (
        "negative threads",
        |s| s.threads_per_worker = Some(-1),
        "spec.threads_per_worker",
    ),
    (
        "threads 2000",
        |s| s.threads_per_worker = Some(2000),
        "spec.threads_per_worker",
    ),
    (
        "negative analysis_every_steps",
        |s| s.analysis_every_steps = Some(-10),
        "spec.analysis_every_steps",
    ),
    (
        "negative checkpoint_every_steps",
        |s| s.checkpoint_every_steps = Some(-1),
        "spec.checkpoint_every_steps",
    ),
    // Names and paths.
    (
        "unknown dataset_format",
        |s| s.dataset_format = "tfrecord".into(),
        "spec.dataset_format",
    ),
    (
        "absolute dataset",
        |s| s.dataset = "/etc/passwd".into(),
        "spec.dataset",
    ),
    (
        "dataset with ..",
        |s| s.dataset = "../secrets".into(),
        "spec.dataset",
    ),
    (
        "NUL in dataset",
        |s| s.dataset = "a\0b".into(),
        "spec.dataset",
    ),
    (
        "2000-byte dataset",
        |s| s.dataset = "d/".repeat(1000),
        "spec.dataset",
    ),
    (
        ".. checkpoint_dir",
        |s| s.checkpoint_dir = "a/../../b".into(),
        "spec.checkpoint_dir",
    ),
    (
        "absolute checkpoint_dir",
        |s| s.checkpoint_dir = "/tmp/x".into(),
        "spec.checkpoint_dir",
    ),
    (
        "escape in checkpoint_dir",
        |s| s.checkpoint_dir = "runs/\x1b[2J".into(),
        "spec.checkpoint_dir",
    ),
    (
        "20 000-char idempotency key",
        |s| s.idempotency_key = "k".repeat(20_000),
        "spec.idempotency_key",
    ),
    (
        "129-char idempotency key",
        |s| s.idempotency_key = "k".repeat(129),
        "spec.idempotency_key",
    ),
    (
        "control character in key",
        |s| s.idempotency_key = "abc\ndef".into(),
        "spec.idempotency_key",
    ),
    (
        "non-ASCII key",
        |s| s.idempotency_key = "clé".into(),
        "spec.idempotency_key",
    ),
    (
        "65-char preset",
        |s| s.preset = "p".repeat(65),
        "spec.preset",
    ),
    (
        "unknown preset",
        |s| s.preset = "nope".into(),
        "spec.preset",
    ),
    (
        "path as preset",
        |s| s.preset = "../etc".into(),
        "spec.preset",
    ),
    (
        "space in preset",
        |s| s.preset = "cpu demo".into(),
        "spec.preset",
    ),
    // World sizes and the global batch (max_workers = 16).
    (
        "min_world_size 0",
        |s| s.min_world_size = Some(0),
        "spec.min_world_size",
    ),
    (
        "negative min_world_size",
        |s| s.min_world_size = Some(-1),
        "spec.min_world_size",
    ),
    (
        "min_world_size above max_workers",
        |s| s.min_world_size = Some(100),
        "spec.min_world_size",
    ),
    (
        "max below min",
        |s| {
            s.min_world_size = Some(2);
            s.max_world_size = Some(1);
        },
        "spec.max_world_size",
    ),
    (
        "max above max_workers",
        |s| s.max_world_size = Some(17),
        "spec.max_world_size",
    ),
    (
        "global batch 0",
        |s| s.global_batch_size = Some(0),
        "spec.global_batch_size",
    ),
    (
        "negative global batch",
        |s| s.global_batch_size = Some(-64),
        "spec.global_batch_size",
    ),
    (
        "global batch above 1 000 000",
        |s| s.global_batch_size = Some(1_000_001),
        "spec.global_batch_size",
    ),
    (
        "global batch smaller than min_world_size",
        |s| {
            s.min_world_size = Some(3);
            s.max_world_size = Some(3);
            s.global_batch_size = Some(2);
        },
        "spec.global_batch_size",
    ),
    (
        "default global batch above 1 000 000",
        |s| {
            s.batch_size_per_worker = Some(65_536);
            s.max_world_size = Some(16);
        },
        "spec.batch_size_per_worker",
    ),
];

#[test]
fn each_bad_spec_names_its_field() {
    assert!(BAD.len() >= 30, "{} cases", BAD.len());
    let mut failures = Vec::new();
    for (name, change, field) in BAD {
        let mut spec = demo();
        change(&mut spec);
        match validate_spec(&spec, &configs(), MAX_WORKERS) {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(e) if e.field != *field => {
                failures.push(format!("{name}: named `{}` ({e}), not `{field}`", e.field))
            }
            Err(e) => assert!(
                e.message.len() < 300,
                "{name}: message of {} bytes echoes the value",
                e.message.len()
            ),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_cpu_demo_spec_itself_is_valid() {
    valid(&demo());
}

#[test]
fn koleo_weight_zero_overrides_the_preset() {
    assert_eq!(demo_preset().koleo.weight, 0.1);
    let job = valid(&JobSpec {
        koleo_weight: Some(0.0),
        ..demo()
    });
    assert_eq!(job.config.koleo.weight, 0.0);
}

#[test]
fn false_bools_override_the_preset() {
    assert!(demo_preset().head.norm_last_layer);
    let mut spec = demo();
    head(&mut spec).use_bn = Some(false);
    head(&mut spec).norm_last_layer = Some(false);
    let job = valid(&spec);
    assert!(!job.config.head.use_bn);
    assert!(!job.config.head.norm_last_layer);

    head(&mut spec).use_bn = Some(true);
    assert!(valid(&spec).config.head.use_bn);
}

#[test]
fn zeros_override_the_preset() {
    let preset = demo_preset();
    assert_ne!(preset.optim.clip_grad, 0.0);
    assert_ne!(preset.crops.local_crops_number, 0);
    assert_ne!(preset.data.limit, 0);
    let mut spec = JobSpec {
        checkpoint_every_steps: Some(0),
        data_limit: Some(0),
        max_steps: Some(0),
        threads_per_worker: Some(0),
        analysis_every_steps: Some(0),
        seed: Some(0),
        ..demo()
    };
    model(&mut spec).drop_path_rate = Some(0.0);
    model(&mut spec).depth = Some(0);
    crops(&mut spec).local_crops_number = Some(0);
    optim(&mut spec).clip_grad = Some(0.0);
    optim(&mut spec).freeze_last_layer = Some(0);
    optim(&mut spec).warmup_epochs = Some(0);
    optim(&mut spec).min_lr = Some(0.0);
    optim(&mut spec).weight_decay = Some(0.0);
    let c = valid(&spec).config;
    assert_eq!(c.train.checkpoint_every_steps, 0);
    assert_eq!(c.data.limit, 0);
    assert_eq!(c.train.max_steps, 0);
    assert_eq!(c.train.threads, 0);
    assert_eq!(c.eval.analysis_every_steps, 0);
    assert_eq!(c.train.seed, 0);
    assert_eq!(c.model.drop_path_rate, 0.0);
    assert_eq!(c.model.depth, 0);
    assert_eq!(c.crops.local_crops_number, 0);
    assert_eq!(c.optim.clip_grad, 0.0);
    assert_eq!(c.optim.freeze_last_layer, 0);
    assert_eq!(c.optim.warmup_epochs, 0);
    assert_eq!(c.optim.min_lr, 0.0);
    assert_eq!(c.optim.weight_decay, 0.0);
}

#[test]
fn unset_fields_keep_the_preset() {
    let job = valid(&demo());
    let mut expected = demo_preset();
    expected.train.output_dir = DEFAULT_CHECKPOINT_DIR.into();
    assert_eq!(job.config, expected);
    assert_eq!((job.min_world_size, job.max_world_size), (1, 1));
    assert_eq!(job.global_batch, 32);

    // Empty sub-messages change nothing either.
    let job = valid(&JobSpec {
        model: Some(Default::default()),
        head: Some(Default::default()),
        crops: Some(Default::default()),
        optim: Some(Default::default()),
        ..demo()
    });
    assert_eq!(job.config, expected);
}

#[test]
fn an_empty_preset_is_the_default_one() {
    let job = valid(&JobSpec::default());
    let mut expected = TrainConfig::load_files(&[configs().join("default.toml")]).unwrap();
    expected.train.output_dir = DEFAULT_CHECKPOINT_DIR.into();
    assert_eq!(job.config, expected);
}

#[test]
fn every_field_reaches_its_config_key() {
    let mut spec = JobSpec {
        koleo_weight: Some(2.5),
        batch_size_per_worker: Some(16),
        epochs: Some(7),
        min_world_size: Some(2),
        max_world_size: Some(4),
        dataset: "sets/mine.txt".into(),
        dataset_format: "file_list".into(),
        checkpoint_dir: "team/a".into(),
        checkpoint_every_steps: Some(25),
        seed: Some(u64::MAX),
        idempotency_key: "retry-1 (ok)".into(),
        max_steps: Some(1_000),
        data_limit: Some(640),
        threads_per_worker: Some(3),
        analysis_every_steps: Some(20),
        global_batch_size: Some(96),
        ..demo()
    };
    *model(&mut spec) = ModelSpec {
        arch: "vit_small".into(),
        patch_size: Some(4),
        img_size: Some(64),
        drop_path_rate: Some(0.2),
        depth: Some(6),
    };
    *head(&mut spec) = HeadSpec {
        out_dim: Some(4096),
        hidden_dim: Some(256),
        bottleneck_dim: Some(128),
        use_bn: Some(true),
        norm_last_layer: Some(false),
    };
    *crops(&mut spec) = CropsSpec {
        global_crop_size: Some(64),
        global_scale_min: Some(0.3),
        global_scale_max: Some(0.9),
        local_crops_number: Some(4),
        local_crop_size: Some(24),
        local_scale_min: Some(0.05),
        local_scale_max: Some(0.3),
    };
    *optim(&mut spec) = OptimSpec {
        optimizer: "lars".into(),
        lr: Some(0.3),
        min_lr: Some(0.001),
        warmup_epochs: Some(2),
        weight_decay: Some(1e-6),
        weight_decay_end: Some(1e-5),
        clip_grad: Some(1.0),
        freeze_last_layer: Some(3),
        momentum_teacher: Some(0.99),
        teacher_temp: Some(0.07),
        warmup_teacher_temp: Some(0.03),
        warmup_teacher_temp_epochs: Some(5),
    };
    let job = valid(&spec);
    let c = &job.config;
    assert_eq!(c.koleo.weight, 2.5);
    assert_eq!(c.train.batch_size_per_worker, 16);
    assert_eq!(c.train.epochs, 7);
    assert_eq!((job.min_world_size, job.max_world_size), (2, 4));
    assert_eq!(job.global_batch, 96);
    assert_eq!(c.data.train, "sets/mine.txt");
    assert_eq!(c.data.format, DatasetFormat::FileList);
    assert_eq!(c.train.output_dir, "team/a");
    assert_eq!(c.train.checkpoint_every_steps, 25);
    assert_eq!(c.train.seed, u64::MAX);
    assert_eq!(c.train.max_steps, 1_000);
    assert_eq!(c.data.limit, 640);
    assert_eq!(c.train.threads, 3);
    assert_eq!(c.eval.analysis_every_steps, 20);
    assert_eq!(c.model.arch, Arch::VitSmall);
    assert_eq!(
        (c.model.patch_size, c.model.img_size, c.model.depth),
        (4, 64, 6)
    );
    assert_eq!(c.model.drop_path_rate, 0.2);
    assert_eq!(
        (c.head.out_dim, c.head.hidden_dim, c.head.bottleneck_dim),
        (4096, 256, 128)
    );
    assert!(c.head.use_bn && !c.head.norm_last_layer);
    assert_eq!(c.crops.global_crop_size, 64);
    assert_eq!(c.crops.global_crops_scale, [0.3, 0.9]);
    assert_eq!(
        (c.crops.local_crops_number, c.crops.local_crop_size),
        (4, 24)
    );
    assert_eq!(c.crops.local_crops_scale, [0.05, 0.3]);
    assert_eq!(c.optim.optimizer, OptimizerKind::Lars);
    assert_eq!((c.optim.lr, c.optim.min_lr), (0.3, 0.001));
    assert_eq!(c.optim.warmup_epochs, 2);
    assert_eq!(
        (c.optim.weight_decay, c.optim.weight_decay_end),
        (1e-6, 1e-5)
    );
    assert_eq!(c.optim.clip_grad, 1.0);
    assert_eq!(c.optim.freeze_last_layer, 3);
    assert_eq!(c.optim.momentum_teacher, 0.99);
    assert_eq!(c.loss.teacher_temp, 0.07);
    assert_eq!(c.loss.warmup_teacher_temp, 0.03);
    assert_eq!(c.loss.warmup_teacher_temp_epochs, 5);
}

#[test]
fn the_default_global_batch_is_batch_times_max_world_size() {
    let job = valid(&JobSpec {
        batch_size_per_worker: Some(24),
        min_world_size: Some(2),
        max_world_size: Some(3),
        ..demo()
    });
    assert_eq!(job.global_batch, 24 * 3);

    // The maximum defaults to the minimum.
    let job = valid(&JobSpec {
        min_world_size: Some(4),
        ..demo()
    });
    assert_eq!((job.min_world_size, job.max_world_size), (4, 4));
    assert_eq!(job.global_batch, 32 * 4);
}

#[test]
fn any_world_size_shares_a_global_batch_of_at_least_min_world_size() {
    // 9 over 2 or 4 workers gives uneven shares, which the step weights by sample count.
    let job = valid(&JobSpec {
        min_world_size: Some(2),
        max_world_size: Some(4),
        global_batch_size: Some(9),
        ..demo()
    });
    assert_eq!(job.global_batch, 9);
    assert_eq!(
        valid(&JobSpec {
            global_batch_size: Some(7),
            ..demo()
        })
        .global_batch,
        7
    );
    let e = validate_spec(
        &JobSpec {
            min_world_size: Some(4),
            max_world_size: Some(6),
            global_batch_size: Some(3),
            ..demo()
        },
        &configs(),
        MAX_WORKERS,
    )
    .unwrap_err();
    assert_eq!(e.field, "spec.global_batch_size");
    assert!(e.message.contains("min_world_size 4"), "{e}");
}

#[test]
fn messages_do_not_echo_huge_values() {
    let e = validate_spec(
        &JobSpec {
            preset: "x".repeat(20_000),
            ..demo()
        },
        &configs(),
        MAX_WORKERS,
    )
    .unwrap_err();
    assert_eq!(e.field, "spec.preset");
    assert!(e.message.len() < 200, "{}", e.message);
    let mut spec = demo();
    model(&mut spec).arch = "a".repeat(20_000);
    let e = validate_spec(&spec, &configs(), MAX_WORKERS).unwrap_err();
    assert_eq!(e.field, "spec.model.arch");
    assert!(e.message.len() < 300, "{}", e.message);
}

#[test]
fn display_names_the_field() {
    let e = validate_spec(
        &JobSpec {
            epochs: Some(0),
            ..demo()
        },
        &configs(),
        MAX_WORKERS,
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("invalid `spec.epochs`: "), "{e}");
}

#[test]
fn renamed_config_keys_are_spec_fields() {
    assert_eq!(spec_field("optim.lr"), "spec.optim.lr");
    assert_eq!(spec_field("train.max_steps"), "spec.max_steps");
    assert_eq!(spec_field("data.limit"), "spec.data_limit");
    assert_eq!(spec_field("train.threads"), "spec.threads_per_worker");
    assert_eq!(
        spec_field("eval.analysis_every_steps"),
        "spec.analysis_every_steps"
    );
    assert_eq!(spec_field("loss.teacher_temp"), "spec.optim.teacher_temp");
}

// ---- dataset_size ----------------------------------------------------------------------------

/// A 2×2 8-bit grey PNG.
const TINY_PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00, 0x00, 0x00, 0x00, 0x57, 0xdd, 0x52,
    0xf8, 0x00, 0x00, 0x00, 0x0e, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x70, 0x38, 0xc0, 0xe0,
    0x70, 0x00, 0x00, 0x05, 0x86, 0x02, 0x01, 0x42, 0x2b, 0x89, 0x55, 0x00, 0x00, 0x00, 0x00, 0x49,
    0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// A data root holding `tiny/`, an ImageFolder of two classes with two PNGs each.
fn tiny_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for class in ["a", "b"] {
        let dir = root.path().join("tiny").join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..2 {
            std::fs::write(dir.join(format!("{i}.png")), TINY_PNG).unwrap();
        }
    }
    root
}

fn tiny_job(extra: JobSpec) -> ValidJob {
    valid(&JobSpec {
        dataset: "tiny".into(),
        dataset_format: "image_folder".into(),
        data_limit: Some(0),
        ..extra
    })
}

#[test]
fn dataset_size_counts_a_tiny_image_folder() {
    let root = tiny_root();
    let job = tiny_job(JobSpec {
        global_batch_size: Some(2),
        ..demo()
    });
    assert_eq!(
        dataset_size(&job.config, job.global_batch, root.path()),
        Ok(4)
    );
    // The images are real ones.
    let ds = protodino_data::open_train(
        &protodino_config::DataConfig {
            train: root.path().join("tiny").to_str().unwrap().into(),
            ..job.config.data.clone()
        },
        root.path(),
    )
    .unwrap();
    assert_eq!(ds.load(0).unwrap().width, 2);
}

#[test]
fn dataset_size_applies_the_data_limit() {
    let root = tiny_root();
    let job = tiny_job(JobSpec {
        global_batch_size: Some(3),
        ..demo()
    });
    let mut cfg = job.config;
    cfg.data.limit = 3;
    assert_eq!(dataset_size(&cfg, 3, root.path()), Ok(3));
}

#[test]
fn a_global_batch_larger_than_the_set_names_global_batch_size() {
    let root = tiny_root();
    let job = tiny_job(JobSpec {
        global_batch_size: Some(5),
        ..demo()
    });
    let e = dataset_size(&job.config, job.global_batch, root.path()).unwrap_err();
    assert_eq!(e.field, "spec.global_batch_size");
    // The default global batch of cpu-demo (32) does not fit either.
    let job = tiny_job(demo());
    let e = dataset_size(&job.config, job.global_batch, root.path()).unwrap_err();
    assert_eq!(e.field, "spec.global_batch_size");
}

#[test]
fn a_missing_dataset_names_spec_dataset() {
    let root = tempfile::tempdir().unwrap();
    let job = valid(&JobSpec {
        dataset: "not/there".into(),
        ..demo()
    });
    let e = dataset_size(&job.config, job.global_batch, root.path()).unwrap_err();
    assert_eq!(e.field, "spec.dataset");
    // No provisioned demo set under this root either.
    let job = valid(&demo());
    let e = dataset_size(&job.config, job.global_batch, root.path()).unwrap_err();
    assert_eq!(e.field, "spec.dataset");
    assert!(e.message.contains("fashion-mnist"), "{e}");
}

#[test]
fn an_empty_dataset_names_spec_dataset() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("empty/a")).unwrap();
    let job = valid(&JobSpec {
        dataset: "empty".into(),
        ..demo()
    });
    let e = dataset_size(&job.config, 1, root.path()).unwrap_err();
    assert_eq!(e.field, "spec.dataset");
}

#[test]
fn dataset_size_reads_below_the_data_root_only() {
    let root = tiny_root();
    let mut cfg = tiny_job(demo()).config;
    cfg.data.train = root.path().join("tiny").to_str().unwrap().into();
    assert_eq!(
        dataset_size(&cfg, 1, root.path()).unwrap_err().field,
        "spec.dataset"
    );
    cfg.data.train = "tiny/../tiny".into();
    assert_eq!(
        dataset_size(&cfg, 1, root.path()).unwrap_err().field,
        "spec.dataset"
    );
    // `src` exists relative to the test's working directory (the crate) but not under the
    // root: it must not be found.
    cfg.data.train = "src".into();
    let e = dataset_size(&cfg, 1, root.path()).unwrap_err();
    assert_eq!(e.field, "spec.dataset");
    assert!(e.message.contains("cannot open"), "{e}");
}

#[test]
fn a_toml_configuration_layers_between_the_preset_and_the_fields() {
    let mut spec = JobSpec {
        preset: "default".into(),
        config_toml: std::fs::read_to_string(configs().join("cpu-demo.toml")).unwrap(),
        ..Default::default()
    };
    let mut want = demo_preset();
    want.train.output_dir = DEFAULT_CHECKPOINT_DIR.into();
    assert_eq!(
        valid(&spec).config,
        want,
        "default + cpu-demo.toml = the cpu-demo preset"
    );
    optim(&mut spec).lr = Some(1e-3);
    assert_eq!(
        valid(&spec).config.optim.lr,
        1e-3,
        "spec fields win over the TOML"
    );

    let field = |toml: &str| {
        validate_spec(
            &JobSpec {
                config_toml: toml.into(),
                ..demo()
            },
            &configs(),
            MAX_WORKERS,
        )
        .unwrap_err()
        .field
    };
    assert_eq!(field("[optim]\nlr = -1.0\n"), "spec.config_toml.optim.lr");
    assert_eq!(field("[optim]\nlr = \"fast\"\n"), "spec.config_toml");
    assert_eq!(field("[nonsense]\nx = 1\n"), "spec.config_toml");
    assert_eq!(field("[data]\ntrain = \"/etc\"\n"), "spec.config_toml");
    assert_eq!(
        field(&"#".repeat(MAX_CONFIG_TOML_BYTES + 1)),
        "spec.config_toml"
    );
}

#[test]
fn loss_variants_come_through_the_toml_configuration() {
    use protodino_config::{Centering, PrototypeKind};
    let with = |toml: &str| JobSpec {
        config_toml: toml.into(),
        ..demo()
    };
    let c = valid(&with(
        "[loss]\ncentering = \"sinkhorn\"\n[head]\nprototypes = \"vmf\"\nnorm_last_layer = false\n",
    ))
    .config;
    assert_eq!(c.loss.centering, Centering::Sinkhorn);
    assert_eq!(c.head.prototypes, PrototypeKind::Vmf);
    assert_eq!(valid(&demo()).config.loss.centering, Centering::Ema);

    let err = |spec: &JobSpec| validate_spec(spec, &configs(), MAX_WORKERS).unwrap_err();
    // An unknown name is INVALID_ARGUMENT naming `spec.config_toml`, the key and the value.
    for (toml, key, value) in [
        (
            "[loss]\ncentering = \"softmax\"\n",
            "loss.centering",
            "softmax",
        ),
        ("[head]\nprototypes = \"unit\"\n", "head.prototypes", "unit"),
    ] {
        let e = err(&with(toml));
        assert_eq!(e.field, "spec.config_toml", "{e}");
        assert!(e.message.contains(key) && e.message.contains(value), "{e}");
    }
    // vMF prototypes with frozen unit gains: the field that breaks the rule, where it was set.
    let e = err(&with(
        "[head]\nprototypes = \"vmf\"\nnorm_last_layer = true\n",
    ));
    assert_eq!(e.field, "spec.config_toml.head.norm_last_layer", "{e}");
    let mut spec = with("[head]\nprototypes = \"vmf\"\nnorm_last_layer = false\n");
    head(&mut spec).norm_last_layer = Some(true);
    assert_eq!(err(&spec).field, "spec.head.norm_last_layer");
}

#[test]
fn the_objective_comes_through_the_toml_configuration() {
    use protodino_config::Objective;
    let with = |toml: &str| JobSpec {
        config_toml: toml.into(),
        ..demo()
    };
    assert_eq!(valid(&demo()).config.loss.objective, Objective::Dino);
    let c = valid(&with(
        "[loss]\nobjective = \"ibot\"\n[ibot]\nshared_head = true\npred_ratio = [0.0, 0.3]\n",
    ))
    .config;
    assert_eq!(c.loss.objective, Objective::Ibot);
    assert!(c.ibot.shared_head);

    let err = |spec: &JobSpec| validate_spec(spec, &configs(), MAX_WORKERS).unwrap_err();
    // Each refusal is INVALID_ARGUMENT under `spec.config_toml`, naming the key.
    for (toml, key) in [
        ("[loss]\nobjective = \"mae\"\n", "loss.objective"),
        (
            "[loss]\nobjective = \"ibot\"\n[ibot]\nshared_head = true\npred_ratio = [1.5]\n",
            "ibot.pred_ratio",
        ),
        (
            "[loss]\nobjective = \"ibot\"\ncentering = \"sinkhorn\"\n[ibot]\nshared_head = true\n",
            "centering",
        ),
    ] {
        let e = err(&with(toml));
        assert!(e.field.starts_with("spec.config_toml"), "{toml}: {e}");
        assert!(
            e.field.contains(key) || e.message.contains(key),
            "{toml}: {e}"
        );
    }
}
