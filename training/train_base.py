"""Train a base model with minibatch Adam; the history feeds the training-curve plot."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ocd_core.targets import sample_loss


def train_base(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str = "cross_entropy",
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Fit ``model`` in place; returns per-epoch ``train_loss`` and (if given) ``val_loss``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    hist: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    for _ in tqdm(range(epochs), desc="base", disable=not progress, leave=False):
        model.train()
        perm = torch.randperm(x.shape[0], generator=g).to(x.device)
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            batch_loss = sample_loss(loss, model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            total += batch_loss.item() * idx.numel()
        hist["train_loss"].append(total / x.shape[0])
        if x_val is not None:
            model.eval()
            with torch.no_grad():
                hist["val_loss"].append(sample_loss(loss, model(x_val), y_val).item())
    model.eval()
    return hist
