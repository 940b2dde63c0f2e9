"""Apply a batch of per-sample weight deltas to one layer in a single functional call.

Row n of the batch runs with weight W + Δ_n. Three paths, equal within float error:
- generic: ``vmap`` over ``functional_call`` with the layer's weight batched (any layer type);
- Linear fast path (the multi-LoRA serving trick): one shared base forward, and the layer's
  output gets the per-sample add-on ``bmm(Δ_n, x_n)`` from a forward hook. A ``LowRankDelta``
  (Δ = ρ·(a·X + U Vᵀ)) is applied there without being formed: ρ·(a·X x + U (Vᵀ x));
- Conv2d fast path: the same hook, with the add-on Δ_n ⋆ x_n as one bmm of Δ_n (out, in·kh·kw)
  with x_n's patches, which a convolution with a fixed one-hot kernel extracts (no vmap: it
  exports to ONNX).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from .tap import get_layer


@dataclass
class LowRankDelta:
    """Per-sample deltas Δ_n = ρ_n·(a_n·X_n + U_n V_nᵀ): rho, a (N,); X (N, *W.shape) (the DDIM start
    noise); U (N, out, m); V (N, in_total, m). What the low-rank DDIM sampler returns."""

    rho: torch.Tensor
    a: torch.Tensor
    x: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def dense(self) -> torch.Tensor:
        """(N, *W.shape) materialised."""
        dt = self.x.dtype
        w = (self.rho * self.a).to(dt).view(-1, 1, 1) * self.x.reshape(self.u.shape[0], self.u.shape[1], -1)
        u = (self.u * self.rho.view(-1, 1, 1)).to(dt)
        return w.baddbmm_(u, self.v.to(dt).transpose(1, 2)).view(self.x.shape)

    def apply(self, inp: torch.Tensor) -> torch.Tensor:
        """inp (N, ..., in) -> Δ_n applied: (N, ..., out)."""
        lead = inp.shape[1:-1]
        h = inp.reshape(inp.shape[0], -1, inp.shape[-1])  # (N, L, in)
        noise = torch.bmm(h, self.x.view(self.u.shape[0], self.u.shape[1], -1).transpose(1, 2))
        out = torch.baddbmm(noise * self.a.view(-1, 1, 1), torch.bmm(h, self.v), self.u.transpose(1, 2))
        out = out * self.rho.view(-1, 1, 1)
        return out.reshape(inp.shape[0], *lead, -1)


def linear_fast_forward(
    model: nn.Module, module: nn.Linear, x: tuple[torch.Tensor, ...], deltas: torch.Tensor | LowRankDelta
) -> torch.Tensor:
    """``model(*x)`` with ``module``'s output plus Δ_n applied to its input, per row n (no checks)."""

    def hook(_m: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        inp = args[0]  # (N, ..., in)
        if isinstance(deltas, LowRankDelta):
            return output + deltas.apply(inp)
        return output + torch.einsum("n...i,noi->n...o", inp, deltas)

    handle = module.register_forward_hook(hook)
    try:
        return model(*x)
    finally:
        handle.remove()


def conv2d_fast_forward(
    model: nn.Module, module: nn.Conv2d, x: tuple[torch.Tensor, ...], deltas: torch.Tensor | LowRankDelta
) -> torch.Tensor:
    """``model(*x)`` with ``module``'s output plus Δ_n ⋆ (its input n), per row n (no checks;
    ``groups == 1``, zero padding)."""
    deltas = deltas.dense() if isinstance(deltas, LowRankDelta) else deltas
    out_ch, in_ch, kh, kw = module.weight.shape

    def hook(_m: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        inp = args[0]  # (N, C, H, W)
        eye = torch.eye(in_ch * kh * kw, dtype=inp.dtype, device=inp.device).view(-1, in_ch, kh, kw)
        patches = F.conv2d(inp, eye, None, module.stride, module.padding, module.dilation)  # (N, C·kh·kw, H', W')
        add = torch.bmm(deltas.reshape(inp.shape[0], out_ch, -1).to(inp.dtype), patches.flatten(2))
        return output + add.view_as(output)

    handle = module.register_forward_hook(hook)
    try:
        return model(*x)
    finally:
        handle.remove()


def fast_path(module: nn.Module):
    """The hook-based forward for ``module``'s type (Linear; Conv2d without groups), else None."""
    if isinstance(module, nn.Linear):
        return linear_fast_forward
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return conv2d_fast_forward
    return None


def _generic(model: nn.Module, layer: str, x: tuple[torch.Tensor, ...], deltas: torch.Tensor) -> torch.Tensor:
    key = f"{layer}.weight"
    params = {k: p.detach() for k, p in model.named_parameters()}
    params.update(dict(model.named_buffers()))
    base_w = params[key]

    def one(delta: torch.Tensor, *xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(
            model, {**params, key: base_w + delta.reshape(base_w.shape)}, tuple(v.unsqueeze(0) for v in xi)
        )
        return out.squeeze(0)

    return vmap(one)(deltas, *x)


def adapted_forward(
    model: nn.Module,
    layer: str,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    deltas: torch.Tensor | LowRankDelta,
    fast: bool = True,
) -> torch.Tensor:
    """x: (N, *input) (or a tuple of model inputs), deltas: (N, *W.shape) or a LowRankDelta
    -> outputs (N, *output) with row n using W + Δ_n.

    The model must be in eval mode (per-sample results must not depend on the batch).
    """
    module = get_layer(model, layer)
    x = x if isinstance(x, tuple) else (x,)
    if deltas.shape[0] != x[0].shape[0]:
        raise ValueError(f"{deltas.shape[0]} deltas for {x[0].shape[0]} inputs")
    if tuple(deltas.shape[1:]) != tuple(module.weight.shape):
        raise ValueError(f"delta shape {tuple(deltas.shape[1:])} != {layer}.weight {tuple(module.weight.shape)}")
    forward = fast_path(module) if fast else None
    if forward is not None:
        return forward(model, module, x, deltas)
    return _generic(model, layer, x, deltas.dense() if isinstance(deltas, LowRankDelta) else deltas)
