"""What every denoiser declares, so that the predictor never probes one with getattr/hasattr.

A denoiser maps a noisy delta x_t (B, *delta_shape), timesteps t (B,) and the request's prepared
conditioning to ε or x̂_0 (``prediction``). ``prepare(cond)`` does the per-request work once for
all DDIM steps. A denoiser whose output is s·x_t + U Vᵀ from static linear reads of x_t can also
run DDIM on those factors (``factor_space``), never forming x_t; others return None there and
the predictor runs the dense sampler, which gives the same result.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ..schedule import NoiseSchedule, Prediction


class FactorSampler(Protocol):
    def sample_factors(
        self, schedule: NoiseSchedule, ctx: Any, x_T: torch.Tensor, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DDIM (eta 0) from x_T (N, *delta_shape) with ``ctx`` (one row per member) -> a (N,),
        U (N, out, m), V (N, in, m) with x_0 = a·x_T + U Vᵀ."""


class Denoiser(nn.Module):
    """Base of every denoiser: forward(x_t (B, *delta_shape), t (B,), ctx) -> ε or x̂_0 (B, *delta_shape)."""

    prediction: Prediction = "epsilon"  # set from the config by ``build_denoiser``

    def prepare(self, cond: Any) -> Any:
        """The request's conditioning (B rows) -> what every step needs (B rows; ``repeat_interleave``-able)."""
        return cond

    def factor_space(self, eta: float, steps: int) -> FactorSampler | None:
        """A sampler on low-rank factors when this denoiser, eta and the step count allow one, else None."""
        return None
