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

fn field_of(r: Result<TrainConfig, ConfigError>) -> String {
    match r {
        Err(ConfigError::Invalid(f)) => f.field,
        Err(e) => panic!("not a field error: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn objective_defaults_to_dino_and_ibot_has_the_official_defaults() {
    let c = TrainConfig::defaults().unwrap();
    assert_eq!(c.loss.objective, Objective::Dino);
    assert!(!c.is_ibot());
    let b = &c.ibot;
    assert_eq!(b.pred_ratio, vec![0.3]);
    assert_eq!(b.pred_ratio_var, vec![0.0]);
    assert_eq!(b.pred_shape, PredShape::Block);
    assert_eq!(b.patch_out_dim, 8192);
    assert!(!b.shared_head && b.shared_head_teacher);
    assert_eq!(
        (b.teacher_patch_temp, b.warmup_teacher_patch_temp),
        (0.07, 0.04)
    );
    assert_eq!((b.lambda1, b.lambda2, b.center_momentum2), (1.0, 1.0, 0.9));
    assert!((b.pred_aspect_ratio[1] - 1.0 / 0.3).abs() < 1e-15);
    assert_eq!(Objective::NAMES, ["dino", "ibot"]);
    assert_eq!(PredShape::from_name("rand"), Some(PredShape::Rand));
}

#[test]
fn ibot_section_parses_a_value_or_a_list_and_keeps_defaults() {
    let base = "[model]\narch = \"vit_tiny\"\n[head]\nout_dim = 64\n[loss]\nobjective = \"ibot\"\n";
    let c = TrainConfig::from_toml_str(&format!(
        "{base}[ibot]\npred_ratio = [0.0, 0.3]\npred_ratio_var = [0.0, 0.2]\nshared_head = true\n"
    ))
    .unwrap();
    assert!(c.is_ibot());
    assert_eq!(c.ibot.pred_ratio, vec![0.0, 0.3]);
    assert_eq!(c.ibot.ratio_vars(), vec![0.0, 0.2]);
    assert_eq!(c.ibot.student_patch_dim(64), 64);
    assert_eq!(c.ibot.teacher_patch_temp, 0.07);
    let c = TrainConfig::from_toml_str(&format!(
        "{base}[ibot]\npred_ratio = 0.4\npred_ratio_var = 0.1\npred_shape = \"rand\"\nshared_head = true\n"
    ))
    .unwrap();
    assert_eq!(c.ibot.pred_ratio, vec![0.4]);
    assert_eq!(c.ibot.ratio_vars(), vec![0.1]);
    assert_eq!(c.ibot.pred_shape, PredShape::Rand);
    // JSON (checkpoint metadata) round-trips.
    let back: TrainConfig = serde_json::from_value(c.to_json()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn ibot_validation_names_the_field() {
    let base = "[model]\narch = \"vit_tiny\"\n[head]\nout_dim = 64\n[loss]\nobjective = \"ibot\"\n";
    let case = |extra: &str| field_of(TrainConfig::from_toml_str(&format!("{base}{extra}")));
    // Default shared_head = false, shared_head_teacher = true: K₂ must equal K.
    assert_eq!(case(""), "ibot.patch_out_dim");
    let ok = "[ibot]\nshared_head = true\n";
    assert!(TrainConfig::from_toml_str(&format!("{base}{ok}")).is_ok());
    assert_eq!(
        case("[ibot]\nshared_head = true\npred_ratio = 1.5\n"),
        "ibot.pred_ratio[0]"
    );
    assert_eq!(
        case(
            "[ibot]\nshared_head = true\npred_ratio = [0.0, 0.3]\npred_ratio_var = [0.1, 0.2, 0.3]\n"
        ),
        "ibot.pred_ratio_var"
    );
    assert_eq!(
        case("[ibot]\nshared_head = true\npred_ratio = 0.1\npred_ratio_var = 0.2\n"),
        "ibot.pred_ratio_var[0]"
    );
    assert_eq!(
        case("[ibot]\nshared_head = true\npred_aspect_ratio = [2.0, 1.0]\n"),
        "ibot.pred_aspect_ratio"
    );
    assert_eq!(
        case("[ibot]\nshared_head = true\nshared_head_teacher = false\n"),
        "ibot.shared_head_teacher"
    );
    assert_eq!(
        case("[ibot]\nshared_head = true\nlambda2 = -1\n"),
        "ibot.lambda2"
    );
    assert_eq!(
        case("[ibot]\nshared_head = true\nteacher_patch_temp = 0\n"),
        "ibot.teacher_patch_temp"
    );
    let other = |head: &str, loss: &str| {
        field_of(TrainConfig::from_toml_str(&format!(
            "[model]\narch = \"vit_tiny\"\n[head]\nout_dim = 64\n{head}[loss]\nobjective = \"ibot\"\n{loss}[ibot]\nshared_head = true\n"
        )))
    };
    assert_eq!(other("", "centering = \"sinkhorn\"\n"), "loss.centering");
    assert_eq!(other("use_bn = true\n", ""), "head.use_bn");
    // Separate heads on both sides: any K₂.
    assert!(
        TrainConfig::from_toml_str(&format!(
            "{base}[ibot]\nshared_head_teacher = false\npatch_out_dim = 96\n"
        ))
        .is_ok()
    );
    let rn = "[model]\narch = \"resnet18\"\n[head]\nout_dim = 64\n[loss]\nobjective = \"ibot\"\n[ibot]\nshared_head = true\n";
    assert_eq!(field_of(TrainConfig::from_toml_str(rn)), "loss.objective");
    // DINO ignores the section, even an odd one.
    assert!(
        TrainConfig::from_toml_str(
            "[ibot]\npred_ratio = 0.3\nshared_head = true\nshared_head_teacher = false\n"
        )
        .is_ok()
    );
}

#[test]
fn unknown_objective_or_ibot_key_is_an_error_naming_it() {
    let e = TrainConfig::from_toml_str("[loss]\nobjective = \"mae\"\n").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("mae") && msg.contains("ibot"), "{msg}");
    let e = TrainConfig::from_toml_str("[ibot]\npred_ratioo = 0.3\n").unwrap_err();
    assert!(e.to_string().contains("pred_ratioo"), "{e}");
}

#[test]
fn official_ibot_vit_s16_recipe() {
    let c = TrainConfig::load_files(&[configs_dir().join("vit-s16-ibot-official.toml")]).unwrap();
    assert!(c.is_ibot());
    assert_eq!(c.head.out_dim, 8192);
    assert!(c.ibot.shared_head && c.ibot.shared_head_teacher);
    assert_eq!(c.ibot.pred_ratio, vec![0.0, 0.3]);
    assert_eq!(c.ibot.pred_ratio_var, vec![0.0, 0.2]);
    assert!(!c.head.norm_last_layer);
    assert_eq!(c.crops.local_crops_number, 10);
    assert_eq!(c.train.epochs, 800);
    let chart = configs_dir().join("../deploy/protodino/files/configs/vit-s16-ibot-official.toml");
    assert_eq!(
        std::fs::read_to_string(chart).unwrap(),
        std::fs::read_to_string(configs_dir().join("vit-s16-ibot-official.toml")).unwrap(),
        "the chart's copy must equal configs/"
    );
}
