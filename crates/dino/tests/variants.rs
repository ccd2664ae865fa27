//! The loss variants in the trainer (docs/algorithm.md §1.6, §1.10): Sinkhorn-Knopp's
//! collectives in a group and the centre it leaves alone, bit-identical resume with the
//! variants, the official checkpoint names of a vMF head, KoLeo-proto on vMF prototypes, and
//! the vMF correction on the models crate's DINO head.

mod support;

use std::collections::BTreeMap;

use protodino_config::{Centering, PrototypeKind};
use protodino_dino::{LocalReducer, koleo_proto};
use support::*;
use tch::{Kind, Tensor};

/// A "group" of two whose members hold the same values (every sum is the identity) that
/// records the bytes and the tensors it was handed.
struct CountingPair(std::cell::RefCell<(u64, usize)>);

impl protodino_dino::Reducer for CountingPair {
    fn world_size(&self) -> usize {
        2
    }

    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> protodino_dino::Result<()> {
        let bytes: u64 = tensors
            .iter()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum();
        let mut s = self.0.borrow_mut();
        s.0 += bytes;
        s.1 += 1;
        Ok(())
    }
}

fn variant_config(
    centering: Centering,
    prototypes: PrototypeKind,
) -> protodino_config::TrainConfig {
    let mut cfg = tiny_config();
    cfg.loss.centering = centering;
    cfg.head.prototypes = prototypes;
    cfg.optim.freeze_last_layer = 0;
    cfg
}

#[test]
fn sinkhorn_reduces_its_sums_in_the_forward_and_keeps_no_centre() {
    let k = 32u64;
    let n_params: u64 = {
        let t = tiny_trainer(tiny_config());
        t.trainable().iter().map(|(_, p)| p.numel() as u64).sum()
    };
    for (centering, calls, bytes) in [
        // Sample count; gradients with the centre's row sums and count.
        (Centering::Ema, 2, 4 + 4 * (n_params + k + 1)),
        // Sample count; shift and row count, then one K-vector per iteration; gradients alone.
        (
            Centering::Sinkhorn,
            2 + 1 + 3,
            4 + 4 * n_params + 4 * (k + 1) + 3 * 4 * k,
        ),
    ] {
        let mut t = tiny_trainer(variant_config(centering, PrototypeKind::Normalised));
        let pair = CountingPair(std::cell::RefCell::new((0, 0)));
        t.train_step(&synthetic_batch(0, 2, 2), &pair).unwrap();
        assert_eq!(*pair.0.borrow(), (bytes, calls), "{centering:?}");
        assert_eq!(t.last_timings.all_reduce_bytes, bytes, "{centering:?}");
        let centre_moved = t.dino_loss.center.abs().max().double_value(&[]) > 0.0;
        assert_eq!(centre_moved, centering == Centering::Ema, "{centering:?}");
    }
}

#[test]
fn a_group_with_identical_members_trains_like_one_member() {
    // With every member holding the same batch, the group's Sinkhorn-Knopp equals the lone one.
    let cfg = variant_config(Centering::Sinkhorn, PrototypeKind::Vmf);
    let mut alone = tiny_trainer(cfg.clone());
    let mut paired = tiny_trainer(cfg);
    let pair = CountingPair(std::cell::RefCell::new((0, 0)));
    for s in 0..2 {
        let a = alone
            .train_step(&synthetic_batch(s, 2, 2), &LocalReducer)
            .unwrap();
        let b = paired.train_step(&synthetic_batch(s, 2, 2), &pair).unwrap();
        assert!((a.dino_loss - b.dino_loss).abs() <= 1e-6 * a.dino_loss.abs());
    }
}

