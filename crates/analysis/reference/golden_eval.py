"""Golden values for protodino-analysis: DINO weighted k-NN, the linear probe (torch.optim.SGD +
CosineAnnealingLR) and MSN-style logistic regression.

Written from docs/algorithm.md §4.1 and §4.3 (no code copied). Run with the reference virtualenv's
python (torch, numpy, scikit-learn, safetensors), from the repository root:

    python crates/analysis/reference/golden_eval.py crates/analysis/tests/fixtures

It writes `knn_golden.*`, `linear_golden.*` and `logreg_golden.*` (safetensors + JSON) into
the given directory (a few tens of KB in total).

The linear probe draws its initial weights and its per-epoch shuffles from the same SplitMix64
streams as the Rust side (`src/rng.rs`, re-implemented below), so the whole trajectory can be
compared; everything else is plain PyTorch.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression


def knn_dino(train_f, train_y, test_f, test_y, k, T, num_classes, num_chunks=100):
    """DINO eval_knn: normalised features, top-k cosine neighbours, weights exp(s/T)."""
    train_f = torch.nn.functional.normalize(train_f, dim=1, p=2)
    test_f = torch.nn.functional.normalize(test_f, dim=1, p=2)
    train_t = train_f.t()
    n = test_f.shape[0]
    per_chunk = max(1, n // num_chunks)
    top1 = top5 = 0
    for s in range(0, n, per_chunk):
        feats = test_f[s : min(s + per_chunk, n)]
        targets = test_y[s : min(s + per_chunk, n)]
        b = targets.shape[0]
        sim = torch.mm(feats, train_t)
        dist, idx = sim.topk(k, largest=True, sorted=True)
        neigh = torch.gather(train_y.view(1, -1).expand(b, -1), 1, idx)
        onehot = torch.zeros(b * k, num_classes)
        onehot.scatter_(1, neigh.view(-1, 1), 1)
        w = dist.clone().div_(T).exp_()
        probs = torch.sum(onehot.view(b, -1, num_classes) * w.view(b, -1, 1), 1)
        # Stable sort so that tied (vote-less) classes rank by index, as the Rust side does.
        _, pred = probs.sort(stable=True, dim=1, descending=True)
        correct = pred.eq(targets.view(-1, 1))
        top1 += correct.narrow(1, 0, 1).sum().item()
        top5 += correct.narrow(1, 0, min(5, k, num_classes)).sum().item()
    return top1 * 100.0 / n, top5 * 100.0 / n


M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


class SplitMix64:
    """SplitMix64 exactly as crates/analysis/src/rng.rs."""

    def __init__(self, seed):
        self.state = seed & M64

    @classmethod
    def derive(cls, seed, words):
        s = cls(seed)
        state = s.next_u64()
        for w in words:
            state = cls(state ^ ((w * GOLDEN) & M64)).next_u64()
        s.state = state
        return s

    def next_u64(self):
        self.state = (self.state + GOLDEN) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def next_f64(self):
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))

    def below(self, n):
        threshold = ((-n) & M64) % n
        while True:
            m = self.next_u64() * n
            if (m & M64) >= threshold:
                return m >> 64

    def normal(self):
        u1 = 1.0 - self.next_f64()
        u2 = self.next_f64()
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)

    def permutation(self, n):
        p = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.below(i + 1)
            p[i], p[j] = p[j], p[i]
        return p


def linear_probe(x, y, xv, yv, epochs, lr, batch, seed):
    """DINO eval_linear's classifier and optimiser on fixed features."""
    n, d = x.shape
    c = int(max(y.max(), yv.max())) + 1
    init = SplitMix64.derive(seed, [0x117EA2])
    w = torch.tensor([init.normal() * 0.01 for _ in range(c * d)], dtype=torch.float64)
    lin = torch.nn.Linear(d, c)
    with torch.no_grad():
        lin.weight.copy_(w.float().view(c, d))
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    out = []
    for epoch in range(epochs):
        order = torch.tensor(SplitMix64.derive(seed, [1, epoch]).permutation(n))
        loss_sum = 0.0
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            loss = torch.nn.functional.cross_entropy(lin(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
        sched.step()
        with torch.no_grad():
            top = lin(xv).topk(min(5, c), dim=1).indices
            correct = top.eq(yv.view(-1, 1))
            top1 = correct[:, :1].sum().item() * 100.0 / len(yv)
            top5 = correct.sum().item() * 100.0 / len(yv)
        out.append({"epoch": epoch, "train_loss": loss_sum / n, "val_top1": top1, "val_top5": top5})
    return out


def main(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)

    # k-NN: 10 classes in 16-d, class means plus noise so accuracies are neither 0 nor 100.
    C, D, n_train, n_test = 10, 16, 240, 157
    means = torch.randn(C, D, generator=g)
    train_y = torch.randint(0, C, (n_train,), generator=g)
    test_y = torch.randint(0, C, (n_test,), generator=g)
    train_f = means[train_y] + 1.5 * torch.randn(n_train, D, generator=g)
    test_f = means[test_y] + 1.5 * torch.randn(n_test, D, generator=g)
    results = []
    for k in [10, 20, 100, 200]:
        t1, t5 = knn_dino(train_f, train_y, test_f, test_y, k, 0.07, C)
        results.append({"k": k, "top1": t1, "top5": t5})
    save_file(
        {"train_features": train_f, "train_labels": train_y,
         "test_features": test_f, "test_labels": test_y},
        str(out / "knn_golden.safetensors"),
    )
    (out / "knn_golden.json").write_text(
        json.dumps({"temperature": 0.07, "num_chunks": 100, "results": results}, indent=1))

    # Linear probe: 3 overlapping classes in 6-d, batches of 32 over 120 samples (a partial batch).
    lg = torch.Generator().manual_seed(99)
    lmeans = 1.5 * torch.randn(3, 6, generator=lg)
    ly = torch.randint(0, 3, (120,), generator=lg)
    lyv = torch.randint(0, 3, (45,), generator=lg)
    lx = lmeans[ly] + torch.randn(120, 6, generator=lg)
    lxv = lmeans[lyv] + torch.randn(45, 6, generator=lg)
    lin_cfg = {"epochs": 8, "lr": 0.05, "batch": 32, "seed": 5}
    epochs = linear_probe(lx, ly, lxv, lyv, **lin_cfg)
    save_file(
        {"train_features": lx, "train_labels": ly, "val_features": lxv, "val_labels": lyv},
        str(out / "linear_golden.safetensors"),
    )
    (out / "linear_golden.json").write_text(json.dumps({**lin_cfg, "epochs_log": epochs}, indent=1))

    # Logistic regression: cyanure preprocessing, sklearn multinomial with C = 1/lambd.
    rng = np.random.default_rng(7)
    C2, D2, n2, n2_test, lambd = 4, 8, 60, 40, 0.5
    centres = rng.normal(size=(C2, D2))
    y = rng.integers(0, C2, n2)
    yt = rng.integers(0, C2, n2_test)
    x = centres[y] + 0.8 * rng.normal(size=(n2, D2)) + 3.0
    xt = centres[yt] + 0.8 * rng.normal(size=(n2_test, D2)) + 3.0
    mean = x.mean(axis=0, keepdims=True)

    def prep(a):
        a = a - mean
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    clf = LogisticRegression(C=1.0 / lambd, fit_intercept=False, tol=1e-12, max_iter=100000)
    clf.fit(prep(x), y)
    acc = float((clf.predict(prep(xt)) == yt).mean() * 100.0)
    save_file(
        {"train_features": torch.tensor(x), "train_labels": torch.tensor(y),
         "test_features": torch.tensor(xt), "test_labels": torch.tensor(yt),
         "coef": torch.tensor(np.ascontiguousarray(clf.coef_))},
        str(out / "logreg_golden.safetensors"),
    )
    (out / "logreg_golden.json").write_text(
        json.dumps({"lambd": lambd, "num_classes": C2, "test_top1": acc}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
