use std::path::PathBuf;

use super::*;

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

#[test]
fn defaults_are_the_official_code_defaults() {
    let c = TrainConfig::defaults().unwrap();
    assert_eq!(c.head.out_dim, 65536);
    assert_eq!(c.crops.local_crops_number, 8);
    assert_eq!(c.crops.global_crops_scale, [0.4, 1.0]);
    assert_eq!(c.optim.clip_grad, 3.0);
    assert_eq!(c.loss.teacher_temp, 0.04);
    assert_eq!(c.n_crops(), 10);
}

#[test]
fn every_preset_loads_and_validates() {
    let mut n = 0;
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            TrainConfig::load_files(&[&path]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(
        n >= 4,
        "expected the default, CPU demo, ViT-S/16 and RN50 presets, found {n}"
    );
}

#[test]
fn official_vit_s16_recipe() {
    let c = TrainConfig::load_files(&[configs_dir().join("vit-s16-official.toml")]).unwrap();
    assert!(!c.head.norm_last_layer);
    assert_eq!(c.crops.local_crops_number, 10);
    assert_eq!(c.crops.global_crops_scale, [0.25, 1.0]);
    assert_eq!(c.optim.clip_grad, 0.0);
    assert_eq!(c.loss.warmup_teacher_temp_epochs, 30);
    assert_eq!(c.loss.teacher_temp, 0.07);
    assert_eq!(c.optim.min_lr, 1e-5);
    assert_eq!(c.train.epochs, 800);
}

#[test]
fn official_rn50_recipe() {
    let c = TrainConfig::load_files(&[configs_dir().join("rn50-official.toml")]).unwrap();
    assert_eq!(c.model.arch, Arch::Resnet50);
    assert_eq!(c.head.out_dim, 60000);
    assert!(c.head.use_bn);
    assert_eq!(c.optim.optimizer, OptimizerKind::Lars);
    assert_eq!(c.crops.local_crops_number, 6);
}

#[test]
fn unknown_key_in_a_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[optim]\nlearning_rate = 1e-3\n").unwrap();
    let e = TrainConfig::load_files(&[&p]).unwrap_err().to_string();
    assert!(e.contains("learning_rate"), "{e}");
}

#[test]
fn unknown_section_is_an_error() {
    let e = TrainConfig::from_toml_str("[optimiser]\nlr = 1.0\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("optimiser"), "{e}");
}

#[test]
fn out_of_range_value_names_the_field() {
    let e = TrainConfig::from_toml_str("[crops]\nlocal_crops_scale = [0.5, 0.2]\n").unwrap_err();
    match e {
        ConfigError::Invalid(f) => assert_eq!(f.field, "crops.local_crops_scale"),
        other => panic!("{other}"),
    }
    let e =
        TrainConfig::from_toml_str("[model]\npatch_size = 16\n[crops]\nlocal_crop_size = 100\n")
            .unwrap_err();
    assert!(e.to_string().contains("crops.local_crop_size"), "{e}");
}

#[test]
fn wrong_type_is_an_error() {
    let e = TrainConfig::from_toml_str("[train]\nepochs = \"many\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("epochs"), "{e}");
}

/// Environment overrides run in a child process so that the variables never leak into other
/// tests of this binary (which run on parallel threads).
#[test]
fn environment_overrides_keys() {
    if std::env::var_os("PROTODINO_CONFIG_ENV_CHILD").is_some() {
        let c = TrainConfig::load::<&str>(&[]).unwrap();
        assert_eq!(c.optim.lr, 0.00123);
        assert_eq!(c.crops.local_crops_number, 3);
        assert_eq!(c.crops.local_crops_scale, [0.1, 0.3]);
        assert_eq!(c.eval.unique_eps, vec![0.5, 0.25]);
        assert_eq!(c.train.device, "cuda:1");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "tests::environment_overrides_keys",
            "--nocapture",
        ])
        .env("PROTODINO_CONFIG_ENV_CHILD", "1")
        .env("PROTODINO__OPTIM__LR", "0.00123")
        .env("PROTODINO__CROPS__LOCAL_CROPS_NUMBER", "3")
        .env("PROTODINO__CROPS__LOCAL_CROPS_SCALE", "0.1,0.3")
        .env("PROTODINO__EVAL__UNIQUE_EPS", "0.5,0.25")
        .env("PROTODINO__TRAIN__DEVICE", "cuda:1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));

    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "tests::unknown_environment_key_is_an_error",
            "--nocapture",
        ])
        .env("PROTODINO_CONFIG_ENV_CHILD", "1")
        .env("PROTODINO__OPTIM__LEARNING_RATE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}

#[test]
fn unknown_environment_key_is_an_error() {
    if std::env::var_os("PROTODINO_CONFIG_ENV_CHILD").is_none() {
        return; // driven by `environment_overrides_keys`
    }
    let e = TrainConfig::load::<&str>(&[]).unwrap_err().to_string();
    assert!(e.contains("learning_rate"), "{e}");
}

#[test]
fn loss_variants_default_to_dino_and_parse() {
    let c = TrainConfig::defaults().unwrap();
    assert_eq!(c.loss.centering, Centering::Ema);
    assert_eq!(c.head.prototypes, PrototypeKind::Normalised);
    let c = TrainConfig::from_toml_str(
        "[loss]\ncentering = \"sinkhorn\"\n[head]\nprototypes = \"vmf\"\nnorm_last_layer = false\n",
    )
    .unwrap();
    assert_eq!(c.loss.centering, Centering::Sinkhorn);
    assert_eq!(c.head.prototypes, PrototypeKind::Vmf);
    assert_eq!(
        (c.loss.centering.name(), c.head.prototypes.name()),
        ("sinkhorn", "vmf")
    );
    // Older configuration records (a checkpoint's metadata) have neither key.
    let mut json = TrainConfig::defaults().unwrap().to_json();
    json["loss"].as_object_mut().unwrap().remove("centering");
    json["head"].as_object_mut().unwrap().remove("prototypes");
    let old: TrainConfig = serde_json::from_value(json).unwrap();
    assert_eq!(old, TrainConfig::defaults().unwrap());
}

#[test]
fn unknown_variant_names_are_errors_naming_the_key() {
    for (toml, key, value) in [
        (
            "[loss]\ncentering = \"softmax\"\n",
            "loss.centering",
            "softmax",
        ),
        ("[head]\nprototypes = \"unit\"\n", "head.prototypes", "unit"),
    ] {
        let e = TrainConfig::from_toml_str(toml).unwrap_err();
        assert!(matches!(e, ConfigError::Load(_)), "{e}");
        let e = e.to_string();
        println!("{e}");
        assert!(e.contains(key) && e.contains(value), "{e}");
    }
}

#[test]
fn vmf_prototypes_need_a_trained_gain() {
    let e = TrainConfig::from_toml_str("[head]\nprototypes = \"vmf\"\n").unwrap_err();
    match e {
        ConfigError::Invalid(f) => {
            assert_eq!(f.field, "head.norm_last_layer");
            assert!(f.message.contains("vmf"), "{}", f.message);
        }
        other => panic!("{other}"),
    }
}
