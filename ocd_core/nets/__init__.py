"""Base architectures, built from a bundle manifest: a built-in by name, a class registered in this
process, or your own class by import path (``package.module:Class``, from allowed modules only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .audio_cnn import AudioCNN
from .lenet import LeNet5
from .mlp import TabularMLP
from .nerf import TinyNeRF
from .user import ArchImportError, OutputSelector, SelectOutput, import_object, is_import_path

BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "mlp": TabularMLP,
    "audio_cnn": AudioCNN,
    "tiny_nerf": TinyNeRF,
}
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = dict(BUILTIN)


def register_architecture(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``factory`` buildable by ``name`` in this process. A server in another process cannot
    see it: for bundles that ``ocd serve`` loads, name the class by import path instead."""
    if name in BUILTIN:
        raise ValueError(f"register_architecture: {name!r} is a built-in architecture; pick another name")
    if is_import_path(name):
        raise ValueError(f"register_architecture: {name!r} is an import path; those need no registration")
    ARCHITECTURES[name] = factory


def build_net(
    arch: str,
    allow_modules: Sequence[str] = (),
    output: OutputSelector | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Instantiate a base architecture, e.g. ``build_net("lenet5", num_classes=10)`` or
    ``build_net("mypkg.nets:LeNet", allow_modules=["mypkg"], output=OutputSelector(index=0))``."""
    if is_import_path(arch):
        factory = import_object(arch, allow_modules)  # an nn.Module class defined in an allowed module
    else:
        try:
            factory = ARCHITECTURES[arch]
        except KeyError:
            raise ValueError(
                f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)} "
                "(or name your own class by import path, 'package.module:Class')"
            ) from None
    net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise ArchImportError(f"architecture {arch!r} built a {type(net).__name__}, not a torch nn.Module")
    if output is not None:
        net = SelectOutput(net, output.resolve(allow_modules), output.model_dump_json(exclude_none=True))
    return net


__all__ = [
    "ARCHITECTURES",
    "BUILTIN",
    "ArchImportError",
    "OutputSelector",
    "SelectOutput",
    "build_net",
    "register_architecture",
]
