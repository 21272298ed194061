"""LP-FT's warm start: the new linear layer fitted as a logistic-regression probe on the
network's frozen features before any layer trains (Kumar et al. 2022)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from heads.finetune.network import FineTuneNet, outputs


def warm_start_head(
    net: FineTuneNet,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader,
    device: torch.device,
) -> dict[str, Any]:
    """LP-FT: fit the new layer as a logistic-regression probe on the frozen features at this
    input size (raw features, so its weights stay small; C chosen on validation)."""
    from sklearn.linear_model import LogisticRegression

    Xtr, ytr = (t.numpy() for t in outputs(net.features, net, train_loader, device))
    Xva, yva = (t.numpy() for t in outputs(net.features, net, val_loader, device))
    best: tuple[float, float, Any] | None = None
    for C in (1e-3, 1e-2, 0.1, 1.0, 10.0):
        lr = LogisticRegression(C=C, max_iter=2000).fit(Xtr, ytr)
        acc = float(lr.score(Xva, yva))
        if best is None or acc > best[0]:
            best = (acc, C, lr)
    acc, C, lr = best
    W = np.zeros((net.head.out_features, Xtr.shape[1]), dtype=np.float32)
    b = np.zeros(net.head.out_features, dtype=np.float32)
    if len(lr.classes_) == 2 and lr.coef_.shape[0] == 1:  # binary form: logits (0, w.x + b)
        W[lr.classes_[1]], b[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
    else:
        W[lr.classes_], b[lr.classes_] = lr.coef_, lr.intercept_
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(W))
        net.head.bias.copy_(torch.from_numpy(b))
    return {"lp_val_accuracy": acc, "lp_C": C}
