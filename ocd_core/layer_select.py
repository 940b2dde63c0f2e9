"""Automatic layer selection (the paper's criterion, as in the original ``blockselect``): for each
candidate layer, re-draw its weights at random many times, take the per-sample losses on a fixed
sample set, estimate their density with a Gaussian KDE (bandwidth 0.2, on a grid over [0, 100])
and its entropy; a layer scores the maximal entropy over the draws, normalised by the best layer.
The top layer is where OCD adapts; the second is the "alternative layer" ablation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap


@dataclass
class LayerScore:
    layer: str
    entropy: float  # max over draws of the KDE entropy of the per-sample losses
    score: float  # entropy / the best layer's entropy


def candidate_layers(model: nn.Module) -> list[str]:
    """Linear and Conv2d layers (the original: every module with a >= 2-D weight)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def kde_entropy(losses: torch.Tensor, bandwidth: float = 0.2, grid: torch.Tensor | None = None) -> torch.Tensor:
    """losses (D, N) -> (D,) entropy −Σ p·log p of a Gaussian KDE evaluated on ``grid`` (as the original)."""
    grid = torch.linspace(0, 100, 100, dtype=losses.dtype) if grid is None else grid
    z = (grid[None, :, None] - losses[:, None, :]) / bandwidth  # (D, G, N)
    log_p = torch.logsumexp(-0.5 * z**2, dim=-1) - math.log(losses.shape[1] * bandwidth * math.sqrt(2 * math.pi))
    return -(log_p.exp() * log_p).sum(-1)


@torch.no_grad()
def rank_layers(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str = "cross_entropy",
    draws: int = 100,
    seed: int = 0,
    chunk: int = 10,
    layers: list[str] | None = None,
) -> list[LayerScore]:
    """Score every candidate layer on samples (x, y); best first."""
    model.eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    params.update(dict(model.named_buffers()))
    g = torch.Generator().manual_seed(seed)
    results = []
    for layer in layers or candidate_layers(model):
        key = f"{layer}.weight"
        w = params[key]
        fan_in = w[0].numel()
        best = -math.inf

        def losses_for(weight: torch.Tensor, key: str = key) -> torch.Tensor:
            out = functional_call(model, {**params, key: weight}, (x,))
            if loss == "cross_entropy":
                return torch.nn.functional.cross_entropy(out, y, reduction="none")
            return ((out - y.reshape(out.shape)) ** 2).flatten(1).mean(1)

        for start in range(0, draws, chunk):
            k = min(chunk, draws - start)
            # kaiming-normal re-draws of the layer's weight, as the original's change_block_weights
            ws = torch.stack([torch.randn(w.shape, generator=g) for _ in range(k)]).to(w) * math.sqrt(2.0 / fan_in)
            best = max(best, float(kde_entropy(vmap(losses_for)(ws)).max()))
        results.append((layer, best))
    top = max(h for _, h in results)
    return sorted((LayerScore(n, h, h / top if top > 0 else 0.0) for n, h in results), key=lambda s: -s.entropy)
