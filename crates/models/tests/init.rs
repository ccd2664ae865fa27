//! Initialisation as the official code does it: trunc-normal(0.02) Linear weights and cls/pos
//! embeddings with zero biases, LayerNorm 1/0, PyTorch's default init for the patch conv and the
//! prototype `weight_v`, `weight_g` = 1, and the float32 drop-path schedule.

use protodino_models::{VisionTransformer, VitParams};
use tch::{Device, Tensor, nn};

fn std_of(t: &Tensor) -> f64 {
    t.std(true).double_value(&[])
}

#[test]
fn vit_init_follows_dino() {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let p = VitParams {
        depth: 2,
        ..VitParams::small(16, 224)
    };
    let _vit = VisionTransformer::new(&vs.root(), &p);
    let v = vs.variables();
    for name in [
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc1.weight",
        "pos_embed",
    ] {
        let s = std_of(&v[name]);
        assert!((s - 0.02).abs() < 0.001, "{name}: std {s}");
        assert!(v[name].abs().max().double_value(&[]) <= 2.0);
    }
    for name in [
        "blocks.0.attn.qkv.bias",
        "blocks.0.mlp.fc2.bias",
        "norm.bias",
    ] {
        assert_eq!(v[name].abs().max().double_value(&[]), 0.0, "{name}");
    }
    assert_eq!(v["blocks.1.norm2.weight"].min().double_value(&[]), 1.0);
    // patch conv: U(±1/√(3·16·16)), whose std is bound/√3
    let bound = 1.0 / (768f64).sqrt();
    let w = &v["patch_embed.proj.weight"];
    assert!(w.abs().max().double_value(&[]) <= bound);
    assert!((std_of(w) - bound / 3f64.sqrt()).abs() < 0.05 * bound);
    assert!(v["patch_embed.proj.bias"].abs().max().double_value(&[]) > 0.0);
}

#[test]
fn drop_path_rates_are_torch_float32_linspace() {
    let p = VitParams {
        drop_path_rate: 0.1,
        ..VitParams::small(16, 224)
    };
    let r = p.drop_path_rates();
    assert_eq!(r.len(), 12);
    assert_eq!(r[0], 0.0);
    assert_eq!(r[11], 0.1f32 as f64);
    // [x.item() for x in torch.linspace(0, 0.1, 12)], printed by PyTorch 2.11
    let torch = [
        0.0,
        0.00909090880304575,
        0.0181818176060915,
        0.027272727340459824,
        0.036363635212183,
        0.045454543083906174,
        0.054545458406209946,
        0.06363636255264282,
        0.0727272778749466,
        0.08181818574666977,
        0.09090909361839294,
        0.10000000149011612,
    ];
    assert_eq!(r, torch);
}
