"""Evaluation rows of the protocol (DESIGN.md) for one seed's trained models, on the test split.

Rows: base, oracle (overfit on the test sample with its label), ocd (K=1), ocd_ensemble (K=5),
no_scale (global mean scale), nearest_neighbour (delta of the nearest training sample),
ddim_<n> for each step count. Classification: accuracy and cross-entropy; regression: MSE.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ocd_core.adapt import adapted_forward
from ocd_core.fit import TargetSet
from ocd_core.predictor import OCDModel
from ocd_core.targets import TargetConfig, overfit_deltas


def metrics(probs_or_values: torch.Tensor, y: torch.Tensor, task: str) -> dict[str, float]:
    """Classification: acc, ce of probabilities (N, C); regression: mse of values (N, *), and for
    images (N, C, H, W) in [0, 1] also psnr, the mean over images of −10·log10(that image's MSE)."""
    if task == "classification":
        return {
            "acc": (probs_or_values.argmax(1) == y).float().mean().item(),
            "ce": F.nll_loss(probs_or_values.clamp_min(1e-12).log(), y).item(),
        }
    out = {"mse": F.mse_loss(probs_or_values, y.reshape(probs_or_values.shape)).item()}
    if y.ndim == 4:
        per_image = (probs_or_values - y).pow(2).flatten(1).mean(1)
        out["psnr"] = (-10 * per_image.clamp_min(1e-10).log10()).mean().item()
    return out


def _batched(fn: Callable[[slice], torch.Tensor], n: int, chunk: int) -> torch.Tensor:
    return torch.cat([fn(slice(i, i + chunk)) for i in range(0, n, chunk)])


def reliability(probs: torch.Tensor, y: torch.Tensor, bins: int = 10) -> dict[str, Any]:
    """Confidence-vs-accuracy bins and the expected calibration error."""
    conf, pred = probs.max(1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            rows.append(
                {
                    "lo": lo.item(),
                    "hi": hi.item(),
                    "n": int(m.sum()),
                    "conf": conf[m].mean().item(),
                    "acc": correct[m].mean().item(),
                }
            )
            ece += m.float().mean().item() * abs(conf[m].mean().item() - correct[m].mean().item())
    return {"bins": rows, "ece": ece}


def nearest_neighbour_deltas(model: OCDModel, train: TargetSet, x: torch.Tensor) -> torch.Tensor:
    """Delta of the nearest training sample in standardised latent space (inp, act, out): (N, *W)."""
    feats = torch.cat([train.inp, train.act, train.out], 1)
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    lat = model.latents(x)
    q = (torch.cat(lat.flat(), 1) - mu) / sd
    idx = torch.cdist(q, (feats - mu) / sd).argmin(1)
    return train.deltas[idx]


@torch.no_grad()
def evaluate(
    model: OCDModel,
    x: torch.Tensor,
    y: torch.Tensor,
    train: TargetSet,
    target_cfg: TargetConfig,
    ddim_steps: list[int],
    default_steps: int,
    ensemble: int,
    seed: int,
    chunk: int = 250,
    progress: bool = True,
    only: set[str] | None = None,
) -> dict[str, Any]:
    """All rows for one seed (or just the rows in ``only``); returns
    {"rows": {row: metrics}, "cost": {...}, "reliability": {...}}."""
    task, n = model.task, x.shape[0]
    seeds = [seed * 1_000_003 + i for i in range(n)]  # per test sample, fixed per run seed

    def ocd(steps: int, k: int, scale: str = "net") -> torch.Tensor:
        return _batched(lambda s: model.predict(x[s], steps, k, seeds=seeds[s], scale=scale).mean, n, chunk)

    def adapted(deltas_of: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        return _batched(lambda s: model.head(adapted_forward(model.base, model.layer, x[s], deltas_of(s))), n, chunk)

    jobs: dict[str, Callable[[], torch.Tensor]] = {
        "base": lambda: model.head(model.base(x)),
        "oracle": lambda: adapted(lambda s: overfit_deltas(model.base, model.layer, x[s], y[s], target_cfg)),
        "ocd": lambda: ocd(default_steps, 1),
        "ocd_ensemble": lambda: ocd(default_steps, ensemble),
        "no_scale": lambda: ocd(default_steps, 1, "mean"),
        "nearest_neighbour": lambda: adapted(lambda s: nearest_neighbour_deltas(model, train, x[s])),
    }
    for st in ddim_steps:
        jobs[f"ddim_{st}"] = lambda st=st: ocd(st, 1)
    if only is not None:
        return {"rows": {k: metrics(jobs[k](), y, task) for k in only}}
    rows, outs = {}, {}
    for name, job in tqdm(jobs.items(), desc="evaluate", disable=not progress, leave=False):
        outs[name] = job()
        rows[name] = metrics(outs[name], y, task)
    result: dict[str, Any] = {"rows": rows, "cost": cost(model, x[:1], default_steps)}
    if task == "classification":
        result["reliability"] = {
            "base": reliability(outs["base"], y),
            "ocd_ensemble": reliability(outs["ocd_ensemble"], y),
        }
    return result


@torch.no_grad()
def cost(model: OCDModel, x1: torch.Tensor, steps: int, repeats: int = 20) -> dict[str, float]:
    """FLOPs and ms per prediction at batch 1 (base vs OCD with ``steps`` DDIM steps, K=1)."""
    with FlopCounterMode(display=False) as fb:
        model.base(x1)
    with FlopCounterMode(display=False) as fo:
        model.predict(x1, steps, 1, seeds=[0])
    sync = torch.cuda.synchronize if x1.device.type == "cuda" else (lambda: None)

    def ms(fn: Callable[[], Any]) -> float:
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - t) / repeats * 1000

    return {
        "base_flops": fb.get_total_flops(),
        "ocd_flops": fo.get_total_flops(),
        "base_ms": ms(lambda: model.base(x1)),
        "ocd_ms": ms(lambda: model.predict(x1, steps, 1, seeds=[0])),
    }
