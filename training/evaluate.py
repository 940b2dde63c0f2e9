"""Evaluation rows of the protocol (DESIGN.md) for one seed's trained models, on the test split.

Rows: base, oracle (overfit on the test sample with its label), ocd (K=1), ocd_ensemble (K=5),
no_scale (global mean scale), nearest_neighbour (delta of the nearest training sample),
knn_average (mean delta of the KNN nearest), noise_delta (a random direction with the scale net's
magnitude: what a denoiser that learned nothing would give), tent_1 / tent_3 (classification:
entropy minimisation of the same layer on the request alone, 1 and 3 steps, no label),
ddim_<n> for each step count. Classification: accuracy and cross-entropy; regression: MSE.
Classification also gets calibration (ECE) and how well the served uncertainty finds the model's
errors (AUROC), for the base softmax and the OCD ensemble.
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


KNN = 5  # neighbours averaged by the knn_average row


def nearest_neighbour_deltas(model: OCDModel, train: TargetSet, x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Mean delta of the ``k`` nearest training samples in standardised latent space (inp, act, out):
    (N, *W); k = 1 is the nearest sample's own delta."""
    feats = torch.cat([train.inp, train.act, train.out], 1)
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    lat = model.latents(x)
    q = (torch.cat(lat.flat(), 1) - mu) / sd
    dist = torch.cdist(q, (feats - mu) / sd)
    if k == 1:
        return train.deltas[dist.argmin(1)]
    return train.deltas[dist.topk(min(k, dist.shape[1]), largest=False).indices].mean(1)


def noise_deltas(model: OCDModel, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """ρ(x) · z with z ~ N(0, I) drawn from each sample's seed: a delta of OCD's magnitude in a random
    direction (N, *W), the baseline a denoiser has to beat to have learned a direction."""
    rho = model.scale_net(*model.latents(x).flat())
    z = torch.stack([torch.randn(model.delta_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return z.to(rho) * rho.view(-1, *[1] * len(model.delta_shape))


def tent_deltas(model: OCDModel, x: torch.Tensor, target_cfg: TargetConfig, steps: int) -> torch.Tensor:
    """TENT-style test-time adaptation of the OCD layer on each request alone: ``steps`` steps of the
    targets' optimizer on the prediction's entropy (no label). (N, *W)."""
    cfg = target_cfg.model_copy(update={"loss": "entropy", "steps": steps})
    return overfit_deltas(model.base, model.layer, x, torch.zeros(x.shape[0], dtype=torch.long), cfg)


def error_auroc(uncertainty: torch.Tensor, errors: torch.Tensor) -> float | None:
    """AUROC of ``uncertainty`` (N,) for telling the model's errors (N,) bool from its correct answers:
    the chance that a random error is more uncertain than a random correct answer (ties count half).
    None when there are no errors or no correct answers."""
    e, c = uncertainty[errors].double(), uncertainty[~errors].double()
    if e.numel() == 0 or c.numel() == 0:
        return None
    greater = (e.view(-1, 1) > c.view(1, -1)).double().mean()
    ties = (e.view(-1, 1) == c.view(1, -1)).double().mean()
    return (greater + 0.5 * ties).item()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy (nats) of probabilities (N, C) -> (N,): the uncertainty the service serves."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


@torch.no_grad()
def evaluate(
    model: OCDModel,
    x: torch.Tensor,
    y: torch.Tensor,
    train: TargetSet | None,
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
        "knn_average": lambda: adapted(lambda s: nearest_neighbour_deltas(model, train, x[s], KNN)),
        "noise_delta": lambda: adapted(lambda s: noise_deltas(model, x[s], seeds[s])),
    }
    if task == "classification":
        for k in (1, 3):
            jobs[f"tent_{k}"] = lambda k=k: adapted(lambda s: tent_deltas(model, x[s], target_cfg, k))
    for st in ddim_steps:
        jobs[f"ddim_{st}"] = lambda st=st: ocd(st, 1)
    if only is not None:
        return {"rows": {k: metrics(jobs[k](), y, task) for k in only}}
    rows, outs = {}, {}
    for name, job in tqdm(jobs.items(), desc="evaluate", disable=not progress, leave=False):
        outs[name] = job()
        rows[name] = metrics(outs[name], y, task)
    result: dict[str, Any] = {"rows": rows, "cost": cost(model, x[:1], default_steps, target_cfg)}
    if task == "classification":
        result["reliability"] = {k: reliability(outs[k], y) for k in ("base", "ocd_ensemble")}
        for k in ("base", "ocd_ensemble"):  # the served uncertainty: the entropy of the (ensemble) mean
            result["reliability"][k]["error_auroc"] = error_auroc(entropy(outs[k]), outs[k].argmax(1) != y)
    return result


@torch.no_grad()
def cost(
    model: OCDModel, x1: torch.Tensor, steps: int, target_cfg: TargetConfig | None = None, repeats: int = 20
) -> dict[str, float]:
    """FLOPs and ms per prediction at batch 1 (base vs OCD with ``steps`` DDIM steps, K=1; for
    classification also the TENT peer with 3 steps: its backward passes and the adapted forward)."""
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

    out = {
        "base_flops": fb.get_total_flops(),
        "ocd_flops": fo.get_total_flops(),
        "base_ms": ms(lambda: model.base(x1)),
        "ocd_ms": ms(lambda: model.predict(x1, steps, 1, seeds=[0])),
    }
    if model.task == "classification" and target_cfg is not None:
        tent = lambda: adapted_forward(model.base, model.layer, x1, tent_deltas(model, x1, target_cfg, 3))
        out["tent_3_ms"] = ms(tent)
    return out
