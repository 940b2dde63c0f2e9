"""OCD inference: base forward with taps -> conditioning -> DDIM over batch x ensemble -> adapt.

``Predictor`` runs these stages through a ``Runtime`` (runtime.py): the bundle's torch modules or
its ONNX graphs. A request's result depends only on its input, its parameters and its seed: the
initial noise (and per-step noise when eta > 0) is drawn per sample from that sample's own generator.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .adapt import LowRankDelta
from .denoisers.base import Denoiser
from .runtime import Runtime, TorchRuntime
from .schedule import NoiseSchedule, ScheduleConfig
from .schedule import Prediction as PredictionType
from .tap import Latents, get_layer, pool_latents, tap

Task = Literal["classification", "regression"]
ScaleMode = Literal["net", "mean"]


def draw_noise(
    seeds: Sequence[int],
    ensemble: int | Sequence[int],
    shape: Sequence[int],
    steps: int,
    eta: float,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample noise: x_T (ΣK, *shape) and, for eta > 0, step noise (steps, ΣK, *shape).

    Sample i gets ``ensemble`` (or ``ensemble[i]``) members, drawn on the CPU from
    ``torch.Generator().manual_seed(seeds[i])``: the same on every device and for every
    batch composition.
    """
    counts = [ensemble] * len(seeds) if isinstance(ensemble, int) else list(ensemble)
    total = sum(counts)
    x = torch.empty(total, *shape)  # filled in place: no per-sample tensors to concatenate
    step = torch.empty(steps, total, *shape) if eta > 0 else None
    i = 0
    for s, k in zip(seeds, counts):
        g = torch.Generator().manual_seed(int(s))
        torch.randn(k, *shape, generator=g, out=x[i : i + k])
        if step is not None:
            step[:, i : i + k] = torch.randn(steps, k, *shape, generator=g)
        i += k
    return x.to(device), (step.to(device) if step is not None else None)


@dataclass
class SamplePrediction:
    """One sample's prediction: members (K, *out) probabilities (classification) or values
    (regression); mean (*out), the ensemble mean; uncertainty, the predictive entropy of the mean
    (()) or the ensemble std ((*out)); base (*out), the base model's."""

    members: torch.Tensor
    mean: torch.Tensor
    uncertainty: torch.Tensor
    base: torch.Tensor


@dataclass
class BatchPrediction:
    """A batch's predictions, K_i members for sample i: members (ΣK, *out), sample-major; mean (B, *out);
    uncertainty (B,) entropy or (B, *out) std; base (B, *out); counts [K_i]; timings: seconds per stage."""

    members: torch.Tensor
    mean: torch.Tensor
    uncertainty: torch.Tensor
    base: torch.Tensor
    counts: list[int]
    timings: dict[str, float] = field(default_factory=dict)

    def stacked(self) -> torch.Tensor:
        """members as (B, K, *out); every sample must have the same K."""
        if len(set(self.counts)) > 1:
            raise ValueError(f"members of a ragged batch (K = {sorted(set(self.counts))}) do not stack")
        return self.members.view(len(self.counts), self.counts[0], *self.members.shape[1:])

    def split(self) -> list[SamplePrediction]:
        """One SamplePrediction per sample, its tensors views of these (``unbind``: one op for B rows)."""
        return [
            SamplePrediction(*row)
            for row in zip(
                self.members.split(self.counts), self.mean.unbind(), self.uncertainty.unbind(), self.base.unbind()
            )
        ]

    def to(self, device: torch.device | str) -> BatchPrediction:
        return BatchPrediction(
            *(t.to(device) for t in (self.members, self.mean, self.uncertainty, self.base)), self.counts, self.timings
        )


class Expired(TimeoutError):
    """A prediction stopped because its deadline passed (``Predictor.predict(deadline=...)``)."""


