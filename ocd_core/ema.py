"""Exponential moving average of a module's parameters (original code: mu 0.9999)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow``, a frozen copy of ``model`` whose weights trail it: s <- mu·s + (1−mu)·w."""

    def __init__(self, model: nn.Module, mu: float = 0.9999):
        self.mu = mu
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p.detach(), 1 - self.mu)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)
