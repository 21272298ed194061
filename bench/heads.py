"""Benchmark: each head's full protocol (sweep on validation + refit) against one default fit.

    uv run python bench/heads.py                 # 20,000 x 1,280, 20 classes
    uv run python bench/heads.py --n 5000 --heads logreg knn

Data: generated like pooled CNN embeddings (non-negative, a few hundred effective dimensions,
each class a mixture of sub-clusters that overlap other classes'), hard enough that the heads
and their settings differ. Split 60/20/20. For each head it prints, from one run:

  protocol s   sweep over the grid x preprocessing on train/val, refit on train+val
  default s    one scikit-learn fit with default settings on train (the naive way)
  ratio        protocol / default
  test acc     of both, on the same test split

Where CUDA is present it also times torch L-BFGS logistic regression (heads/torch_linear.py)
against scikit-learn's at the same C, and checks that their predictions agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heads.classical import HEADS
from heads.evaluate import HeadSkipped, Splits, fit_head


def make_data(
    n: int, dim: int, classes: int, noise: float = 2.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Class-conditional mixtures in a 96-d latent space, lifted to `dim` with a ReLU. Class
    centres lie ~14 apart; `noise` (per-dimension std) sets how much the classes overlap."""
    rng = np.random.default_rng(seed)
    latent, subs = 96, 3
    centers = rng.normal(0, 1.0, (classes, subs, latent))
    lift = rng.normal(0, 1 / np.sqrt(latent), (latent, dim))
    y = rng.integers(0, classes, n)
    sub = rng.integers(0, subs, n)
    z = centers[y, sub] + rng.normal(0, noise, (n, latent))
    X = np.maximum(z @ lift + rng.normal(0, 0.3, (n, dim)), 0).astype(np.float32)
    return X, np.array([f"class{c:02d}" for c in y])


def default_fit(name: str, X: np.ndarray, y: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC, LinearSVC

    model = {
        "logreg": LogisticRegression(),
        "linear_svm": LinearSVC(),
        "rbf_svm": SVC(),
        "knn": KNeighborsClassifier(),
    }[name]
    return model.fit(X, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--noise", type=float, default=2.0, help="class overlap (default 2.0)")
    ap.add_argument("--heads", nargs="*", default=list(HEADS))
    args = ap.parse_args()

    X, y = make_data(args.n, args.dim, args.classes, args.noise)
    a, b = int(0.6 * args.n), int(0.8 * args.n)
    splits = Splits(X[:a], y[:a], X[a:b], y[a:b], X[b:], y[b:])
    print(
        f"data: {args.n} x {args.dim}, {args.classes} classes, noise {args.noise}; train {a}, "
        f"val {b - a}, test {args.n - b}"
    )
    print(
        f"{'head':<11} {'points':>6} {'protocol s':>10} {'default s':>9} {'ratio':>6} "
        f"{'test acc':>8} {'default acc':>11}  chosen"
    )
    for name in args.heads:
        t0 = time.perf_counter()
        try:
            r = fit_head(name, splits)
        except HeadSkipped as exc:
            print(f"{name:<11} {exc}")
            continue
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive = default_fit(name, splits.X_train, splits.y_train)
        base = time.perf_counter() - t0
        base_acc = float((naive.predict(splits.X_test) == splits.y_test).mean())
        chosen = ", ".join(f"{k}={v}" for k, v in r.params.items())
        print(
            f"{name:<11} {len(r.sweep):>6} {ours:>10.1f} {base:>9.1f} {ours / base:>6.1f} "
            f"{r.metrics['accuracy']:>8.3f} {base_acc:>11.3f}  {chosen}",
            flush=True,
        )

    import torch

    if torch.cuda.is_available():
        from sklearn.linear_model import LogisticRegression

        from heads.torch_linear import TorchLogisticRegression

        t0 = time.perf_counter()
        ref = LogisticRegression(C=1.0, max_iter=1000).fit(splits.X_train, splits.y_train)
        cpu = time.perf_counter() - t0
        TorchLogisticRegression(C=1.0, device="cuda").fit(X[:256], y[:256])  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpu = TorchLogisticRegression(C=1.0, device="cuda").fit(splits.X_train, splits.y_train)
        torch.cuda.synchronize()
        t_gpu = time.perf_counter() - t0
        agree = float((gpu.predict(splits.X_test) == ref.predict(splits.X_test)).mean())
        print(
            f"logreg C=1: scikit-learn {cpu:.2f} s, torch L-BFGS on "
            f"{torch.cuda.get_device_name()} {t_gpu:.2f} s ({cpu / t_gpu:.1f}x); "
            f"test predictions agree on {agree:.3%}"
        )
    else:
        print("no CUDA: torch L-BFGS vs scikit-learn timing skipped (agreement is tested on CPU)")


if __name__ == "__main__":
    main()
