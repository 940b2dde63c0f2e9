"""Per-sample overfitting targets: Δ_s = θ_s − θ for one layer's weight.

For every training sample s = (x, y) the layer's weight alone is finetuned on s alone
(original code: Adam, lr 5e-4, 3 steps for MNIST). ``overfit_deltas`` does this for a
whole batch of samples at once with torch.func (functional_call + vmap + grad) and a
hand-vectorised optimizer; ``overfit_deltas_reference`` is the original per-sample loop
(deepcopy + torch.optim), kept as the ground truth for tests and benchmarks.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn
from torch.func import functional_call, grad, vmap

from .adapt import fast_path
from .split import check_split, split_model
from .tap import get_layer

log = logging.getLogger("ocd.targets")
_logged: set[tuple[str, str]] = set()


def log_once(model: nn.Module, what: str, message: str, *args) -> None:
    """One log line per (model class, fallback) in this process."""
    key = (type(getattr(model, "inner", model)).__qualname__, what)
    if key not in _logged:
        _logged.add(key)
        log.warning(message, *args)


class TargetConfig(BaseModel):
    """How one sample is overfitted (defaults: the original MNIST recipe)."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(5e-4, gt=0)
    steps: int = Field(3, ge=1)
    # entropy: the prediction's own entropy, no label (TENT-style test-time adaptation of the layer)
    loss: Literal["cross_entropy", "mse", "entropy"] = "cross_entropy"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = Field(0.0, ge=0)  # SGD only


def sample_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss of a batch: out (B, C) logits or (B, *) regression, y (B,) labels or (B, *)
    (``entropy`` ignores y: the mean entropy of the softmax of out)."""
    if kind == "cross_entropy":
        return F.cross_entropy(out, y)
    if kind == "mse":
        return F.mse_loss(out, y.reshape(out.shape).to(out.dtype))
    if kind == "entropy":
        logp = out.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1).mean()
    raise ValueError(f"unknown loss {kind!r}; use 'cross_entropy', 'mse' or 'entropy'")


def _weight_key(model: nn.Module, layer: str) -> str:
    get_layer(model, layer)
    return f"{layer}.weight"


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    params = {k: p.detach() for k, p in module.named_parameters()}
    params.update(dict(module.named_buffers()))
    return params


@torch.no_grad()
def _chunk_deltas(
    model: nn.Module, key: str, inputs: tuple[torch.Tensor, ...], y: torch.Tensor, cfg: TargetConfig
) -> torch.Tensor:
    """``model(*inputs)`` -> output; inputs batched on dim 0 (the input, or the split's live values)."""
    params = _params(model)
    base_w = params[key]

    def loss_of(w: torch.Tensor, yi: torch.Tensor, *xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**params, key: w}, tuple(t.unsqueeze(0) for t in xi))
        return sample_loss(cfg.loss, out, yi.unsqueeze(0))

    per_sample_grad = vmap(grad(loss_of))
    w = base_w.expand(y.shape[0], *base_w.shape).clone()  # (B, *W.shape): one copy per sample
    # Adam and SGD act elementwise, so one optimizer over the stack equals one per sample.
    opt = _optimizer(cfg, w)
    for _ in range(cfg.steps):
        with torch.enable_grad():
            w.grad = per_sample_grad(w, y, *inputs).contiguous()  # (see _chunk_deltas_autograd)
        opt.step()
    return w - base_w


