"""Your own architecture: imported by path (``package.module:Class``) from modules the operator
allowed, and its forward's output reduced to the prediction tensor when it returns more.

A bundle names its base model's class by import path; loading it imports that module only when it
is on the allow-list (``allow_modules``: ``ocd serve --allow-module pkg``, ``OCD_ALLOW_MODULES``).
Nothing a request sends names code: the path comes from the manifest the operator published.
"""

from __future__ import annotations

import importlib
import inspect
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import BaseModel, model_validator
from torch import fx, nn


class ArchImportError(ValueError):
    """An architecture or output function that cannot (or may not) be imported."""


def is_import_path(name: str) -> bool:
    return ":" in name


def env_allow_modules() -> list[str]:
    """The operator's allow-list from ``OCD_ALLOW_MODULES`` (comma-separated package names)."""
    return parse_allow(os.environ.get("OCD_ALLOW_MODULES", ""))


def parse_allow(value: str | Sequence[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    return [a.strip() for a in items if a.strip()]


def module_allowed(module: str, allow_modules: Sequence[str]) -> bool:
    """``pkg`` allows ``pkg`` and ``pkg.sub.mod``; nothing else."""
    return any(module == a or module.startswith(a + ".") for a in allow_modules if a)


def import_object(path: str, allow_modules: Sequence[str], what: str = "architecture") -> Any:
    """``"package.module:Name"`` -> the object, if ``package.module`` is allowed and ``Name`` is defined
    there: an ``nn.Module`` class (``what`` "architecture") or a function (otherwise). No attribute paths
    (``mod:torch.os.system`` would reach anything the module imported), no private names."""
    module, _, attr = path.partition(":")
    if not module or not attr.isidentifier() or attr.startswith("_"):
        raise ArchImportError(f"{what} {path!r}: expected 'package.module:Name' with a public top-level Name")
    if not module_allowed(module, allow_modules):
        top = module.split(".")[0]
        raise ArchImportError(
            f"{what} {path!r}: module {module!r} is not allowed to be imported; allow it with "
            f"--allow-module {top} (OCD_ALLOW_MODULES={top}, or allow_modules=[{top!r}] in Python)"
        )
    try:
        mod: Any = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001  ImportError, or whatever the module raised while loading
        raise ArchImportError(
            f"{what} {path!r}: cannot import {module!r} ({type(e).__name__}: {e}); is it installed or on PYTHONPATH?"
        ) from None
    if not hasattr(mod, attr):
        raise ArchImportError(f"{what} {path!r}: module {module!r} has no {attr!r}")
    obj = getattr(mod, attr)
    is_class = isinstance(obj, type) and issubclass(obj, nn.Module)
    if not (is_class if what == "architecture" else inspect.isfunction(obj)):
        kind = "a torch nn.Module class" if what == "architecture" else "a function"
        raise ArchImportError(f"{what} {path!r}: is not {kind}")
    if not module_allowed(getattr(obj, "__module__", "") or "", allow_modules):
        raise ArchImportError(
            f"{what} {path!r}: is defined in {obj.__module__!r}, which is not allowed (only imported into {module!r})"
        )
    return obj


def import_path_of(obj: Any, what: str) -> str:
    """The import path that rebuilds ``obj`` (a class or a module-level function) in another process."""
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module is None or "<" in qual or "." in qual:  # <lambda>, <locals>, a nested class or a method
        raise ArchImportError(
            f"{what}: {qual or repr(obj)} is not importable by path; define it at a module's top level"
        )
    if module == "__main__":
        raise ArchImportError(
            f"{what}: {qual} is defined in __main__, which the server cannot import; move it into a module"
        )
    return f"{module}:{qual}"


class OutputSelector(BaseModel):
    """Which part of a forward's output is the prediction: exactly one of ``index`` (a tuple or
    list), ``key`` (a dict) or ``function`` (``"package.module:fn"``, output -> tensor)."""

    index: int | None = None
    key: str | None = None
    function: str | None = None

    @model_validator(mode="after")
    def _one(self) -> OutputSelector:
        if sum(v is not None for v in (self.index, self.key, self.function)) != 1:
            raise ValueError("output: set exactly one of index, key or function")
        return self

    @classmethod
    def of(cls, output: int | str | Callable | OutputSelector) -> OutputSelector:
        """From what a user passes: an index, a key, or a module-level function."""
        if isinstance(output, OutputSelector):
            return output
        if isinstance(output, bool) or not isinstance(output, (int, str)) and not callable(output):
            raise ArchImportError(f"output: expected an index, a key or a function, got {type(output).__name__}")
        if isinstance(output, int):
            return cls(index=output)
        if isinstance(output, str):
            return cls(key=output)
        if not inspect.isfunction(output):
            kind = type(output).__name__
            raise ArchImportError(f"output: a {kind} is not a function defined at a module's top level")
        return cls(function=import_path_of(output, "output"))

    def resolve(self, allow_modules: Sequence[str]) -> Callable[[Any], torch.Tensor]:
        if self.function is not None:
            return import_object(self.function, allow_modules, "output function")
        return operator.itemgetter(self.index if self.index is not None else self.key)  # (picklable)


class SelectOutput(nn.Module):
    """``model`` whose forward returns only the prediction, ``select(model(x))``.

    It shares the model's parameters, buffers and submodules (the same dicts), so layer names,
    state-dict keys, submodule hooks, ``functional_call`` and torch.fx splits are the model's own: a
    layer "fc1" is "fc1" here, and the user's checkpoint loads into either. (Hooks registered on the
    model's root module itself do not run: its ``forward`` is called directly.)
    x: (B, *input) -> (B, *out) tensor."""

    def __init__(self, model: nn.Module, select: Callable[[Any], torch.Tensor], description: str = ""):
        super().__init__()
        for name in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, name, getattr(model, name))
        # plain attributes, out of the module's namespace (a user submodule may be called "select")
        object.__setattr__(self, "_ocd_inner", model)
        object.__setattr__(self, "_ocd_select", select)
        object.__setattr__(self, "_ocd_description", description)
        self.training = model.training

    @property
    def inner(self) -> nn.Module:
        return self._ocd_inner

    def train(self, mode: bool = True) -> SelectOutput:
        self._ocd_inner.train(mode)
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._ocd_select(self._ocd_inner.forward(x))  # .forward, not __call__: torch.fx traces through it
        if not isinstance(out, (torch.Tensor, fx.Proxy)):
            raise TypeError(f"output {self._ocd_description}: selected a {type(out).__name__}, not a tensor")
        return out


def check_output(out: Any, where: str = "the model's forward") -> torch.Tensor:
    """The prediction tensor, or an error that says how to pick it from a tuple or dict."""
    if isinstance(out, torch.Tensor):
        return out
    hint = "an index" if isinstance(out, (tuple, list)) else "a key" if isinstance(out, dict) else "a function"
    raise TypeError(
        f"{where} returned a {type(out).__name__}, not a tensor; pass output= ({hint}) to pick the prediction"
    )
