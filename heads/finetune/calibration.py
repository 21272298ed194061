"""Calibration of the fine-tuned network: one temperature fitted on validation, then the test
split's probabilities at that temperature (the test split is scored once)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from heads.finetune.data import Loaders
from heads.finetune.network import FineTuneNet, logits


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): one scalar T minimising validation NLL."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def calibrated_test(
    net: FineTuneNet, loaders: Loaders, device: torch.device
) -> tuple[float, np.ndarray, torch.Tensor]:
    """The temperature fitted on validation, the test split's probabilities at it (float64,
    so they round-trip through JSON exactly) and the test labels."""
    val_logits, val_y = logits(net, loaders.val, device)
    temperature = fit_temperature(val_logits, val_y)
    test_logits, test_y = logits(net, loaders.test, device)
    proba = torch.softmax(test_logits / temperature, dim=1).double().numpy()  # JSON-exact
    return temperature, proba, test_y
