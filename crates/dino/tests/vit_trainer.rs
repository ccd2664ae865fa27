//! The trainer with the models crate's real networks (`MultiCrop`: ViT backbone + DINO head).

mod support;

use std::collections::BTreeMap;

use protodino_dino::LocalReducer;
use support::*;
use tch::Tensor;

/// The models crate's ViT (tiny, 32 px) behind the trainer: a step runs, drop path is active in
/// the student, and resume stays bit-identical (drop-path randomness depends only on
/// `(seed, step, sample id, crop, block)`).
#[test]
fn vit_multicrop_trainer_resumes_bit_identically() {
    use protodino_dino::DinoTrainer;
    let dir = TempDir::new("vit");
    let mut cfg = tiny_config();
    cfg.model.arch = protodino_config::Arch::VitTiny;
    cfg.model.patch_size = 8;
    cfg.model.img_size = 16;
    cfg.model.drop_path_rate = 0.1;
    cfg.head.out_dim = 64;
    cfg.head.hidden_dim = 32;
    cfg.head.bottleneck_dim = 16;
    let batch = |s: i64| synthetic_batch(s, 2, 2);
    let run = |steps: std::ops::Range<i64>, t: &mut DinoTrainer<protodino_models::MultiCrop>| {
        for s in steps {
            let m = t.train_step(&batch(s), &LocalReducer).unwrap();
            assert!(m.total.is_finite());
        }
    };
    let mut b = DinoTrainer::from_config(cfg.clone(), TINY_IPE, 1).unwrap();
    let init = dir.0.join("init.safetensors");
    b.save_checkpoint(&init).unwrap();
    let mut a = DinoTrainer::from_config(cfg.clone(), TINY_IPE, 1).unwrap();
    a.load_checkpoint(&init).unwrap();
    run(0..2, &mut a);
    run(0..1, &mut b);
    let path = dir.0.join("vit.safetensors");
    b.save_checkpoint(&path).unwrap();
    let mut c = DinoTrainer::from_config(cfg, TINY_IPE, 1).unwrap();
    c.load_checkpoint(&path).unwrap();
    run(1..2, &mut c);
    let sa: BTreeMap<String, Tensor> = a.checkpoint_tensors().into_iter().collect();
    let sc: BTreeMap<String, Tensor> = c.checkpoint_tensors().into_iter().collect();
    assert_eq!(sa.len(), sc.len());
    for (n, t) in &sa {
        assert!(t.equal(&sc[n]), "{n}");
    }
    for name in [
        "student.backbone.cls_token",
        "student.backbone.pos_embed",
        "student.backbone.blocks.0.attn.qkv.weight",
        "teacher.head.last_layer.weight_g",
    ] {
        assert!(sa.contains_key(name), "{name}");
    }
}
