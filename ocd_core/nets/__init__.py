"""Base architectures, built by name from a bundle manifest."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .audio_cnn import AudioCNN
from .lenet import LeNet5
from .mlp import TabularMLP
from .nerf import TinyNeRF

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "mlp": TabularMLP,
    "audio_cnn": AudioCNN,
    "tiny_nerf": TinyNeRF,
}


def register_architecture(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``factory`` buildable by name, so bundles of your own model load in this process (``ocd serve``
    knows only the built-in architectures so far)."""
    ARCHITECTURES[name] = factory


def build_net(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered base architecture, e.g. ``build_net("lenet5", num_classes=10)``."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}") from None
    return factory(**kwargs)
