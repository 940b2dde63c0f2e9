"""Tabular MLP; OCD adapts its first layer ``fc1`` (as the paper does for tabular data)."""

from __future__ import annotations

import torch
from torch import nn


class TabularMLP(nn.Module):
    """x: (B, d_in) preprocessed row -> (B, d_out) logits or standardised regression output."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 64, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d_out)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        x = self.drop(self.act(self.fc2(x)))
        return self.out(x)
