"""Small CNN on log-mel features; OCD adapts ``fc1``, its next-to-last layer (as LeNet5's fc1:
a Linear layer, so per-sample deltas are near rank-1 and the adapted forward is one bmm)."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import MaxPool2x2


class AudioCNN(nn.Module):
    """x: (B, 1, n_mels, frames) normalised log-mel -> logits (B, num_classes)."""

    def __init__(self, num_classes: int = 10, width: int = 16, hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.pool = MaxPool2x2()
        self.act = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(4 * width, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = self.gap(self.act(self.conv3(x))).flatten(1)
        return self.fc2(self.act(self.fc1(x)))
