"""Capture I(x) = (layer input, layer output, network output) with forward hooks.

Works on an unmodified ``nn.Module``: the layer is addressed by its dotted name
(``"fc1"``, ``"features.3"``) and its latents are recorded by a hook, so the model's
``forward`` need not return them (the original code required it to).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Latents:
    """Latents of one forward pass, all taken with the base weights.

    inp: (B, *layer_in)  input of the layer   (e.g. (B, 120) for LeNet5 fc1)
    act: (B, *layer_out) output of the layer  (e.g. (B, 84))
    out: (B, *net_out)   network output       (e.g. (B, 10) logits)
    """

    inp: torch.Tensor
    act: torch.Tensor
    out: torch.Tensor

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three latents flattened to (B, d_i), (B, d_a), (B, d_o)."""
        return self.inp.flatten(1), self.act.flatten(1), self.out.flatten(1)


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted name; a clear error listing candidates if absent."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        raise ValueError(f"model has no layer {name!r}; Linear/Conv2d layers: {names}") from None


def tap(model: nn.Module, layer: str, x: torch.Tensor) -> Latents:
    """Run ``model(x)`` once and return the latents of ``layer`` (no grad is disabled here)."""
    module = get_layer(model, layer)
    seen: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen["inp"], seen["act"] = args[0], output

    handle = module.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        handle.remove()
    if "inp" not in seen:
        raise RuntimeError(f"layer {layer!r} was not called during the forward pass")
    return Latents(seen["inp"], seen["act"], out)
