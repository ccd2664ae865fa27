//! Weight files (round trip, atomic write, `module.` prefix, missing/unknown/shape errors), the
//! official names of the multi-crop network, frozen/trainable `weight_g`, crop-major multi-crop
//! output and batch-split invariance of drop path.

use std::collections::BTreeMap;

use protodino_config::TrainConfig;
use protodino_models::weights::{self, WeightsError};
use protodino_models::{Backbone, ForwardCtx, MultiCrop, VisionTransformer, VitParams};
use tch::{Device, Kind, Tensor, nn};

fn tiny_cfg() -> TrainConfig {
    TrainConfig::from_toml_str(
        r#"
[model]
arch = "vit_tiny"
patch_size = 16
img_size = 32
drop_path_rate = 0.5
depth = 12
[head]
out_dim = 32
hidden_dim = 16
bottleneck_dim = 8
norm_last_layer = true
"#,
    )
    .expect("config")
}

#[test]
fn save_load_round_trip_keeps_dtype_values_and_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.safetensors");
    let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([5], (Kind::Double, Device::Cpu));
    let c = Tensor::randn([2, 2], (Kind::BFloat16, Device::Cpu));
    let d = Tensor::from_slice(&[7i64]).reshape([]);
    // a non-contiguous view is written from a contiguous copy
    let e = a.transpose(0, 1);
    let tensors = vec![
        ("a".to_string(), a.shallow_clone()),
        ("b".to_string(), b.shallow_clone()),
        ("c".to_string(), c.shallow_clone()),
        ("d".to_string(), d.shallow_clone()),
        ("e".to_string(), e.shallow_clone()),
    ];
    let mut meta = BTreeMap::new();
    meta.insert("step".to_string(), "12".to_string());
    meta.insert("config".to_string(), "{\"x\": 1}".to_string());
    weights::save(&path, &tensors, &meta).expect("save");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["w.safetensors".to_string()],
        "no temporary file left"
    );
    let (loaded, meta2) = weights::load(&path).expect("load");
    assert_eq!(meta2, meta);
    assert_eq!(loaded.len(), 5);
    for (name, want) in &tensors {
        let got = &loaded.iter().find(|(n, _)| n == name).expect("present").1;
        assert_eq!(got.kind(), want.kind(), "{name}");
        assert_eq!(got.size(), want.size(), "{name}");
        assert!(got.equal(want), "{name} values");
    }
    // overwrite in place: still one file, new content
    weights::save(&path, &tensors[..1], &BTreeMap::new()).expect("overwrite");
    let (loaded, meta3) = weights::load(&path).expect("load");
    assert_eq!(loaded.len(), 1);
    assert!(meta3.is_empty());
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
}

