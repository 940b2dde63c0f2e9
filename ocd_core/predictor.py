"""OCD inference: base forward with taps -> conditioning -> DDIM over batch x ensemble -> adapt.

A request's result depends only on its input, its parameters and its seed: the initial noise
(and per-step noise when eta > 0) is drawn per sample from that sample's own generator.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import nn

from .adapt import adapted_forward
from .schedule import NoiseSchedule, ScheduleConfig
from .schedule import Prediction as PredictionType
from .tap import Latents, get_layer, tap

Task = Literal["classification", "regression"]
ScaleMode = Literal["net", "mean"]


@dataclass
class Prediction:
    """members: (B, K, *out) probabilities (classification) or values (regression);
    mean: (B, *out) ensemble mean; uncertainty: (B,) predictive entropy of the mean
    (classification) or (B, *out) ensemble std (regression); base: (B, *out) base model."""

    members: torch.Tensor
    mean: torch.Tensor
    uncertainty: torch.Tensor
    base: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


def draw_noise(seeds: Sequence[int], ensemble: int, shape: Sequence[int], steps: int, eta: float,
               device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample noise: x_T (B*K, *shape) and, for eta > 0, step noise (steps, B*K, *shape).

    Drawn on the CPU from ``torch.Generator().manual_seed(seed)`` per sample, so it is the
    same on every device and for every batch composition.
    """
    x_T, step = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        x_T.append(torch.randn(ensemble, *shape, generator=g))
        if eta > 0:
            step.append(torch.randn(steps, ensemble, *shape, generator=g))
    x = torch.cat(x_T).to(device)
    return x, (torch.cat(step, dim=1).to(device) if eta > 0 else None)


class OCDModel(nn.Module):
    """A base model, the layer OCD adapts, and the networks that generate its per-sample deltas."""

    def __init__(self, base: nn.Module, layer: str, cond: nn.Module, denoiser: nn.Module,
                 scale_net: nn.Module, schedule: ScheduleConfig, task: Task, mean_scale: float):
        super().__init__()
        self.base, self.layer, self.cond, self.denoiser, self.scale_net = base, layer, cond, denoiser, scale_net
        self.task: Task = task
        self.prediction: PredictionType = getattr(denoiser, "prediction", "epsilon")
        self.schedule_cfg = schedule
        self.schedule = NoiseSchedule(schedule)
        self.register_buffer("mean_scale", torch.tensor(float(mean_scale)))
        self.delta_shape = tuple(get_layer(base, layer).weight.shape)
        self._lock = threading.Lock()  # taps and the adapt fast path hook the shared base model
        self.eval()

    def _apply(self, fn, recurse=True):  # keep the schedule's tensors on the model's device
        out = super()._apply(fn, recurse)
        self.schedule = NoiseSchedule(self.schedule_cfg, device=self.mean_scale.device)
        return out

    @property
    def device(self) -> torch.device:
        return self.mean_scale.device

    def head(self, out: torch.Tensor) -> torch.Tensor:
        """Network output -> probabilities (classification) or values (regression)."""
        return out.softmax(-1) if self.task == "classification" else out

    def latents(self, x: torch.Tensor) -> Latents:
        return tap(self.base, self.layer, x, grad_task=self.task if self.cond.output_grad else None)

    def sample_deltas(self, lat: Latents, steps: int, ensemble: int, eta: float, x_T: torch.Tensor,
                      step_noise: torch.Tensor | None = None, scale: ScaleMode = "net") -> torch.Tensor:
        """Latents of B samples -> deltas (B*K, *W.shape), sample-major (b0k0, b0k1, ...)."""
        e = self.cond(*lat.flat(), lat.grad).repeat_interleave(ensemble)  # once per request, not per step
        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.schedule.to_eps(self.prediction, self.denoiser(x, t, e), x, t)

        unit = self.schedule.ddim_sample(eps, x_T, steps, eta, step_noise)
        rho = self.scale_net(*lat.flat()) if scale == "net" else self.mean_scale.expand(lat.out.shape[0])
        return unit * rho.repeat_interleave(ensemble, 0).view(-1, *([1] * (unit.ndim - 1)))

    @torch.no_grad()  # not inference_mode: the tap may take one backward for Latents.grad
    def predict(self, x: torch.Tensor, steps: int = 10, ensemble: int = 1, eta: float = 0.0,
                seeds: Sequence[int] | None = None, scale: ScaleMode = "net") -> Prediction:
        """x: (B, *input) -> Prediction with K = ``ensemble`` adapted members per sample."""
        with self._lock:
            return self._predict(x, steps, ensemble, eta, seeds, scale)

    def _predict(self, x, steps, ensemble, eta, seeds, scale) -> Prediction:
        if self.training:  # per-sample results must not depend on the batch (BatchNorm, dropout)
            self.eval()
        B = x.shape[0]
        if seeds is None:
            seeds = torch.randint(0, 2**63 - 1, (B,)).tolist()
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} inputs")
        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        lat = self.latents(x)
        sync()
        t1 = time.perf_counter()
        x_T, step_noise = draw_noise(seeds, ensemble, self.delta_shape, steps, eta, x.device)
        deltas = self.sample_deltas(lat, steps, ensemble, eta, x_T, step_noise, scale)
        sync()
        t2 = time.perf_counter()
        out = adapted_forward(self.base, self.layer, x.repeat_interleave(ensemble, 0), deltas)
        members = self.head(out).view(B, ensemble, *out.shape[1:])
        sync()
        t3 = time.perf_counter()
        mean = members.mean(1)
        if self.task == "classification":
            unc = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
        else:
            unc = members.std(1, unbiased=False)
        return Prediction(members, mean, unc, self.head(lat.out),
                          {"base": t1 - t0, "ddim": t2 - t1, "adapt": t3 - t2})
