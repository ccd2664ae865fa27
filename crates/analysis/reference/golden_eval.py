"""Golden values for protodino-analysis: DINO weighted k-NN and MSN-style logistic regression.

Written from ALGORITHM.md §4.1 and §4.3 (no code copied). Run with the reference virtualenv's
python (torch, numpy, scikit-learn, safetensors), from the repository root:

    python crates/analysis/reference/golden_eval.py crates/analysis/tests/fixtures

It writes `knn_golden.safetensors` + `knn_golden.json` and `logreg_golden.safetensors` +
`logreg_golden.json` into the given directory (a few tens of KB in total).
"""

import json
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
