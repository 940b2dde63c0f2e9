"""Per-sample overfitting targets: Δ_s = θ_s − θ for one layer's weight.

For every training sample s = (x, y) the layer's weight alone is finetuned on s alone
(original code: Adam, lr 5e-4, 3 steps for MNIST). ``overfit_deltas`` does this for a
whole batch of samples at once with torch.func (functional_call + vmap + grad) and a
hand-vectorised optimizer; ``overfit_deltas_reference`` is the original per-sample loop
(deepcopy + torch.optim), kept as the ground truth for tests and benchmarks.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn
from torch.func import functional_call, grad, vmap

from .tap import get_layer


class TargetConfig(BaseModel):
    """How one sample is overfitted (defaults: the original MNIST recipe)."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(5e-4, gt=0)
    steps: int = Field(3, ge=1)
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = Field(0.0, ge=0)  # SGD only


def sample_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss of a batch: out (B, C) logits or (B, *) regression, y (B,) labels or (B, *)."""
    if kind == "cross_entropy":
        return F.cross_entropy(out, y)
    if kind == "mse":
        return F.mse_loss(out, y.reshape(out.shape).to(out.dtype))
    raise ValueError(f"unknown loss {kind!r}; use 'cross_entropy' or 'mse'")


def _weight_key(model: nn.Module, layer: str) -> str:
    get_layer(model, layer)
    return f"{layer}.weight"


@torch.no_grad()
def _chunk_deltas(model, key, params, x, y, cfg: TargetConfig) -> torch.Tensor:
    base_w = params[key]

    def loss_of(w: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**params, key: w}, (xi.unsqueeze(0),))
        return sample_loss(cfg.loss, out, yi.unsqueeze(0))

    per_sample_grad = vmap(grad(loss_of))
    w = base_w.expand(x.shape[0], *base_w.shape).clone()  # (B, *W.shape)
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    b1, b2 = cfg.betas
    for step in range(1, cfg.steps + 1):
        with torch.enable_grad():
            g = per_sample_grad(w, x, y)
        if cfg.optimizer == "adam":  # same arithmetic as torch.optim.Adam (single-tensor path)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2 = 1 - b1**step, 1 - b2**step
            denom = (v.sqrt() / bc2**0.5).add_(cfg.eps)
            w.addcdiv_(m, denom, value=-cfg.lr / bc1)
        elif cfg.optimizer == "sgd":
            if cfg.momentum:
                m = g.clone() if step == 1 else m.mul_(cfg.momentum).add_(g)
                g = m
            w.add_(g, alpha=-cfg.lr)
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'adam' or 'sgd'")
    return w - base_w


def overfit_deltas(model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor,
                   cfg: TargetConfig | None = None, chunk: int = 512) -> torch.Tensor:
    """Vectorised per-sample deltas of ``layer``'s weight.

    x: (N, *input) samples, y: (N,) labels or (N, *target). Returns (N, *W.shape).
    The model is used in eval mode and is not modified.
    """
    cfg = cfg or TargetConfig()
    key = _weight_key(model, layer)
    was_training = model.training
    model.eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    params.update({k: b for k, b in model.named_buffers()})
    try:
        parts = [_chunk_deltas(model, key, params, x[i:i + chunk], y[i:i + chunk], cfg)
                 for i in range(0, x.shape[0], chunk)]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def overfit_deltas_reference(model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor,
                             cfg: TargetConfig | None = None) -> torch.Tensor:
    """The original recipe, one sample at a time: deepcopy, an optimizer on the layer, ``steps`` steps."""
    cfg = cfg or TargetConfig()
    key = _weight_key(model, layer)
    base_w = dict(model.named_parameters())[key].detach()
    deltas = []
    for xi, yi in zip(x, y):
        m = copy.deepcopy(model).eval()
        w = dict(m.named_parameters())[key]
        for p in m.parameters():
            p.requires_grad_(p is w)
        if cfg.optimizer == "adam":
            opt = torch.optim.Adam([w], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
        else:
            opt = torch.optim.SGD([w], lr=cfg.lr, momentum=cfg.momentum, foreach=False)
        for _ in range(cfg.steps):
            opt.zero_grad()
            sample_loss(cfg.loss, m(xi.unsqueeze(0)), yi.unsqueeze(0)).backward()
            opt.step()
        deltas.append(w.detach() - base_w)
    return torch.stack(deltas)
