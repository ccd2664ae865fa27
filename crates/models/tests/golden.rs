//! Features and logits against the PyTorch reference (`reference/golden_models.py`): weights
//! written by PyTorch with the official names are loaded with `weights::load_into`, and the
//! outputs for the fixed input must match to 1e-5 relative (max |Δ| / max |ref|).

use std::path::PathBuf;

use protodino_config::HeadConfig;
use protodino_models::weights::{self, NamedTensors};
use protodino_models::{
    Backbone, DinoHead, ForwardCtx, ResNet, ResNetParams, VisionTransformer, VitParams,
};
use tch::{Kind, Tensor, nn};

fn fixture(name: &str) -> (NamedTensors, NamedTensors) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let (all, _) = weights::load(&path).expect("fixture loads");
    all.into_iter().partition(|(n, _)| !n.starts_with("out."))
}

fn output(outs: &[(String, Tensor)], name: &str) -> Tensor {
    outs.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("fixture has {name}"))
        .1
        .shallow_clone()
}

/// The reference script's input: x[i] = ((i·7919 + 13) mod 2003)/1001.5 − 1, f64 → f32.
fn fixed_input(shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 7919 + 13) % 2003) as f64 / 1001.5 - 1.0) as f32)
        .collect();
    Tensor::from_slice(&v).reshape(shape)
}

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size());
    let diff = (got - want).abs().max().double_value(&[]);
    diff / want.abs().max().double_value(&[])
}

fn check(label: &str, got: &Tensor, want: &Tensor) {
    let e = rel_err(got, want);
    println!("golden {label}: max rel error {e:.3e}");
    assert!(e < 1e-5, "{label}: relative error {e}");
}

fn vit_case(file: &str, patch: i64, img: i64, dim: i64, sizes: &[i64]) {
    let (params, outs) = fixture(file);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let p = VitParams {
        patch_size: patch,
        img_size: img,
        embed_dim: dim,
        depth: 2,
        num_heads: 3,
        mlp_ratio: 4.0,
        drop_path_rate: 0.1,
        in_chans: 3,
    };
    let vit = VisionTransformer::new(&(vs.root() / "backbone"), &p);
    weights::load_into(&vs, "", &params).expect("official names load");
    for &s in sizes {
        let x = fixed_input(&[2, 3, s, s]);
        let got = tch::no_grad(|| vit.forward(&x, &ForwardCtx::eval()));
        check(
            &format!("{file} crop {s}"),
            &got,
            &output(&outs, &format!("out.{s}")),
        );
    }
}

#[test]
fn vit_patch16_features_at_224_and_96() {
    vit_case("vit_p16.safetensors", 16, 224, 24, &[224, 96]);
}

#[test]
fn vit_patch4_features_at_32_and_16() {
    vit_case("vit_p4.safetensors", 4, 32, 48, &[32, 16]);
}

#[test]
fn dino_head_logits_eval_and_train() {
    let (params, outs) = fixture("head.safetensors");
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let cfg = HeadConfig {
        out_dim: 64,
        hidden_dim: 32,
        bottleneck_dim: 16,
        nlayers: 3,
        use_bn: true,
        norm_last_layer: false,
        prototypes: Default::default(),
    };
    let head = DinoHead::new(&(vs.root() / "head"), 24, &cfg, false);
    weights::load_into(&vs, "", &params).expect("official names load");
    let x = fixed_input(&[6, 24]);
    let eval = tch::no_grad(|| head.forward(&x, false));
    check("head eval", &eval, &output(&outs, "out.eval"));
    let train = tch::no_grad(|| head.forward(&x, true));
    check(
        "head train (batch stats)",
        &train,
        &output(&outs, "out.train"),
    );
    let rm = vs.variables()["head.mlp.1.running_mean"].shallow_clone();
    check(
        "head running_mean after train",
        &rm,
        &output(&outs, "out.train_running_mean0"),
    );
    let nbt = vs.variables()["head.mlp.1.num_batches_tracked"].int64_value(&[]);
    let loaded = params
        .iter()
        .find(|(n, _)| n == "head.mlp.1.num_batches_tracked")
        .map(|(_, t)| t.int64_value(&[]))
        .expect("buffer in file");
    assert_eq!(nbt, loaded + 1);
}

#[test]
fn narrow_resnet_features_eval_and_train() {
    let (params, outs) = fixture("resnet.safetensors");
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let p = ResNetParams {
        base_width: 4,
        ..ResNetParams::resnet18(false)
    };
    let net = ResNet::new(&vs.root(), &p);
    weights::load_into(&vs, "", &params).expect("torchvision names load");
    let x = fixed_input(&[3, 3, 64, 64]);
    let eval = tch::no_grad(|| net.features(&x, false));
    check("resnet eval", &eval, &output(&outs, "out.eval"));
    let train = tch::no_grad(|| net.features(&x, true));
    check("resnet train", &train, &output(&outs, "out.train"));
    let rm = vs.variables()["bn1.running_mean"].shallow_clone();
    check(
        "resnet bn1 running_mean",
        &rm,
        &output(&outs, "out.train_bn1_running_mean"),
    );
}

#[test]
fn resnet50_names_and_shapes_equal_torchvision() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resnet50_names.json");
    let text = std::fs::read_to_string(path).expect("fixture");
    let want: Vec<(String, Vec<i64>)> = serde_json::from_str(&text).expect("json");
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let net = ResNet::new(&vs.root(), &ResNetParams::resnet50(false));
    assert_eq!(net.embed_dim(), 2048);
    let mut got: Vec<(String, Vec<i64>)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect();
    got.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got, want_sorted);
    let nbt = &vs.variables()["layer1.0.downsample.1.num_batches_tracked"];
    assert_eq!(nbt.kind(), Kind::Int64);
}
