//! iBOT's network pieces: the ViT's mask token and masked forward, the iBOT head with and
//! without `last_layer2`, and their official variable names.

use protodino_config::TrainConfig;
use protodino_models::{ForwardCtx, MultiCrop, VisionTransformer, VitParams};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn vit(mask_token: bool) -> (VarStore, VisionTransformer) {
    tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let mut p = VitParams::tiny(4, 16);
    p.embed_dim = 16;
    p.num_heads = 2;
    p.depth = 2;
    let v = VisionTransformer::with_mask_token(&(vs.root() / "backbone"), &p, mask_token);
    (vs, v)
}

#[test]
fn mask_token_replaces_the_patch_embedding_before_the_position_embedding() {
    let (vs, v) = vit(true);
    let names: Vec<String> = vs.variables().into_keys().collect();
    assert!(names.iter().any(|n| n == "backbone.masked_embed"));
    let token = v.masked_embed.as_ref().unwrap();
    assert_eq!(token.size(), [1, 16]);
    assert_eq!(
        token.abs().max().double_value(&[]),
        0.0,
        "zeros, as official"
    );
    tch::no_grad(|| {
        let mut t = token.shallow_clone();
        t.copy_(&(Tensor::arange(16, (Kind::Float, Device::Cpu)) * 0.1).view([1, 16]));
    });
    let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let none = Tensor::zeros([2, 4, 4], (Kind::Bool, Device::Cpu));
    // No mask: the plain forward.
    let plain = v.forward_tokens(&x, &ForwardCtx::eval());
    let masked_none = v.forward_tokens_masked(&x, Some(&none), &ForwardCtx::eval());
    assert!(plain.allclose(&masked_none, 0.0, 0.0, false));
    // Patch (1, 2) of image 0 masked: its token before the blocks is mask token + position
    // embedding; everything of image 1 is unchanged.
    let mut m = vec![false; 32];
    m[4 + 2] = true;
    let mask = Tensor::from_slice(&m).view([2, 4, 4]);
    let tokens = v.prepare_tokens_masked(&x, Some(&mask));
    let want = token.view([16]) + v.pos_embed.get(0).get(1 + 6);
    assert!(tokens.get(0).get(1 + 6).allclose(&want, 1e-6, 1e-6, false));
    let plain_tokens = v.prepare_tokens(&x);
    assert!(tokens.get(1).equal(&plain_tokens.get(1)));
    assert!(
        tokens
            .get(0)
            .get(1 + 5)
            .equal(&plain_tokens.get(0).get(1 + 5))
    );
    // The mask token gets gradient through the masked position only.
    let out = v.forward_tokens_masked(&x, Some(&mask), &ForwardCtx::eval());
    out.sum(Kind::Float).backward();
    assert!(token.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn ibot_network_names_and_outputs() {
    let mut cfg = TrainConfig::defaults().unwrap();
    cfg.model.arch = protodino_config::Arch::VitTiny;
    cfg.model.patch_size = 4;
    cfg.model.img_size = 16;
    cfg.model.depth = 1;
    cfg.head.out_dim = 12;
    cfg.head.hidden_dim = 8;
    cfg.head.bottleneck_dim = 4;
    cfg.ibot.patch_out_dim = 10;
    cfg.ibot.shared_head = false;
    cfg.ibot.shared_head_teacher = false;
    let vs = VarStore::new(Device::Cpu);
    let student = MultiCrop::new_ibot(
        &(vs.root() / "student"),
        &cfg.model,
        &cfg.head,
        &cfg.ibot,
        true,
    )
    .unwrap();
    let names: Vec<String> = vs.variables().into_keys().collect();
    for n in [
        "student.backbone.masked_embed",
        "student.head.last_layer.weight_g",
        "student.head.last_layer2.weight_g",
        "student.head.last_layer2.weight_v",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing");
    }
    let crops: Vec<Tensor> = [16, 16, 8, 8]
        .iter()
        .map(|&s| Tensor::randn([3, 3, s, s], (Kind::Float, Device::Cpu)))
        .collect();
    let masks: Vec<Tensor> = (0..2)
        .map(|_| Tensor::rand([3, 4, 4], (Kind::Float, Device::Cpu)).lt(0.3))
        .collect();
    let out = student
        .forward_ibot(&crops, 2, Some(&masks), &ForwardCtx::eval())
        .unwrap();
    assert_eq!(out.cls.size(), [12, 12]);
    assert_eq!(out.patch.size(), [6, 16, 10]);
    // The CLS logits of the locals are the DINO forward's; of the globals, those of the masked
    // tokens' forward.
    let dino = student.forward(&crops[2..], &ForwardCtx::eval());
    assert!(out.cls.narrow(0, 6, 6).allclose(&dino, 1e-5, 1e-6, false));
    // Teacher with a shared head: no mask token, no last_layer2, patch logits of K rows.
    let tvs = VarStore::new(Device::Cpu);
    cfg.ibot.shared_head_teacher = true;
    cfg.ibot.patch_out_dim = 12;
    let teacher = MultiCrop::new_ibot(
        &(tvs.root() / "teacher"),
        &cfg.model,
        &cfg.head,
        &cfg.ibot,
        false,
    )
    .unwrap();
    let tnames: Vec<String> = tvs.variables().into_keys().collect();
    assert!(
        !tnames
            .iter()
            .any(|n| n.contains("masked_embed") || n.contains("last_layer2"))
    );
    let out = teacher
        .forward_ibot(&crops[..2], 2, None, &ForwardCtx::eval())
        .unwrap();
    assert_eq!(out.patch.size(), [6, 16, 12]);
    // ResNets have no patch tokens.
    cfg.model.arch = protodino_config::Arch::Resnet18;
    let rvs = VarStore::new(Device::Cpu);
    assert!(MultiCrop::new_ibot(&rvs.root(), &cfg.model, &cfg.head, &cfg.ibot, true).is_none());
}
