"""Capture I(x) = (layer input, layer output, network output) with forward hooks.

Works on an unmodified ``nn.Module``: the layer is addressed by its dotted name
(``"fc1"``, ``"features.3"``) and its latents are recorded by a hook, so the model's
``forward`` need not return them (the original code required it to).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .nets.user import check_output


@dataclass
class Latents:
    """Latents of one forward pass, all taken with the base weights.

    inp:  (B, *layer_in)  input of the layer   (e.g. (B, 120) for LeNet5 fc1)
    act:  (B, *layer_out) output of the layer  (e.g. (B, 84))
    out:  (B, *net_out)   network output       (e.g. (B, 10) logits)
    grad: (B, *layer_out) or None: the output's error signal carried back to the layer's output
          for the model's own prediction, ∂CE(out, argmax out)/∂act (regression: ∂Σout/∂act).
          It needs no label; a per-sample delta is the outer product of such a signal with inp.
    """

    inp: torch.Tensor
    act: torch.Tensor
    out: torch.Tensor
    grad: torch.Tensor | None = None

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three latents flattened to (B, d_i), (B, d_a), (B, d_o)."""
        return self.inp.flatten(1), self.act.flatten(1), self.out.flatten(1)


def pool_latents(lat: Latents, size: int, conv: bool = False) -> Latents:
    """Latents that do not depend on how many points a layer saw: a Linear layer applied at many
    points (tinyNeRF: every sample of every ray) gets its input, output and error signal averaged
    over them, (B, ..., n) -> (B, n); a Conv2d layer's (``conv``) are average-pooled per channel,
    (B, C, H, W) -> (B, C, size, size) (a log-mel clip: 4,040 values -> 64); an image output
    (B, C, H, W) is average-pooled to size x size."""

    def points(v: torch.Tensor | None) -> torch.Tensor | None:
        if v is None or v.ndim <= 2:
            return v
        return _pool2d(v, size) if conv else v.reshape(v.shape[0], -1, v.shape[-1]).mean(1)

    out = _pool2d(lat.out, size) if lat.out.ndim == 4 else lat.out
    return Latents(points(lat.inp), points(lat.act), out, points(lat.grad))


def _pool2d(v: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): adaptive average pooling as two averaging matrices
    (ONNX exports it at any size)."""
    rows, cols = _bins(v.shape[-2], size).to(v), _bins(v.shape[-1], size).to(v)
    return torch.einsum("bchw,ph,qw->bcpq", v, rows, cols)


def _bins(n: int, p: int) -> torch.Tensor:
    """(p, n): row i averages adaptive_avg_pool's bin i, [floor(i·n/p), ceil((i+1)·n/p))."""
    rows = []
    for i in range(p):
        start, end = (i * n) // p, -(-((i + 1) * n) // p)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(n)])
    return torch.tensor(rows)  # built from Python numbers: a constant when traced for ONNX


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted name; a clear error listing candidates if absent."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        raise ValueError(f"model has no layer {name!r}; Linear/Conv2d layers: {names}") from None


def output_grad(out: torch.Tensor, act: torch.Tensor, task: str) -> torch.Tensor:
    """∂CE(out, argmax out)/∂act per sample (classification) or ∂Σout/∂act (regression).

    Summed over the batch, so each sample's signal does not depend on the batch size."""
    loss = F.cross_entropy(out, out.argmax(-1), reduction="sum") if task == "classification" else out.sum()
    return torch.autograd.grad(loss, act)[0]


def tap(
    model: nn.Module, layer: str, x: torch.Tensor | tuple[torch.Tensor, ...], grad_task: str | None = None
) -> Latents:
    """Run ``model(x)`` (``model(*x)`` for a tuple) once and return the latents of ``layer``; with
    ``grad_task`` ("classification" / "regression") also the output error signal at the layer (one backward)."""
    module = get_layer(model, layer)
    seen: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        seen["inp"] = args[0]
        if grad_task is None:
            seen["act"] = output
            return None
        seen["act"] = output.detach().requires_grad_(True)
        return seen["act"]

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad() if grad_task else contextlib.nullcontext():
            out = check_output(model(*x) if isinstance(x, tuple) else model(x))
            if "inp" not in seen:
                raise RuntimeError(f"layer {layer!r} was not called during the forward pass")
            grad = output_grad(out, seen["act"], grad_task) if grad_task else None
    finally:
        handle.remove()
    if grad_task:
        return Latents(seen["inp"].detach(), seen["act"].detach(), out.detach(), grad)
    return Latents(seen["inp"], seen["act"], out)
