"""Scale network ρ(I(x)): predicts the std of a sample's delta (diffusion runs at unit variance)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field
from torch import nn

from .conditioning import CondConfig, CondEncoder


class ScaleConfig(BaseModel):
    hidden: int = Field(128, ge=1)


class ScaleNet(nn.Module):
    """(inp, act, out) latents -> ρ (B,) > 0, parameterised as exp(log-scale)."""

    def __init__(self, d_inp: int, d_act: int, d_out: int, cfg: ScaleConfig | None = None):
        super().__init__()
        cfg = cfg or ScaleConfig()
        self.enc = CondEncoder(d_inp, d_act, d_out, CondConfig(dim=cfg.hidden, hidden=cfg.hidden))
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 1))
        self.register_buffer("log_offset", torch.zeros(()))  # set to log(mean scale) before training

    def forward(self, inp: torch.Tensor, act: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.head(self.enc.embed(inp, act, out)).squeeze(-1) + self.log_offset)


def scale_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's loss, mean over the batch: 10·log10((ρ − ρ*)² / ρ*² + 1e-8)."""
    return (10 * torch.log10((pred - target) ** 2 / target**2 + 1e-8)).mean()
