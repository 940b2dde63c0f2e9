"""OCD inference: base forward with taps -> conditioning -> DDIM over batch x ensemble -> adapt.

A request's result depends only on its input, its parameters and its seed: the initial noise
(and per-step noise when eta > 0) is drawn per sample from that sample's own generator.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import nn

from .adapt import LowRankDelta, adapted_forward
from .schedule import NoiseSchedule, ScheduleConfig
from .schedule import Prediction as PredictionType
from .split import Split, check_split, split_model
from .tap import Latents, get_layer, pool_latents, tap

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


def draw_noise(seeds: Sequence[int], ensemble: int | Sequence[int], shape: Sequence[int], steps: int, eta: float,
               device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        torch.randn(k, *shape, generator=g, out=x[i:i + k])
        if step is not None:
            step[:, i:i + k] = torch.randn(steps, k, *shape, generator=g)
        i += k
    return x.to(device), (step.to(device) if step is not None else None)


@dataclass
class SamplePrediction:
    """One request's share of a ragged batch: members (K, *out), mean (*out), uncertainty
    (() entropy or (*out) std), base (*out)."""

    members: torch.Tensor
    mean: torch.Tensor
    uncertainty: torch.Tensor
    base: torch.Tensor


@dataclass
class RaggedPrediction:
    """A ragged batch's predictions, still batched: members (ΣK, *out), sample-major; mean (B, *out);
    uncertainty (B,) entropy or (B, *out) std; base (B, *out); counts: K per sample."""

    members: torch.Tensor
    mean: torch.Tensor
    uncertainty: torch.Tensor
    base: torch.Tensor
    counts: list[int]

    def split(self) -> list[SamplePrediction]:
        """One SamplePrediction per sample, its tensors views of these (``unbind``: one op for B rows)."""
        return [SamplePrediction(*row) for row in zip(self.members.split(self.counts), self.mean.unbind(),
                                                       self.uncertainty.unbind(), self.base.unbind())]

    def to(self, device: torch.device | str) -> RaggedPrediction:
        return RaggedPrediction(*(t.to(device) for t in (self.members, self.mean, self.uncertainty, self.base)),
                                self.counts)


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
        self.__dict__.pop("_split", None)
        return out

    def _upstream(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
        """x -> (the values alive at the layer, the model that maps them to the output).

        The part of the base model upstream of the adapted layer is the same for every ensemble
        member, so it runs once per request: the latents and the adapted forward start from it
        (torch.fx split; models it cannot split run whole)."""
        if "_split" not in self.__dict__:
            split = split_model(self.base, self.layer)
            self.__dict__["_split"] = split if split is not None and check_split(self.base, split, x[:2]) else None
        split: Split | None = self.__dict__["_split"]
        return ((x,), self.base) if split is None else (tuple(split.head(x)), split.tail)

    @property
    def device(self) -> torch.device:
        return self.mean_scale.device

    def head(self, out: torch.Tensor) -> torch.Tensor:
        """Network output -> probabilities (classification) or values (regression)."""
        return out.softmax(-1) if self.task == "classification" else out

    def latents(self, x: torch.Tensor | tuple[torch.Tensor, ...], model: nn.Module | None = None) -> Latents:
        """Latents of x (B, *input) through the base model (or of upstream values through ``model``)."""
        return self._pool(self._tap(model or self.base, x))

    def _tap(self, model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...]) -> Latents:
        """Unpooled latents, with the output error signal when the conditioning uses it."""
        return tap(model, self.layer, x, grad_task=self.task if self.cond.output_grad else None)

    def _pool(self, lat: Latents) -> Latents:
        pool = getattr(self.cond, "latent_pool", None)  # CondConfig.latent_pool: resolution-free latents
        return pool_latents(lat, pool, conv=isinstance(get_layer(self.base, self.layer), nn.Conv2d)) if pool else lat

    def lowrank_ok(self, eta: float, steps: int) -> bool:
        """Whether DDIM runs in factor space: a deterministic sampler, a denoiser that predicts x_0 as
        s·x_t + U Vᵀ from static linear reads of x_t (``CompactDenoiser(static_probes=True)``), and
        factors (rank x steps columns) at most twice the dense delta's size (MNIST v2 at batch 64:
        20 steps take 30 ms in factor space, 41 ms dense); otherwise the dense sampler, which gives
        the same result."""
        den = self.denoiser
        if not (eta == 0 and self.prediction == "sample" and getattr(den, "static_probes", False)):
            return False
        return den.rank * steps * (den.n_out + den.n_in) <= 2 * den.n_out * den.n_in

    def sample_deltas(self, lat: Latents, steps: int, ensemble: int | torch.Tensor, eta: float, x_T: torch.Tensor,
                      step_noise: torch.Tensor | None = None, scale: ScaleMode = "net",
                      lowrank: bool = False) -> torch.Tensor | LowRankDelta:
        """Latents of B samples -> deltas (ΣK, *W.shape), sample-major (b0k0, b0k1, ...).

        ``ensemble``: K for every sample, or a (B,) tensor of per-sample counts. With ``lowrank``
        (and ``lowrank_ok(eta, steps)``) a LowRankDelta that is never formed."""
        e = self.cond(*lat.flat(), lat.grad)  # once per request, not per step or member
        if hasattr(self.denoiser, "prepare"):
            e = self.denoiser.prepare(e)
        e = e.repeat_interleave(ensemble)
        rho = self.scale_net(*lat.flat()) if scale == "net" else self.mean_scale.expand(lat.out.shape[0])
        rho = rho.repeat_interleave(ensemble, 0)
        if lowrank and self.lowrank_ok(eta, steps):
            den = self.denoiser
            embs = den.step_embs(self.schedule.ddim_timesteps(steps), e)  # what t fixes, all steps at once
            a, u, v = self.schedule.ddim_sample_lowrank(lambda r, t: den.factors(r, t, e, emb=embs[t]),
                                                        lambda u, v: den.read_lowrank(u, v, e),
                                                        den.read(x_T, e), steps)
            return LowRankDelta(rho, a, x_T, u, v)
        unit = self.schedule.ddim_sample(lambda x, t: self.denoiser(x, t, e), x_T, steps, eta, step_noise,
                                         self.prediction)
        return unit * rho.view(-1, *([1] * (unit.ndim - 1)))

    def _summary(self, members: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble mean over ``dim`` and the uncertainty: predictive entropy or ensemble std."""
        mean = members.mean(dim)
        if self.task == "classification":
            return mean, -(mean * mean.clamp_min(1e-12).log()).sum(-1)
        return mean, members.std(dim, unbiased=False)

    def _run(self, x: torch.Tensor, steps: int, counts: list[int], eta: float, seeds: Sequence[int] | None,
             scale: ScaleMode) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """x (B, *input) -> member outputs (ΣK, *out) after the head, base outputs (B, *out), timings."""
        if self.training:  # per-sample results must not depend on the batch (BatchNorm, dropout)
            self.eval()
        B = x.shape[0]
        if seeds is None:
            seeds = torch.randint(0, 2**63 - 1, (B,)).tolist()
        if len(seeds) != B or len(counts) != B:
            raise ValueError(f"{len(seeds)} seeds and {len(counts)} ensemble sizes for {B} inputs")
        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        reps = torch.tensor(counts, device=x.device)
        t0 = time.perf_counter()
        live, tail = self._upstream(x)
        raw = self._tap(tail, live)  # unpooled: its output is the base prediction
        lat = self._pool(raw)
        sync()
        t1 = time.perf_counter()
        x_T, step_noise = draw_noise(seeds, counts, self.delta_shape, steps, eta, x.device)
        deltas = self.sample_deltas(lat, steps, reps, eta, x_T, step_noise, scale, lowrank=True)
        sync()
        t2 = time.perf_counter()
        out = self.head(adapted_forward(tail, self.layer, tuple(v.repeat_interleave(reps, 0) for v in live), deltas))
        sync()
        t3 = time.perf_counter()
        return out, self.head(raw.out), {"base": t1 - t0, "ddim": t2 - t1, "adapt": t3 - t2}

    @torch.no_grad()  # not inference_mode: the tap may take one backward for Latents.grad
    def predict(self, x: torch.Tensor, steps: int = 10, ensemble: int = 1, eta: float = 0.0,
                seeds: Sequence[int] | None = None, scale: ScaleMode = "net") -> Prediction:
        """x: (B, *input) -> Prediction with K = ``ensemble`` adapted members per sample."""
        with self._lock:
            out, base, timings = self._run(x, steps, [ensemble] * x.shape[0], eta, seeds, scale)
        members = out.view(x.shape[0], ensemble, *out.shape[1:])
        return Prediction(members, *self._summary(members, 1), base, timings)

    def predict_ragged(self, x: torch.Tensor, steps: int, ensembles: Sequence[int], seeds: Sequence[int],
                       eta: float = 0.0) -> tuple[list[SamplePrediction], dict[str, float]]:
        """Like ``predict`` with a per-sample ensemble size: one DDIM loop over all ΣK members."""
        pred, timings = self.predict_batched(x, steps, ensembles, seeds, eta)
        return pred.split(), timings

    @torch.no_grad()
    def predict_batched(self, x: torch.Tensor, steps: int, ensembles: Sequence[int], seeds: Sequence[int],
                        eta: float = 0.0) -> tuple[RaggedPrediction, dict[str, float]]:
        """``predict_ragged`` without splitting the batch into samples."""
        with self._lock:
            out, base, timings = self._run(x, steps, list(ensembles), eta, seeds, "net")
        return self.summarise_ragged(out, base, ensembles), timings

    def summarise_ragged(self, out: torch.Tensor, base: torch.Tensor, ensembles: Sequence[int]) -> RaggedPrediction:
        """Member outputs (ΣK, *out) and base outputs (B, *out), after the head -> their ensemble
        summaries, one ``_summary`` per distinct K over all the samples with K members (as ``predict``
        summarises (B, K, *out)), not one per sample."""
        counts, tail = list(ensembles), out.shape[1:]
        if len(set(counts)) == 1:
            mean, unc = self._summary(out.view(len(counts), counts[0], *tail), 1)
            return RaggedPrediction(out, mean, unc, base, counts)
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
        return RaggedPrediction(out, mean, unc, base, counts)