#[test]
fn resume_with_the_variants_is_bit_identical() {
    for (centering, prototypes) in [
        (Centering::Sinkhorn, PrototypeKind::Normalised),
        (Centering::Ema, PrototypeKind::Vmf),
        (Centering::Sinkhorn, PrototypeKind::Vmf),
    ] {
        let dir = TempDir::new(&format!("resume-{centering:?}-{prototypes:?}"));
        let cfg = variant_config(centering, prototypes);
        let mut straight = tiny_trainer(cfg.clone());
        for s in 0..4 {
            straight
                .train_step(&synthetic_batch(s, 2, 2), &LocalReducer)
                .unwrap();
        }
        let mut first = tiny_trainer(cfg.clone());
        for s in 0..2 {
            first
                .train_step(&synthetic_batch(s, 2, 2), &LocalReducer)
                .unwrap();
        }
        let path = dir.0.join("ckpt.safetensors");
        first.save_checkpoint(&path).unwrap();
        let mut resumed = tiny_trainer(cfg);
        resumed.load_checkpoint(&path).unwrap();
        for s in 2..4 {
            resumed
                .train_step(&synthetic_batch(s, 2, 2), &LocalReducer)
                .unwrap();
        }
        let a: BTreeMap<String, Tensor> = straight.checkpoint_tensors().into_iter().collect();
        let b: BTreeMap<String, Tensor> = resumed.checkpoint_tensors().into_iter().collect();
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, ta) in &a {
            assert!(
                ta.equal(&b[name]),
                "{centering:?} {prototypes:?}: {name} differs"
            );
        }
        // The official names: a trained gain and its optimiser state, the centre buffer.
        for name in [
            "student.head.last_layer.weight_g",
            "student.head.last_layer.weight_v",
            "teacher.head.last_layer.weight_g",
            "optimizer.exp_avg.student.head.last_layer.weight_g",
            "dino_loss.center",
        ] {
            assert!(a.contains_key(name), "missing {name}");
        }
    }
}

#[test]
fn koleo_proto_sees_only_the_directions_of_vmf_prototypes() {
    // Under the trainers' generator lock: a bare `manual_seed` here would race with the
    // initialisation of the trainers built by the other tests of this binary.
    let (v, g2) = protodino_dino::step::seeded(9, || {
        (
            Tensor::randn([40, 8], (Kind::Float, tch::Device::Cpu)),
            Tensor::rand([40, 1], (Kind::Float, tch::Device::Cpu)) * 20.0 + 0.1,
        )
    });
    let g1 = Tensor::ones([40, 1], (Kind::Float, tch::Device::Cpu));
    let g2 = g2.set_requires_grad(true);
    let unit = koleo_proto(&Tensor::internal_weight_norm(&v, &g1, 0), 1e-8, 16, None).unwrap();
    let vmf = koleo_proto(&Tensor::internal_weight_norm(&v, &g2, 0), 1e-8, 16, None).unwrap();
    assert!(unit.nn_index.equal(&vmf.nn_index));
    let d = (unit.loss.double_value(&[]) - vmf.loss.double_value(&[])).abs();
    assert!(d < 1e-5, "{d}");
    vmf.loss.backward();
    // No gradient into the norms (the concentrations) beyond rounding.
    assert!(g2.grad().abs().max().double_value(&[]) < 1e-5);
}

#[test]
fn the_models_crate_head_gets_the_vmf_correction() {
    // The real network: a vMF run on the models crate's ViT and DINO head takes finite steps,
    // trains the gains (so the concentrations move apart), and keeps the official names.
    let mut cfg = protodino_config::TrainConfig::from_toml_str(
        r#"
        [model]
        arch = "vit_tiny"
        patch_size = 4
        img_size = 16
        depth = 1
        [head]
        out_dim = 64
        hidden_dim = 32
        bottleneck_dim = 16
        norm_last_layer = false
        prototypes = "vmf"
        [loss]
        centering = "sinkhorn"
        [crops]
        global_crop_size = 16
        local_crop_size = 8
        local_crops_number = 2
        [optim]
        freeze_last_layer = 0
        lr = 0.5
        warmup_epochs = 0
        [train]
        batch_size_per_worker = 2
        epochs = 2
        "#,
    )
    .unwrap();
    cfg.train.threads = 1;
    let mut t = protodino_dino::DinoTrainer::from_config(cfg, 4, 1).unwrap();
    for s in 0..3 {
        let m = t
            .train_step(&synthetic_batch(s, 2, 2), &LocalReducer)
            .unwrap();
        assert!(m.total.is_finite());
    }
    let g = protodino_dino::params::named_parameters(&t.student_vs)
        .into_iter()
        .find(|(n, _)| n == "student.head.last_layer.weight_g")
        .map(|(_, p)| p)
        .unwrap();
    let spread = (g.max() - g.min()).double_value(&[]);
    assert!(spread > 0.0, "the gains did not move");
}
