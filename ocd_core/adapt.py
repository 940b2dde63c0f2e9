"""Apply a batch of per-sample weight deltas to one layer in a single functional call.

Row n of the batch runs with weight W + Δ_n. Two paths, equal within float error:
- generic: ``vmap`` over ``functional_call`` with the layer's weight batched (any layer type);
- Linear fast path (the multi-LoRA serving trick): one shared base forward, and the layer's
  output gets the per-sample add-on ``bmm(Δ_n, x_n)`` from a forward hook.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from .tap import get_layer


def _linear_fast(model: nn.Module, module: nn.Linear, x: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    def hook(_m: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        inp = args[0]  # (N, ..., in)
        return output + torch.einsum("n...i,noi->n...o", inp, deltas)

    handle = module.register_forward_hook(hook)
    try:
        return model(x)
    finally:
        handle.remove()


def _generic(model: nn.Module, layer: str, x: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    key = f"{layer}.weight"
    params = {k: p.detach() for k, p in model.named_parameters()}
    params.update(dict(model.named_buffers()))
    base_w = params[key]

    def one(delta: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**params, key: base_w + delta.reshape(base_w.shape)}, (xi.unsqueeze(0),))
        return out.squeeze(0)

    return vmap(one)(deltas, x)


def adapted_forward(model: nn.Module, layer: str, x: torch.Tensor, deltas: torch.Tensor,
                    fast: bool = True) -> torch.Tensor:
    """x: (N, *input), deltas: (N, *W.shape) -> outputs (N, *output) with row n using W + Δ_n.

    The model must be in eval mode (per-sample results must not depend on the batch).
    """
    module = get_layer(model, layer)
    if deltas.shape[0] != x.shape[0]:
        raise ValueError(f"{deltas.shape[0]} deltas for {x.shape[0]} inputs")
    if tuple(deltas.shape[1:]) != tuple(module.weight.shape):
        raise ValueError(f"delta shape {tuple(deltas.shape[1:])} != {layer}.weight {tuple(module.weight.shape)}")
    if fast and isinstance(module, nn.Linear):
        return _linear_fast(model, module, x, deltas)
    return _generic(model, layer, x, deltas)
