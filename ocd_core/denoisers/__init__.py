"""Denoisers behind one interface (``Denoiser``): ``out(x_t (B, *delta_shape), t (B,), ctx)``, ε or x̂_0."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field
from torch import nn

from .base import Denoiser, FactorSampler
from .compact import CompactDenoiser

__all__ = ["CompactConfig", "Denoiser", "DenoiserConfig", "FactorSampler", "PaperConfig", "build_denoiser"]


class CompactConfig(BaseModel):
    kind: Literal["compact"] = "compact"
    prediction: Literal["epsilon", "sample"] = "sample"  # x_0: its low-rank head fits the rank-1 targets
    rank: int = Field(4, ge=1)
    probes: int = Field(8, ge=1)
    hidden: int = Field(32, ge=1)
    pos_dim: int = Field(8, ge=1)
    emb_dim: int = Field(64, ge=1)
    depth: int = Field(2, ge=1, le=2, description="hidden layers of each per-row / per-column MLP")
    static_probes: bool = Field(
        False,
        description="probes made once per request, not per step: DDIM can then "
        "run in factor space (see schedule.ddim_sample_lowrank)",
    )


class PaperConfig(BaseModel):
    kind: Literal["paper"] = "paper"
    prediction: Literal["epsilon", "sample"] = "epsilon"  # the paper's ε-prediction
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)  # original MNIST config: 110 M params
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    pad: int = 128


DenoiserConfig = Annotated[CompactConfig | PaperConfig, Field(discriminator="kind")]


def build_denoiser(cfg: CompactConfig | PaperConfig, delta_shape: tuple[int, ...], cond_dim: int) -> Denoiser:
    """The denoiser named by ``cfg.kind`` for deltas of ``delta_shape``; ``.prediction`` says
    whether it outputs ε or x_0 (the schedule converts)."""
    kwargs = cfg.model_dump(exclude={"kind", "prediction"})
    if cfg.kind == "compact":
        net: Denoiser = CompactDenoiser(tuple(delta_shape), cond_dim, **kwargs)
    else:
        from .paper_unet import PaperUNet

        net = EmbOnly(PaperUNet(tuple(delta_shape), cond_dim, **kwargs))
    net.prediction = cfg.prediction  # what its output means: "epsilon" or "sample" (x_0)
    return net


class EmbOnly(Denoiser):
    """Adapts a denoiser that takes the paper's embedding tensor to the ``Cond`` interface."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x_t, t, cond):
        return self.net(x_t, t, cond.emb)
