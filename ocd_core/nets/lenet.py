"""LeNet5 as in the original OCD code: conv 6-16-120, fc1 120->84, fc2 84->10."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import MaxPool2x2


class LeNet5(nn.Module):
    """x: (B, 1, 28, 28) normalised image -> logits (B, num_classes). OCD layer: ``fc1``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)  # 28 -> 28 (as 32x32 LeNet)
        self.conv2 = nn.Conv2d(6, 16, 5)  # 14 -> 10
        self.conv3 = nn.Conv2d(16, 120, 5)  # 5 -> 1
        self.pool = MaxPool2x2()
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = self.act(self.conv3(x)).flatten(1)
        x = self.act(self.fc1(x))
        return self.fc2(x)
