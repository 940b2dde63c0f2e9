"""Exponential moving average of a module's parameters (original code: mu 0.9999)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow``, a frozen copy of ``model`` whose weights trail it: s <- mu·s + (1−mu)·w.

    With warm-up (the usual fix for short runs), mu_n = min(mu, (1 + n) / (10 + n)) at update n,
    so the random initial weights do not linger in the average (0.999^1500 = 22% would).
    """

    def __init__(self, model: nn.Module, mu: float = 0.9999, warmup: bool = True):
        self.mu, self.warmup, self.num_updates = mu, warmup, 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        n = self.num_updates
        mu = min(self.mu, (1 + n) / (10 + n)) if self.warmup else self.mu
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p.detach(), 1 - mu)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)
