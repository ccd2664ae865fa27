"""Golden values of the DINO loss variants (docs/algorithm.md §1.6, §1.10), written from the spec:
Sinkhorn-Knopp centring as DINOv2's `sinkhorn_knopp_teacher` (ALGORITHM.md §1.6) and the vMF
reading of the prototypes (ALGORITHM.md §1.10, reconstructed: logit_k = w_k.y/tau +
log C_d(|w_k|/tau) at each network's temperature, added after the centre).

Rerun (from the repository root) with the reference virtualenv's python (`cargo xtask pyref`):

    python crates/dino/reference/golden_variants.py crates/dino/tests/fixtures

It reuses the tiny network and the official-DINO pieces of golden_step.py and writes the
fixtures that crates/dino/tests/golden_variants.rs compares against:

* sinkhorn.safetensors   DINOv2 Sinkhorn-Knopp (3 iterations, world of one) on fixed teacher
                         logits: the targets, and the DINO loss against them with its gradient
                         wrt the student logits.
* vmf_logits.safetensors the vMF correction log C_d(|w_k|/tau) on fixed unnormalised prototypes
                         (d = 8 and d = 256), and the DINO-vMF loss of fixed student / teacher
                         features: value, pair terms, gradients wrt the student features and the
                         student prototypes (weight_v, weight_g).
* tiny_step_<variant>.safetensors + .json, variant in {sinkhorn, vmf, vmf_sinkhorn}
                         three full training steps of the tiny network of golden_step.py with the
                         variant, as tiny_step.* (initial weights with varied weight_g, batches,
                         per-step losses and centres, last gradients, final student, teacher and
                         AdamW state); the last layer is not frozen (freeze_last_layer = 0).

log C_d is computed in float64 with scipy.special.ive (every value here is in its normal range);
its derivative -I_{d/2}/I_{d/2-1} is the backward of a custom autograd function. As in the Rust
code, each set of K corrections has its maximum over k subtracted (a constant of the softmax
over k, so the loss and every gradient are unchanged) before it is cast to float32.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from scipy import special

from golden_step import (TINY, DINOLoss, MultiCropWrapper, TinyBackbone, TinyHead,
                         cancel_gradients_last_layer, clip_gradients, cosine_scheduler,
                         get_params_groups, koleo_proto, st, teacher_temp_schedule)


# --------------------------------------------------------------------------------------------
# DINOv2's Sinkhorn-Knopp teacher (world of one), restated from ALGORITHM.md §1.6.

@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3):
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()  # K x B
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)  # every prototype's total: 1/K
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)  # every sample's total: 1/B
        Q /= B
    Q *= B
    return Q.t()


def dino_loss_with_targets(student_output, targets, ncrops, student_temp, student_bias=None):
    """The DINO cross-entropy over the 2V-2 pairs against given teacher targets."""
    s = student_output / student_temp
    if student_bias is not None:
        s = s + student_bias
    s = s.chunk(ncrops)
    q = targets.detach().chunk(2)
    total, n, terms = 0, 0, []
    for iq, t in enumerate(q):
        for v in range(len(s)):
            if v == iq:
                continue
            loss = torch.sum(-t * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            terms.append(loss.item())
            total += loss
            n += 1
    return total / n, terms


# --------------------------------------------------------------------------------------------
# The vMF log-normaliser.

def log_c_np(d, kappa):
    """log C_d(kappa) and its derivative, float64, via ive (kappa > 0)."""
    nu = d / 2 - 1
    i0 = special.ive(nu, kappa)
    i1 = special.ive(nu + 1, kappa)
    assert np.all(np.isfinite(i0)) and np.all(i0 > 1e-300) and np.all(i1 > 1e-300)
    value = nu * np.log(kappa) - (nu + 1) * np.log(2 * np.pi) - (np.log(i0) + kappa)
    return value, -(i1 / i0)


class LogNormaliser(torch.autograd.Function):
    """log C_d(kappa) - max_k log C_d(kappa_k); backward: the derivative of log C_d."""

    @staticmethod
    def forward(ctx, kappa, d):
        value, deriv = log_c_np(d, kappa.detach().double().numpy())
        ctx.save_for_backward(torch.from_numpy(deriv).to(kappa.dtype))
        return torch.from_numpy(value - value.max()).to(kappa.dtype)

    @staticmethod
    def backward(ctx, grad):
        (deriv,) = ctx.saved_tensors
        return grad * deriv, None


def vmf_correction(prototypes, temp):
    """[1, K]: log C_d(|w_k|/temp) (minus its max), in the graph of the prototypes."""
    kappa = prototypes.norm(dim=1) / temp
    return LogNormaliser.apply(kappa, prototypes.shape[1]).unsqueeze(0)


# --------------------------------------------------------------------------------------------

def golden_sinkhorn(out):
    g = torch.Generator().manual_seed(21)
    B, V, K = 4, 3, 10
    # |Z_t|/tau up to ~50: DINOv2's plain exp stays finite in float32.
    teacher = torch.randn(2 * B, K, generator=g)
    student = (torch.randn(V * B, K, generator=g) * 3).requires_grad_(True)
    temp = 0.06
    targets = sinkhorn_knopp_teacher(teacher, temp)
    assert torch.isfinite(targets).all()
    loss, terms = dino_loss_with_targets(student, targets, V, 0.1)
    loss.backward()
    save_file(st({"teacher_output": teacher, "student_output": student, "targets": targets,
                  "loss": loss.reshape(1), "pair_terms": torch.tensor(terms),
                  "grad_student": student.grad}),
              str(out / "sinkhorn.safetensors"), metadata={"teacher_temp": repr(temp)})


def golden_vmf_logits(out):
    g = torch.Generator().manual_seed(22)
    tensors = {}
    # The correction alone, d = 8 (norms 0.05 to 6) and d = 256 (norms 0.4 to 60, where ive
    # stays in range), at tau = 0.1 and 0.04.
    for d, lo, hi in ((8, 0.05, 6.0), (256, 0.4, 60.0)):
        K = 16
        v = torch.randn(K, d, generator=g, dtype=torch.float64)
        norms = torch.logspace(math.log10(lo), math.log10(hi), K, dtype=torch.float64)
        w = v / v.norm(dim=1, keepdim=True) * norms.unsqueeze(1)
        tensors[f"d{d}.prototypes"] = w.float()
        for temp in (0.1, 0.04):
            value, deriv = log_c_np(d, (w.float().double().norm(dim=1) / temp).numpy())
            tensors[f"d{d}.log_c.t{temp}"] = torch.from_numpy(value)
            tensors[f"d{d}.dlog_c.t{temp}"] = torch.from_numpy(deriv)
    # The DINO-vMF loss on fixed bottleneck features (unit rows) and prototypes.
    B, V, K, d = 3, 4, 12, 8
    tau_s, tau_t = 0.1, 0.05
    ys = F.normalize(torch.randn(V * B, d, generator=g), dim=1).requires_grad_(True)
    yt = F.normalize(torch.randn(2 * B, d, generator=g), dim=1)
    v_s = torch.randn(K, d, generator=g).requires_grad_(True)
    g_s = (torch.rand(K, 1, generator=g) * 2.5 + 0.3).requires_grad_(True)
    w_t = torch._weight_norm(torch.randn(K, d, generator=g), torch.rand(K, 1, generator=g) + 0.5, 0)
    center = torch.randn(1, K, generator=g) * 0.2
    w_s = torch._weight_norm(v_s, g_s, 0)
    student_output = ys @ w_s.t()
    teacher_output = yt @ w_t.t()
    targets = F.softmax((teacher_output - center) / tau_t + vmf_correction(w_t, tau_t), dim=-1)
    loss, terms = dino_loss_with_targets(student_output, targets, V, tau_s,
                                         vmf_correction(w_s, tau_s))
    loss.backward()
    tensors.update({"ys": ys, "yt": yt, "weight_v": v_s, "weight_g": g_s, "teacher_prototypes": w_t,
                    "center": center, "targets": targets, "loss": loss.reshape(1),
                    "pair_terms": torch.tensor(terms), "grad_ys": ys.grad, "grad_v": v_s.grad,
                    "grad_g": g_s.grad})
    save_file(st(tensors), str(out / "vmf_logits.safetensors"),
              metadata={"student_temp": repr(tau_s), "teacher_temp": repr(tau_t)})


def golden_tiny_variant(out, name, sinkhorn, vmf):
    c = dict(TINY, freeze_last_layer=0, centering="sinkhorn" if sinkhorn else "ema",
             prototypes="vmf" if vmf else "normalised")
    torch.manual_seed(7)
    student = MultiCropWrapper(TinyBackbone(), TinyHead(out_dim=c["K"], norm_last_layer=False))
    teacher = MultiCropWrapper(TinyBackbone(), TinyHead(out_dim=c["K"], norm_last_layer=True))
    gen = torch.Generator().manual_seed(23)
    with torch.no_grad():
        # Varied gains, so the concentrations differ between prototypes from the start.
        student.head.last_layer.weight_g.copy_(torch.rand(c["K"], 1, generator=gen) * 1.5 + 0.5)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    init = {f"init.student.{k}": v.clone() for k, v in student.state_dict().items()}

    V = 2 + c["L"]
    lr_s = cosine_scheduler(c["lr"] * c["B"] / 256.0, c["min_lr"], c["epochs"], c["ipe"],
                            warmup_epochs=c["warmup_epochs"])
    wd_s = cosine_scheduler(c["wd"], c["wd_end"], c["epochs"], c["ipe"])
    m_s = cosine_scheduler(c["momentum_teacher"], 1, c["epochs"], c["ipe"])
    tt = teacher_temp_schedule(c["warmup_teacher_temp"], c["teacher_temp"],
                               c["warmup_teacher_temp_epochs"], c["epochs"])
    dino_loss = DINOLoss(c["K"], V, tt, c["student_temp"], c["center_momentum"])
    optimizer = torch.optim.AdamW(get_params_groups(student))

    g = torch.Generator().manual_seed(24)
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
        temp = tt[epoch]
        teacher_output = teacher(images[:2])
        student_output = student(images)
        with torch.no_grad():
            t_bias = vmf_correction(teacher.head.prototypes(), temp) if vmf else 0.0
        if sinkhorn:
            # The teacher's vMF correction is included here; Sinkhorn-Knopp removes it exactly.
            targets = sinkhorn_knopp_teacher(teacher_output + temp * t_bias, temp)
        else:
            targets = F.softmax((teacher_output - dino_loss.center) / temp + t_bias, dim=-1)
        s_bias = vmf_correction(student.head.prototypes(), c["student_temp"]) if vmf else None
        loss, terms = dino_loss_with_targets(student_output, targets, V, c["student_temp"],
                                             s_bias)
        if not sinkhorn:
            dino_loss.update_center(teacher_output)
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
                      "teacher_temp": float(temp), "pair_terms": terms})
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
    save_file(st(tensors), str(out / f"tiny_step_{name}.safetensors"))
    (out / f"tiny_step_{name}.json").write_text(json.dumps({"config": c, "steps": steps},
                                                           indent=1))


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    golden_sinkhorn(out)
    golden_vmf_logits(out)
    golden_tiny_variant(out, "sinkhorn", sinkhorn=True, vmf=False)
    golden_tiny_variant(out, "vmf", sinkhorn=False, vmf=True)
    golden_tiny_variant(out, "vmf_sinkhorn", sinkhorn=True, vmf=True)


if __name__ == "__main__":
    main()