def _batch_independent(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    """True when the first two rows of ``model(*inputs)`` equal those rows run alone (a forward with
    ``.item()`` or a batch statistic in it is not)."""
    with torch.no_grad():
        full = model(*inputs)
        return all(
            torch.allclose(full[n : n + 1], model(*(t[n : n + 1] for t in inputs)), rtol=1e-4, atol=1e-5)
            for n in range(min(2, full.shape[0]))
        )


def _chunk_deltas_autograd(
    model: nn.Module, layer: str, inputs: tuple[torch.Tensor, ...], y: torch.Tensor, cfg: TargetConfig
) -> torch.Tensor:
    """The same deltas without torch.func, for a forward that vmap cannot run (a ``deepcopy`` or
    ``.item()`` inside it). A Linear / Conv2d layer in a forward whose rows do not depend on each other:
    one batched forward per step, the layer's output plus Δ_n·x_n from a hook (adapt.py), and ordinary
    autograd: sample n's loss depends on Δ_n only, so the gradient of the summed losses is every
    per-sample gradient at once. Otherwise: one sample at a time, as the original loop."""
    module = get_layer(model, layer)
    forward = fast_path(module)
    base_w = module.weight.detach()
    d = torch.zeros(y.shape[0], *base_w.shape, dtype=base_w.dtype, device=base_w.device)
    opt = _optimizer(cfg, d)  # Adam / SGD act elementwise: stepping Δ equals stepping W + Δ
    key, params = f"{layer}.weight", _params(model)
    batched = forward is not None and _batch_independent(model, inputs)

    def grad_of(rows: slice) -> torch.Tensor:
        leaf = d[rows].detach().requires_grad_(True)
        xs = tuple(t[rows] for t in inputs)
        with torch.enable_grad():
            if forward is not None:
                out = forward(model, module, xs, leaf)
            else:
                out = functional_call(model, {**params, key: base_w + leaf[0]}, xs)
            loss = sample_loss(cfg.loss, out, y[rows]) * leaf.shape[0]  # the sum of per-sample losses
            return torch.autograd.grad(loss, leaf)[0]

    for _ in range(cfg.steps):
        # contiguous: torch's fused CPU Adam / SGD step silently miscomputes for a gradient whose
        # strides differ from the parameter's (measured, torch 2.13: an einsum's transposed gradient)
        if batched:
            d.grad = grad_of(slice(None)).contiguous()
        else:
            d.grad = torch.cat([grad_of(slice(n, n + 1)) for n in range(y.shape[0])]).contiguous()
        with torch.no_grad():
            opt.step()
    return d.detach()


def _optimizer(cfg: TargetConfig, w: torch.Tensor) -> torch.optim.Optimizer:
    fused = w.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if cfg.optimizer == "adam":
        return torch.optim.Adam([w], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([w], lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'adam' or 'sgd'")


def overfit_deltas(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TargetConfig | None = None,
    chunk: int = 512,
    split: bool = True,
) -> torch.Tensor:
    """Vectorised per-sample deltas of ``layer``'s weight.

    x: (N, *input) samples, y: (N,) labels or (N, *target). Returns (N, *W.shape).
    The model is used in eval mode and is not modified. With ``split`` (and a model torch.fx
    can trace) the part upstream of the layer runs once, only the rest at every step.
    """
    cfg = cfg or TargetConfig()
    key = _weight_key(model, layer)
    was_training = model.training
    model.eval()
    parts_of = split_model(model, layer) if split else None
    if parts_of is not None and not check_split(model, parts_of, x[:2]):
        parts_of = None
    if split and parts_of is None:
        log_once(model, "fx", "targets: torch.fx cannot split %s at %r; every step runs the whole forward "
                 "(the layers before it too)", type(getattr(model, "inner", model)).__name__, layer)  # fmt: skip
    vmapped, fallback, reason, t0 = True, 0, "", 0.0
    try:
        parts = []
        for i in range(0, x.shape[0], chunk):
            xb, yb = x[i : i + chunk], y[i : i + chunk]
            with torch.no_grad():
                net, inputs = (model, (xb,)) if parts_of is None else (parts_of.tail, tuple(parts_of.head(xb)))
            if vmapped:
                try:
                    parts.append(_chunk_deltas(net, key, inputs, yb, cfg))
                    continue
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # noqa: BLE001  whatever torch.func cannot run: the plain-autograd path
                    vmapped, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    t0 = time.perf_counter()
            parts.append(_chunk_deltas_autograd(net, layer, inputs, yb, cfg))
            fallback += yb.shape[0]
        if fallback:
            rate = fallback / max(time.perf_counter() - t0, 1e-9)
            log_once(model, "vmap", "targets: torch.func.vmap cannot run %s's forward (%s); per-sample gradients "
                     "come from plain autograd instead (%.0f targets/s)", type(getattr(model, "inner", model)).__name__,
                     reason, rate)  # fmt: skip
    finally:
        model.train(was_training)
    return torch.cat(parts)


def overfit_deltas_reference(
    model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor, cfg: TargetConfig | None = None
) -> torch.Tensor:
    """The original recipe, one sample at a time (``utils_OCD.overfitting_batch``): deepcopy the
    model, an optimizer on the layer's weight only, ``steps`` steps; every parameter keeps
    requires_grad, as there. Differs from the original only in using eval mode."""
    cfg = cfg or TargetConfig()
    key = _weight_key(model, layer)
    base_w = dict(model.named_parameters())[key].detach()
    deltas = []
    for xi, yi in zip(x, y):
        m = copy.deepcopy(model).eval()
        w = dict(m.named_parameters())[key]
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
