"""Models written the way research code writes them, for ``ocd fit`` and ``training.api.ocd_pipeline``.

Each has a pattern that a plain ``model(x) -> logits`` pipeline trips on:
- ``ResearchLeNet``: the original OCD code's convention, ``logits, h = model(x)``: a tuple output,
  ``h`` detached and deep-copied inside forward (which ``torch.func.vmap`` cannot run), and a
  flatten written as a Python loop over the batch (which ``torch.fx`` cannot trace);
- ``DictMLP``: a forward that returns ``{"logits": ..., "embedding": ...}``;
- ``first`` / ``logits_of``: module-level output functions, for ``output=`` by function.

Serve their bundles with ``ocd serve --allow-module user_models`` and this directory on PYTHONPATH.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class ResearchLeNet(nn.Module):
    """LeNet5 for (B, 1, 28, 28) digits -> ``(logits (B, classes), h (B, 84))``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.stack([x[i].reshape(-1) for i in range(x.shape[0])])  # a Python loop: fx cannot trace it
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        h = copy.deepcopy(x.detach())  # as the original code: vmap cannot run it
        return self.fc3(x), h


class DictMLP(nn.Module):
    """(B, d_in) rows -> ``{"logits": (B, d_out), "embedding": (B, hidden)}``."""

    def __init__(self, d_in: int = 30, d_out: int = 2, hidden: int = 32):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        e = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return {"logits": self.head(e), "embedding": e}


class AudioNet(nn.Module):
    """(B, 1, n_mels, frames) log-mel -> ``(logits, features)``."""

    def __init__(self, num_classes: int = 3, n_mels: int = 40):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.out = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4).flatten(1)
        h = F.relu(self.fc1(h))
        return self.out(h), h


def first(out: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``output=first``: the first element of a tuple."""
    return out[0]


def logits_of(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """``output=logits_of``: a dict's "logits"."""
    return out["logits"]