def repeat_rows(values: tuple[torch.Tensor, ...], reps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor's row i repeated reps[i] times (a NamedTuple keeps its type)."""
    rows = [v.repeat_interleave(reps, 0) for v in values]
    return type(values)(*rows) if hasattr(values, "_fields") else tuple(rows)


class Predictor:
    """Predictions of an OCD bundle, stage by stage through ``runtime``.

    ``schedule`` gives DDIM; ``prediction`` says what the denoiser outputs (ε or x̂_0); ``delta_shape``
    the adapted weight's shape; ``mean_scale`` the global ρ of ``scale="mean"`` (the no-scale ablation).
    ``max_rows``: the most ensemble members one adapted forward runs (None: all of a batch's at once);
    more run in chunks, and the memory of a large ensemble is that of a chunk (the same results)."""

    max_rows: int | None = None

    def __init__(
        self,
        runtime: Runtime,
        schedule: NoiseSchedule,
        task: Task,
        prediction: PredictionType,
        delta_shape: tuple[int, ...],
        mean_scale: float,
    ):
        self.runtime, self.schedule, self.task, self.prediction = runtime, schedule, task, prediction
        self.delta_shape, self.mean_scale = tuple(delta_shape), float(mean_scale)
        # the torch runtime's taps and adapt hooks hook the shared base model: one lock per model, shared
        # by every predictor over it (another runtime, e.g. ONNX Runtime's sessions, brings none)
        self._lock = getattr(runtime, "lock", None) or threading.Lock()

    def head(self, out: torch.Tensor) -> torch.Tensor:
        """Network output -> probabilities (classification) or values (regression)."""
        return out.softmax(-1) if self.task == "classification" else out

    def sample_deltas(
        self,
        ctx: tuple[torch.Tensor, ...],
        rho: torch.Tensor,
        x_T: torch.Tensor,
        steps: int,
        eta: float = 0.0,
        step_noise: torch.Tensor | None = None,
        lowrank: bool = True,
    ) -> torch.Tensor | LowRankDelta:
        """Prepared conditioning and ρ (N rows), start noise x_T (N, *W) -> deltas (N, *W): DDIM to a
        unit-variance delta, times ρ. With ``lowrank`` and a denoiser that offers it, DDIM runs on
        factors and the result is a LowRankDelta that is never formed (the same deltas)."""
        sampler = self.runtime.factor_space(eta, steps) if lowrank else None
        if sampler is not None:
            a, u, v = sampler.sample_factors(self.schedule, ctx, x_T, steps)
            return LowRankDelta(rho, a, x_T, u, v)
        unit = self.schedule.ddim_sample(
            lambda x, t: self.runtime.denoise(x, t, ctx), x_T, steps, eta, step_noise, self.prediction
        )
        return unit * rho.view(-1, *([1] * (unit.ndim - 1)))

    @torch.no_grad()  # not inference_mode: the tap may take one backward for Latents.grad
    def predict(
        self,
        x: torch.Tensor,
        steps: int = 10,
        ensemble: int | Sequence[int] = 1,
        eta: float = 0.0,
        seeds: Sequence[int] | None = None,
        scale: ScaleMode = "net",
        deadline: float | None = None,
    ) -> BatchPrediction:
        """x (B, *input) -> BatchPrediction with ``ensemble`` members per sample (an int, or one per sample);
        sample i's noise from ``seeds[i]`` (random seeds when None). ``steps`` 0 is the base mode: the
        base model alone, no adaptation (ensemble 1; members, mean and base are its output).
        ``deadline`` (``time.monotonic()``): past it, the work stops between stages and chunks (``Expired``)."""
        B = x.shape[0]
        counts = [ensemble] * B if isinstance(ensemble, int) else list(ensemble)
        seeds = torch.randint(0, 2**63 - 1, (B,)).tolist() if seeds is None else list(seeds)
        if len(seeds) != B or len(counts) != B:
            raise ValueError(f"{len(seeds)} seeds and {len(counts)} ensemble sizes for {B} inputs")
        rt = self.runtime
        sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
        _check(deadline)
        if steps == 0:  # the base mode: the base model alone, one member per sample
            if any(k != 1 for k in counts):
                raise ValueError(f"steps 0 (the base model alone) takes ensemble 1, got {sorted(set(counts))}")
            with self._lock:
                t0 = time.perf_counter()
                base = self.head(rt.base(x))
                sync()
            return self.summarise(base, base, counts, {"base": time.perf_counter() - t0})
        reps = torch.tensor(counts, device=rt.device)
        with self._lock:
            t0 = time.perf_counter()
            up = rt.upstream(x)
            sync()
            t1 = time.perf_counter()
            ctx = repeat_rows(rt.context(up.lat), reps)  # once per request, not per step or member
            rho = rt.scale(up.lat) if scale == "net" else torch.full((B,), self.mean_scale, device=rt.device)
            x_T, step_noise = draw_noise(seeds, counts, self.delta_shape, steps, eta, rt.device)
            _check(deadline)
            deltas = self.sample_deltas(ctx, rho.repeat_interleave(reps, 0), x_T, steps, eta, step_noise)
            sync()
            t2 = time.perf_counter()
            out = self.adapt(up.live, reps, deltas, deadline)
            sync()
            t3 = time.perf_counter()
        return self.summarise(out, self.head(up.base_out), counts, {"base": t1 - t0, "ddim": t2 - t1, "adapt": t3 - t2})

    def adapt(
        self,
        live: tuple[torch.Tensor, ...],
        reps: torch.Tensor,
        deltas: torch.Tensor | LowRankDelta,
        deadline: float | None = None,
    ) -> torch.Tensor:
        """Live values (B rows), members per sample reps (B,), deltas (N = Σreps, *W) -> the adapted
        outputs after the head (N, *out), ``max_rows`` members at a time (checking ``deadline`` before each)."""
        rt, n = self.runtime, int(deltas.shape[0])
        if self.max_rows is None or n <= self.max_rows:
            _check(deadline)
            return self.head(rt.adapt(repeat_rows(live, reps), deltas))
        owner = torch.repeat_interleave(torch.arange(len(reps), device=reps.device), reps)  # member -> sample
        out = []
        for start in range(0, n, self.max_rows):
            _check(deadline)
            rows = slice(start, start + self.max_rows)
            part = (
                LowRankDelta(*(t[rows] for t in (deltas.rho, deltas.a, deltas.x, deltas.u, deltas.v)))
                if isinstance(deltas, LowRankDelta)
                else deltas[rows]
            )
            out.append(self.head(rt.adapt(tuple(v[owner[rows]] for v in live), part)))
        return torch.cat(out)

    def _summary(self, members: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble mean over ``dim`` and the uncertainty: predictive entropy or ensemble std."""
        mean = members.mean(dim)
        if self.task == "classification":
            return mean, -(mean * mean.clamp_min(1e-12).log()).sum(-1)
        return mean, members.std(dim, unbiased=False)

    def summarise(
        self, out: torch.Tensor, base: torch.Tensor, counts: Sequence[int], timings: dict[str, float] | None = None
    ) -> BatchPrediction:
        """Member outputs (ΣK, *out) and base outputs (B, *out), after the head -> a BatchPrediction:
        one ``_summary`` per distinct K over all the samples with K members, not one per sample."""
        counts, tail = list(counts), out.shape[1:]
        if len(set(counts)) == 1:
            mean, unc = self._summary(out.view(len(counts), counts[0], *tail), 1)
            return BatchPrediction(out, mean, unc, base, counts, timings or {})
        starts = [0, *itertools.accumulate(counts[:-1])]  # each sample's first member row
        parts = {}
        for k in sorted(set(counts)):
            idx = [i for i, c in enumerate(counts) if c == k]
            rows = torch.tensor([starts[i] + j for i in idx for j in range(k)], device=out.device)
            parts[k] = (torch.tensor(idx, device=out.device), *self._summary(out[rows].view(len(idx), k, *tail), 1))
        first = next(iter(parts.values()))
        mean = out.new_empty(len(counts), *first[1].shape[1:])
        unc = out.new_empty(len(counts), *first[2].shape[1:])
        for idx, m, u in parts.values():
            mean[idx], unc[idx] = m, u
        return BatchPrediction(out, mean, unc, base, counts, timings or {})


def _check(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise Expired("the deadline passed; the prediction was stopped")


class OCDModel(nn.Module):
    """A base model, the layer OCD adapts, and the networks that generate its per-sample deltas.
    ``predict`` runs them eagerly (``TorchRuntime``); ``predictor(runtime)`` over another runtime."""

    def __init__(
        self,
        base: nn.Module,
        layer: str,
        cond: nn.Module,
        denoiser: Denoiser,
        scale_net: nn.Module,
        schedule: ScheduleConfig,
        task: Task,
        mean_scale: float,
    ):
        super().__init__()
        self.base, self.layer, self.cond, self.denoiser, self.scale_net = base, layer, cond, denoiser, scale_net
        self.task: Task = task
        self.prediction: PredictionType = denoiser.prediction
        self.schedule_cfg = schedule
        self.schedule = NoiseSchedule(schedule)
        self.register_buffer("mean_scale", torch.tensor(float(mean_scale)))
        self.delta_shape = tuple(get_layer(base, layer).weight.shape)
        self.lock = threading.Lock()  # the base model's hooks (taps, adapt): TorchRuntime and every Predictor share it
        self.eval()

    def _apply(self, fn, recurse=True):  # keep the schedule's tensors on the model's device
        out = super()._apply(fn, recurse)
        self.schedule = NoiseSchedule(self.schedule_cfg, device=self.mean_scale.device)
        self.__dict__.pop("_predictor", None)
        return out

    @property
    def device(self) -> torch.device:
        return self.mean_scale.device

    def predictor(self, runtime: Runtime | None = None) -> Predictor:
        """The predictor of this bundle over ``runtime`` (default: this model's torch modules, one cached
        predictor and so one lock per model)."""
        if runtime is not None:
            return Predictor(
                runtime,
                NoiseSchedule(self.schedule_cfg, device=runtime.device),
                self.task,
                self.prediction,
                self.delta_shape,
                self.mean_scale.item(),
            )
        with self.lock:
            if "_predictor" not in self.__dict__:
                self.__dict__["_predictor"] = Predictor(
                    TorchRuntime(self),
                    self.schedule,
                    self.task,
                    self.prediction,
                    self.delta_shape,
                    self.mean_scale.item(),
                )
            return self.__dict__["_predictor"]

    def predict(
        self,
        x: torch.Tensor,
        steps: int = 10,
        ensemble: int | Sequence[int] = 1,
        eta: float = 0.0,
        seeds: Sequence[int] | None = None,
        scale: ScaleMode = "net",
    ) -> BatchPrediction:
        """x (B, *input) -> BatchPrediction (``Predictor.predict``), in torch on this model's device."""
        return self.predictor().predict(x, steps, ensemble, eta, seeds, scale)

    def head(self, out: torch.Tensor) -> torch.Tensor:
        """Network output -> probabilities (classification) or values (regression)."""
        return self.predictor().head(out)

    def pool(self, lat: Latents) -> Latents:
        """Latents as the conditioning sees them: pooled to ``CondConfig.latent_pool`` points when set."""
        size = self.cond.latent_pool
        return pool_latents(lat, size, conv=isinstance(get_layer(self.base, self.layer), nn.Conv2d)) if size else lat

    def latents(self, x: torch.Tensor) -> Latents:
        """Latents of x (B, *input) through the base model, as the conditioning sees them."""
        return self.pool(tap(self.base, self.layer, x, grad_task=self.task if self.cond.output_grad else None))