#[test]
fn failed_write_leaves_no_file_and_reports_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing-dir").join("w.safetensors");
    let t = vec![(
        "a".to_string(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    )];
    let err = weights::save(&path, &t, &BTreeMap::new()).expect_err("no such directory");
    assert!(matches!(err, WeightsError::Io { .. }), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").expect("write");
    assert!(matches!(
        weights::load(&garbage),
        Err(WeightsError::Format { .. })
    ));
}

fn network(vs: &nn::VarStore, student: bool) -> MultiCrop {
    let cfg = tiny_cfg();
    let name = if student { "student" } else { "teacher" };
    MultiCrop::new(&(vs.root() / name), &cfg.model, &cfg.head, student)
}

#[test]
fn multicrop_variables_have_official_names() {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = network(&vs, true);
    let vars = vs.variables();
    for name in [
        "student.backbone.cls_token",
        "student.backbone.pos_embed",
        "student.backbone.patch_embed.proj.weight",
        "student.backbone.patch_embed.proj.bias",
        "student.backbone.blocks.0.norm1.weight",
        "student.backbone.blocks.0.attn.qkv.weight",
        "student.backbone.blocks.0.attn.qkv.bias",
        "student.backbone.blocks.11.attn.proj.weight",
        "student.backbone.blocks.0.norm2.bias",
        "student.backbone.blocks.0.mlp.fc1.weight",
        "student.backbone.blocks.0.mlp.fc2.bias",
        "student.backbone.norm.weight",
        "student.head.mlp.0.weight",
        "student.head.mlp.2.bias",
        "student.head.mlp.4.weight",
        "student.head.last_layer.weight_g",
        "student.head.last_layer.weight_v",
    ] {
        assert!(vars.contains_key(name), "missing {name}");
    }
    // 12 blocks × 12 tensors + cls, pos, patch w/b, norm w/b + head 6 + g, v
    assert_eq!(vars.len(), 12 * 12 + 6 + 6 + 2);
    assert_eq!(vars["student.backbone.pos_embed"].size(), vec![1, 5, 192]);
    assert_eq!(vars["student.head.last_layer.weight_g"].size(), vec![32, 1]);
    // frozen g: not trainable, all ones, prototypes unit norm
    let g = &vars["student.head.last_layer.weight_g"];
    assert!(!g.requires_grad());
    assert!(g.equal(&Tensor::ones([32, 1], (Kind::Float, Device::Cpu))));
    let norms = net.head.prototypes().norm_scalaropt_dim(2, [1], false);
    let dev = (norms - 1.0).abs().max().double_value(&[]);
    assert!(dev < 1e-6, "unit-norm prototypes, deviation {dev}");
    assert!(net.head.prototypes().requires_grad());
    // v default init U(±1/√bottleneck)
    let v = &vars["student.head.last_layer.weight_v"];
    assert!(v.abs().max().double_value(&[]) <= 1.0 / 8f64.sqrt());
    assert!(vs.trainable_variables().len() == vars.len() - 1);
}

#[test]
fn model_depth_overrides_the_block_count() {
    let mut cfg = tiny_cfg();
    cfg.model.depth = 2;
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = MultiCrop::new(&(vs.root() / "student"), &cfg.model, &cfg.head, true);
    let vars = vs.variables();
    assert!(vars.contains_key("student.backbone.blocks.1.norm1.weight"));
    assert!(!vars.contains_key("student.backbone.blocks.2.norm1.weight"));
}

#[test]
fn trainable_weight_g_when_norm_last_layer_is_off() {
    let mut cfg = tiny_cfg();
    cfg.head.norm_last_layer = false;
    let vs = nn::VarStore::new(Device::Cpu);
    let _student = MultiCrop::new(&(vs.root() / "student"), &cfg.model, &cfg.head, true);
    let _teacher = MultiCrop::new(&(vs.root() / "teacher"), &cfg.model, &cfg.head, false);
    let vars = vs.variables();
    assert!(vars["student.head.last_layer.weight_g"].requires_grad());
    assert!(!vars["teacher.head.last_layer.weight_g"].requires_grad());
}

#[test]
fn load_into_accepts_module_prefix_and_names_errors() {
    let src_vs = nn::VarStore::new(Device::Cpu);
    let _src = network(&src_vs, true);
    let dst_vs = nn::VarStore::new(Device::Cpu);
    let dst = network(&dst_vs, true);
    // DDP layout of an official checkpoint: student.module.backbone.…
    let tensors: Vec<(String, Tensor)> = weights::named_tensors(&src_vs, "")
        .into_iter()
        .map(|(n, t)| (n.replacen("student.", "student.module.", 1), t))
        .collect();
    let mut with_teacher: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    with_teacher.push((
        "teacher.head.x".to_string(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let sub = nn::VarStore::new(Device::Cpu);
    let sub_net = MultiCrop::new(&sub.root(), &tiny_cfg().model, &tiny_cfg().head, true);
    weights::load_into(&sub, "student.", &with_teacher).expect("module. prefix accepted");
    let a = &src_vs.variables()["student.backbone.blocks.3.attn.qkv.weight"];
    let b = &sub.variables()["backbone.blocks.3.attn.qkv.weight"];
    assert!(a.equal(b));
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ya = tch::no_grad(|| _src.forward(std::slice::from_ref(&x), &ForwardCtx::eval()));
    let yb = tch::no_grad(|| sub_net.forward(std::slice::from_ref(&x), &ForwardCtx::eval()));
    assert!(
        ya.allclose(&yb, 0.0, 0.0, false),
        "same weights, same logits"
    );
    drop(dst);

    // missing
    let missing: Vec<_> = tensors
        .iter()
        .filter(|(n, _)| !n.ends_with("blocks.2.norm1.bias"))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    match weights::load_into(&sub, "student.", &missing) {
        Err(WeightsError::Missing { name }) => {
            assert_eq!(name, "student.backbone.blocks.2.norm1.bias")
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    // mis-shaped
    let mut shaped: Vec<_> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    for (n, t) in shaped.iter_mut() {
        if n.ends_with("head.last_layer.weight_v") {
            *t = Tensor::zeros([31, 8], (Kind::Float, Device::Cpu));
        }
    }
    match weights::load_into(&sub, "student.", &shaped) {
        Err(WeightsError::Shape { name, found, .. }) => {
            assert_eq!(name, "student.head.last_layer.weight_v");
            assert_eq!(found, vec![31, 8]);
        }
        other => panic!("expected Shape, got {other:?}"),
    }
    // unknown under the prefix: strict error, partial load returns it
    let mut unknown: Vec<_> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    unknown.push((
        "student.head.extra".to_string(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    match weights::load_into(&sub, "student.", &unknown) {
        Err(WeightsError::Unknown { name }) => assert_eq!(name, "student.head.extra"),
        other => panic!("expected Unknown, got {other:?}"),
    }
    let unused = weights::load_into_partial(&sub, "student.", &unknown).expect("partial");
    assert_eq!(unused, vec!["student.head.extra".to_string()]);
}

fn tiny_vit(drop_path_rate: f64) -> (nn::VarStore, VisionTransformer) {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = VitParams {
        patch_size: 4,
        img_size: 16,
        embed_dim: 24,
        depth: 3,
        num_heads: 3,
        mlp_ratio: 2.0,
        drop_path_rate,
        in_chans: 3,
    };
    let vit = VisionTransformer::new(&vs.root(), &p);
    (vs, vit)
}

#[test]
fn drop_path_is_invariant_to_batch_splits() {
    tch::manual_seed(3);
    let (_vs, vit) = tiny_vit(0.5);
    let x = Tensor::randn([8, 3, 16, 16], (Kind::Float, Device::Cpu));
    let ids: Vec<i64> = (100..108).collect();
    let ctx = |ids: &'static [i64]| ForwardCtx {
        train: true,
        seed: 11,
        step: 4,
        sample_ids: ids,
        crop: 2,
    };
    let all_ids: &'static [i64] = Box::leak(ids.clone().into_boxed_slice());
    let (lo, hi) = all_ids.split_at(4);
    let full = tch::no_grad(|| vit.forward(&x, &ctx(all_ids)));
    let a = tch::no_grad(|| vit.forward(&x.narrow(0, 0, 4), &ctx(lo)));
    let b = tch::no_grad(|| vit.forward(&x.narrow(0, 4, 4), &ctx(hi)));
    let split = Tensor::cat(&[a, b], 0);
    let diff = (&full - &split).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "batch split changed the result by {diff}");
    // the mask is real: other ids / steps / eval give different outputs
    let other: &'static [i64] = Box::leak((200..208).collect::<Vec<i64>>().into_boxed_slice());
    let moved = tch::no_grad(|| vit.forward(&x, &ctx(other)));
    assert!((&full - &moved).abs().max().double_value(&[]) > 1e-3);
    let eval = tch::no_grad(|| vit.forward(&x, &ForwardCtx::eval()));
    assert!((&full - &eval).abs().max().double_value(&[]) > 1e-3);
    // teacher (rate 0) ignores the training context
    let (_vs0, vit0) = tiny_vit(0.0);
    let t1 = tch::no_grad(|| vit0.forward(&x, &ctx(all_ids)));
    let t2 = tch::no_grad(|| vit0.forward(&x, &ForwardCtx::eval()));
    assert!(t1.equal(&t2));
}

#[test]
fn multicrop_output_is_crop_major_and_groups_by_resolution() {
    tch::manual_seed(5);
    let cfg = tiny_cfg();
    let vs = nn::VarStore::new(Device::Cpu);
    let net = MultiCrop::new(&(vs.root() / "teacher"), &cfg.model, &cfg.head, false);
    let b = 3;
    let crops: Vec<Tensor> = [32, 32, 16, 16, 16]
        .iter()
        .map(|&s| Tensor::randn([b, 3, s, s], (Kind::Float, Device::Cpu)))
        .collect();
    let out = tch::no_grad(|| net.forward(&crops, &ForwardCtx::eval()));
    assert_eq!(out.size(), vec![5 * b, 32]);
    for (c, crop) in crops.iter().enumerate() {
        let single = tch::no_grad(|| net.forward(std::slice::from_ref(crop), &ForwardCtx::eval()));
        let rows = out.narrow(0, c as i64 * b, b);
        let diff = (&rows - &single).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "crop {c}: {diff}");
    }
    // probe features: last-4 CLS (ViT-S recipe) and CLS+mean patch interleaved (ViT-B recipe)
    let x = &crops[0];
    let f4 = tch::no_grad(|| net.backbone.forward_probe(x, 4, false));
    assert_eq!(f4.size(), vec![b, 4 * 192]);
    let cls = tch::no_grad(|| net.backbone.forward(x, &ForwardCtx::eval()));
    assert!(f4.narrow(1, 3 * 192, 192).allclose(&cls, 1e-6, 1e-6, false));
    let f1 = tch::no_grad(|| net.backbone.forward_probe(x, 1, true));
    assert_eq!(f1.size(), vec![b, 2 * 192]);
    let even = f1.view([b, 192, 2]).select(2, 0);
    assert!(even.allclose(&cls, 1e-6, 1e-6, false));
}
