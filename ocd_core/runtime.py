"""Runtimes: the stages of an OCD prediction on one kind of executor.

``Predictor`` (predictor.py) runs base + taps -> conditioning -> DDIM (one denoiser call per step)
-> scale -> adapt through a ``Runtime``. ``TorchRuntime`` runs the bundle's torch modules eagerly;
``OnnxRuntime`` (onnx_runtime.py) runs the same stages as ONNX graphs, which ``ocd export-onnx``
traces from the ``TorchRuntime`` stages themselves. Tensors cross the interface as torch tensors on
the runtime's ``device``; every batch dimension is B (samples) or N = ΣK (ensemble members).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from .adapt import LowRankDelta, adapted_forward
from .denoisers.base import FactorSampler
from .split import Split, check_split, split_model
from .tap import Latents, tap

if TYPE_CHECKING:
    from .predictor import OCDModel


@dataclass
class Upstream:
    """What the base forward gives a prediction: lat, the layer's latents as the conditioning sees
    them (pooled; with the output error signal when conditioned on it); base_out (B, *out), the base
    model's output before the head; live, the values alive at the layer (the adapted forward starts
    from them, so the part of the network upstream of the layer runs once per request)."""

    lat: Latents
    base_out: torch.Tensor
    live: tuple[torch.Tensor, ...]


class Runtime(Protocol):
    device: torch.device

    def upstream(self, x: torch.Tensor) -> Upstream:
        """x (B, *input) -> the base forward's latents, output and live values."""

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, *input) -> the base model's output (B, *out), before the head: the base mode."""

    def context(self, lat: Latents) -> tuple[torch.Tensor, ...]:
        """Latents of B samples -> the conditioning, prepared for every DDIM step: a tuple of (B, ...) tensors."""

    def scale(self, lat: Latents) -> torch.Tensor:
        """Latents of B samples -> ρ (B,), the delta's predicted std."""

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, ctx: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One denoiser call: x_t (N, *W), t (N,), ctx (N rows) -> ε or x̂_0 (N, *W)."""

    def factor_space(self, eta: float, steps: int) -> FactorSampler | None:
        """The denoiser's sampler on low-rank factors, when this runtime can apply their result."""

    def adapt(self, live: tuple[torch.Tensor, ...], deltas: torch.Tensor | LowRankDelta) -> torch.Tensor:
        """Live values (N rows) and deltas (N, *W) -> the adapted network's output (N, *out), before the head."""


class TorchRuntime:
    """The stages on an ``OCDModel``'s torch modules, on the model's device."""

    def __init__(self, model: OCDModel):
        self.model = model
        self.lock = model.lock  # the predictor holds it around a whole prediction
        self._split: Split | None | bool = False  # False: not tried yet

    @property
    def device(self) -> torch.device:
        return self.model.device

    def tail(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
        """x -> (the values alive at the layer, the module that maps them to the output): a torch.fx
        split (its check runs once, on x's first rows); models it cannot split run whole."""
        m = self.model
        if self._split is False:
            split = split_model(m.base, m.layer)
            self._split = split if split is not None and check_split(m.base, split, x[:2]) else None
        split = self._split
        return ((x,), m.base) if split is None else (tuple(split.head(x)), split.tail)

    def upstream(self, x: torch.Tensor) -> Upstream:
        m = self.model
        if m.training:  # per-sample results must not depend on the batch (BatchNorm, dropout)
            m.eval()
        live, tail = self.tail(x)
        raw = tap(
            tail, m.layer, live, grad_task=m.task if m.cond.output_grad else None
        )  # unpooled: raw.out is the output
        return Upstream(m.pool(raw), raw.out, live)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.training:
            self.model.eval()
        return self.model.base(x)

    def context(self, lat: Latents) -> tuple[torch.Tensor, ...]:
        return self.model.denoiser.prepare(self.model.cond(*lat.flat(), lat.grad))

    def scale(self, lat: Latents) -> torch.Tensor:
        return self.model.scale_net(*lat.flat())

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, ctx: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.model.denoiser(x_t, t, ctx)

    def factor_space(self, eta: float, steps: int) -> FactorSampler | None:
        return self.model.denoiser.factor_space(eta, steps)

    def adapt(self, live: tuple[torch.Tensor, ...], deltas: torch.Tensor | LowRankDelta) -> torch.Tensor:
        if self._split is False:
            raise RuntimeError("adapt before upstream: the split is made on the first input")
        tail = self.model.base if self._split is None else self._split.tail
        return adapted_forward(tail, self.model.layer, live, deltas)
