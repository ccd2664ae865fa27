"""Golden values for protodino-dino, written from docs/algorithm.md §1–§2 (official DINO semantics).

Rerun (from the repository root) with the reference virtualenv's python:

    python crates/dino/reference/golden_step.py crates/dino/tests/fixtures

It writes small fixtures (safetensors + JSON) that the Rust tests in crates/dino/tests/golden.rs
compare against:

* loss.safetensors      DINO loss on random logits: pair terms, total, new centre, grad wrt the
                        student logits.
* koleo.safetensors     KoLeo-proto on a 64x16 weight-normalised prototype layer with a
                        duplicated prototype (and a second, exact duplicate): value, distances,
                        neighbour indices, grads wrt weight_v and weight_g.
* sgd_lars.safetensors  two SGD and two LARS steps (lr 0.1 then 0.05, wd 0.04 then 0.3) on a
                        weight [4, 3] and a bias [4].
* schedules.json        lr / wd / momentum / teacher temperature at chosen iterations for the
                        official ViT-S/16 recipe (numpy `cosine_scheduler` as in main_dino.py).
* tiny_step.safetensors + tiny_step.json
                        three full training steps of a tiny DINO network (see TinyDino below):
                        initial student weights (`init.student.*`), the batches, per-step losses and centres,
                        gradients after clipping (last step), student, teacher and AdamW state
                        after the last step. Steps 0 and 1 are in epoch 0 with the last layer
                        frozen, step 2 is in epoch 1.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------------------------
# Official-DINO pieces, restated from the spec.

def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0):
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_epochs, nepochs):
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                           np.ones(nepochs - warmup_epochs) * teacher_temp))


class DINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, temp_schedule, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = temp_schedule
        self.last_terms = []

    def forward(self, student_output, teacher_output, epoch):
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        self.last_terms = []
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                self.last_terms.append(loss.mean().item())
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / (len(teacher_output) * 1)  # world size 1
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def koleo_proto(w, eps=1e-8):
    """DINOv2 KoLeoLoss applied to the prototype rows (docs/algorithm.md §2.3)."""
    mu = F.normalize(w, eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = torch.mm(mu, mu.t())
        n = mu.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        _, idx = torch.max(dots, dim=1)
    distances = F.pairwise_distance(mu, mu[idx], p=2, eps=eps)
    return -torch.log(distances + eps).mean(), idx, distances


def clip_gradients(model, clip):
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


def get_params_groups(model):
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------
# The tiny network (mirrored in crates/dino/tests/support/tiny.rs).

class TinyBackbone(nn.Module):
    """adaptive-avg-pool to 2x2 -> Linear(12, 16) + cls_token -> GELU -> LayerNorm(eps 1e-6)."""

    def __init__(self, dim=16):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.embed = nn.Linear(12, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        x = self.embed(x) + self.cls_token.reshape(1, -1)
        return self.norm(F.gelu(x))


class TinyHead(nn.Module):
    """DINOHead(16, K=32, nlayers=3, hidden 24, bottleneck 8) with a weight-normalised layer."""

    def __init__(self, in_dim=16, out_dim=32, hidden=24, bottleneck=8, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)

    def prototypes(self):
        return torch._weight_norm(self.last_layer.weight_v, self.last_layer.weight_g, 0)


class MultiCropWrapper(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
        start_idx, output = 0, torch.empty(0)
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx:end_idx]))
            output = torch.cat((output, _out))
            start_idx = end_idx
        return self.head(output)


def st(d):
    return {k: v.detach().contiguous().clone() for k, v in d.items()}


# --------------------------------------------------------------------------------------------

def golden_loss(out):
    g = torch.Generator().manual_seed(11)
    B, V, K = 3, 4, 10
    teacher = torch.randn(2 * B, K, generator=g) * 3
    student = (torch.randn(V * B, K, generator=g) * 3).requires_grad_(True)
    center = torch.randn(1, K, generator=g)
    temp = 0.055
    loss_fn = DINOLoss(K, V, np.array([temp]), 0.1, 0.9)
    loss_fn.center = center.clone()
    loss = loss_fn(student, teacher, 0)
    loss.backward()
    save_file(st({"teacher_output": teacher, "student_output": student, "center": center,
                  "new_center": loss_fn.center, "loss": loss.reshape(1),
                  "pair_terms": torch.tensor(loss_fn.last_terms, dtype=torch.float32),
                  "grad_student": student.grad}),
              str(out / "loss.safetensors"), metadata={"teacher_temp": repr(temp)})


def golden_koleo(out):
    g = torch.Generator().manual_seed(12)
    K, d = 64, 16
    v = torch.randn(K, d, generator=g)
    v[40] = 2.5 * v[5]          # same direction, other norm: a duplicated prototype
    v[50] = v[51]               # an exact duplicate
    gw = torch.rand(K, 1, generator=g) + 0.5
    v.requires_grad_(True)
    gw.requires_grad_(True)
    w = torch._weight_norm(v, gw, 0)
    loss, idx, dist = koleo_proto(w)
    loss.backward()
    save_file(st({"weight_v": v, "weight_g": gw, "loss": loss.reshape(1), "nn_index": idx,
                  "distances": dist, "grad_v": v.grad, "grad_g": gw.grad}),
              str(out / "koleo.safetensors"))


def golden_schedules(out):
    # Official ViT-S/16 recipe: lr 5e-4, 64 x 16 GPUs, 800 epochs, 10 warm-up epochs, min_lr 1e-5,
    # wd 0.04 -> 0.4, momentum 0.996, teacher temp 0.04 -> 0.07 over 30 epochs;
    # 1 281 167 images / 1024 = 1251 iterations per epoch.
    epochs, ipe, bg = 800, 1251, 1024
    lr = cosine_scheduler(5e-4 * bg / 256.0, 1e-5, epochs, ipe, warmup_epochs=10)
    wd = cosine_scheduler(0.04, 0.4, epochs, ipe)
    mom = cosine_scheduler(0.996, 1, epochs, ipe)
    tt = teacher_temp_schedule(0.04, 0.07, 30, epochs)
    its = [0, 1, 7, 12509, 12510, 12511, 100000, 500000, epochs * ipe - 2, epochs * ipe - 1]
    eps = [0, 1, 15, 29, 30, 799]
    (out / "schedules.json").write_text(json.dumps({
        "epochs": epochs, "niter_per_epoch": ipe, "batch_size_per_worker": 64, "world_size": 16,
        "lr": 5e-4, "min_lr": 1e-5, "warmup_epochs": 10, "weight_decay": 0.04,
        "weight_decay_end": 0.4, "momentum_teacher": 0.996, "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30,
        "its": its, "lr_at": [lr[i] for i in its], "wd_at": [wd[i] for i in its],
        "momentum_at": [mom[i] for i in its], "epochs_at": eps,
        "teacher_temp_at": [tt[e] for e in eps]}, indent=1))


TINY = dict(B=2, L=2, G=16, LOC=8, K=32, epochs=3, ipe=2, lr=5.0, min_lr=1e-4, warmup_epochs=1,
            wd=0.04, wd_end=0.4, momentum_teacher=0.9, warmup_teacher_temp=0.04,
            teacher_temp=0.07, warmup_teacher_temp_epochs=2, clip=0.3, freeze_last_layer=1,
            koleo_weight=0.1, koleo_eps=1e-8, student_temp=0.1, center_momentum=0.9, steps=3)


def golden_tiny_step(out):
    c = TINY
    torch.manual_seed(7)
    student = MultiCropWrapper(TinyBackbone(), TinyHead(out_dim=c["K"], norm_last_layer=False))
    teacher = MultiCropWrapper(TinyBackbone(), TinyHead(out_dim=c["K"], norm_last_layer=True))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    init = {f"init.student.{k}": v.clone() for k, v in student.state_dict().items()}

    V = 2 + c["L"]
    bg = c["B"]
    lr_s = cosine_scheduler(c["lr"] * bg / 256.0, c["min_lr"], c["epochs"], c["ipe"],
                            warmup_epochs=c["warmup_epochs"])
    wd_s = cosine_scheduler(c["wd"], c["wd_end"], c["epochs"], c["ipe"])
    m_s = cosine_scheduler(c["momentum_teacher"], 1, c["epochs"], c["ipe"])
    tt = teacher_temp_schedule(c["warmup_teacher_temp"], c["teacher_temp"],
                               c["warmup_teacher_temp_epochs"], c["epochs"])
    dino_loss = DINOLoss(c["K"], V, tt, c["student_temp"], c["center_momentum"])
    optimizer = torch.optim.AdamW(get_params_groups(student))

    g = torch.Generator().manual_seed(13)
    tensors = dict(init)
    steps = []
    for it in range(c["steps"]):
        epoch = it // c["ipe"]
        glob = torch.randn(2, c["B"], 3, c["G"], c["G"], generator=g)
        loc = torch.randn(c["L"], c["B"], 3, c["LOC"], c["LOC"], generator=g)
        tensors[f"batch{it}.global_crops"] = glob
        tensors[f"batch{it}.local_crops"] = loc
        images = list(glob) + list(loc)
        for i, pg in enumerate(optimizer.param_groups):
            pg["lr"] = lr_s[it]
            if i == 0:
                pg["weight_decay"] = wd_s[it]
        teacher_output = teacher(images[:2])
        student_output = student(images)
        loss = dino_loss(student_output, teacher_output, epoch)
        kp, _, _ = koleo_proto(student.head.prototypes(), c["koleo_eps"])
        total = loss + c["koleo_weight"] * kp
        assert math.isfinite(total.item())
        optimizer.zero_grad()
        total.backward()
        clip_gradients(student, c["clip"])
        cancel_gradients_last_layer(epoch, student, c["freeze_last_layer"])
        optimizer.step()
        with torch.no_grad():
            m = m_s[it]
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        tensors[f"center{it}"] = dino_loss.center
        steps.append({"step": it, "epoch": epoch, "dino_loss": loss.item(),
                      "koleo_proto": kp.item(), "total": total.item(), "lr": float(lr_s[it]),
                      "weight_decay": float(wd_s[it]), "momentum": float(m_s[it]),
                      "teacher_temp": float(tt[epoch]), "pair_terms": dino_loss.last_terms})
        if it == c["steps"] - 1:
            for n, p in student.named_parameters():
                if p.grad is not None:
                    tensors[f"grad.student.{n}"] = p.grad
            for n, p in student.named_parameters():
                tensors[f"student.{n}"] = p
                if p in optimizer.state:
                    s = optimizer.state[p]
                    tensors[f"optimizer.exp_avg.student.{n}"] = s["exp_avg"]
                    tensors[f"optimizer.exp_avg_sq.student.{n}"] = s["exp_avg_sq"]
                    tensors[f"optimizer.step.student.{n}"] = s["step"].to(torch.int64).reshape(())
            for n, p in teacher.named_parameters():
                tensors[f"teacher.{n}"] = p
        if it == 0:
            for n, p in teacher.named_parameters():
                tensors[f"teacher_after0.{n}"] = p.detach().clone()
    save_file(st(tensors), str(out / "tiny_step.safetensors"))
    (out / "tiny_step.json").write_text(json.dumps({"config": c, "steps": steps}, indent=1))


class LARS(torch.optim.Optimizer):
    """The official DINO LARS (docs/algorithm.md §1.7): no decay and no trust ratio for 1-D params."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                if p.ndim != 1:
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.,
                                    torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one),
                                    one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def golden_sgd_lars(out):
    """Two steps of SGD (momentum 0.9, coupled wd) and LARS on a weight [4, 3] and a bias [4]."""
    g = torch.Generator().manual_seed(14)
    w0 = torch.randn(4, 3, generator=g)
    b0 = torch.randn(4, generator=g)
    grads = [(torch.randn(4, 3, generator=g), torch.randn(4, generator=g)) for _ in range(2)]
    tensors = {"w0": w0, "b0": b0}
    for i, (gw, gb) in enumerate(grads):
        tensors[f"grad{i}.w"] = gw
        tensors[f"grad{i}.b"] = gb
    for name, make in [("sgd", lambda groups: torch.optim.SGD(groups, lr=0, momentum=0.9)),
                       ("lars", lambda groups: LARS(groups))]:
        w = w0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        opt = make([{"params": [w]}, {"params": [b], "weight_decay": 0.0}])
        for i, (gw, gb) in enumerate(grads):
            for j, pg in enumerate(opt.param_groups):
                pg["lr"] = [0.1, 0.05][i]
                if j == 0:
                    pg["weight_decay"] = [0.04, 0.3][i]
            w.grad = gw.clone()
            b.grad = gb.clone()
            opt.step()
        tensors[f"{name}.w"] = w
        tensors[f"{name}.b"] = b
    save_file(st(tensors), str(out / "sgd_lars.safetensors"))


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    golden_loss(out)
    golden_koleo(out)
    golden_sgd_lars(out)
    golden_schedules(out)
    golden_tiny_step(out)


if __name__ == "__main__":
    main()
