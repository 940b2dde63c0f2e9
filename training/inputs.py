"""What ``ocd_pipeline`` checks before any training: each mistake fails at once with one line that
names the argument (``InputError``), and nothing that cannot load is ever published.

The checks: data as tensors, numpy arrays or lists; the layer (a Linear or Conv2d); labels (integer
classes in range for classification); ``input_shape`` against the data and a dry forward of one
sample; the output (a tensor of (1, classes) logits, or picked with ``output=``); the architecture
spec (rebuilt from its import path and loaded with the model's weights, it must give the same
output); the modality's preprocessing; the version to publish.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ocd_core.audio import AudioSpec
from ocd_core.bundle import ArchSpec, InputSpec, Normalization, list_versions
from ocd_core.nets import BUILTIN, OutputSelector, SelectOutput
from ocd_core.nets.user import ArchImportError, check_output, import_path_of
from ocd_core.preprocess import TabularSpec

MODALITIES = ("tensor", "image", "tabular", "audio")
log = logging.getLogger("ocd.api")


class InputError(ValueError):
    """A wrong argument to ocd_pipeline / ocd fit: ``"<argument>: <reason>"``."""

    def __init__(self, arg: str, reason: str):
        super().__init__(f"{arg}: {reason}")
        self.arg, self.reason = arg, reason


def as_tensor(value: Any, arg: str) -> torch.Tensor:
    """A tensor, numpy array or (nested) list -> tensor (numbers only)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InputError(arg, f"expected a tensor, numpy array or list of numbers ({e})") from None
    if arr.dtype.kind not in "biuf":
        raise InputError(arg, f"expected numbers, got numpy dtype {arr.dtype}")
    return torch.from_numpy(arr.astype(np.float32) if arr.dtype.kind == "f" else arr.astype(np.int64))


def data_pair(value: Any, arg: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InputError(arg, "expected a pair (x, y)")
    x, y = as_tensor(value[0], f"{arg}[0] (x)"), as_tensor(value[1], f"{arg}[1] (y)")
    if not x.is_floating_point():
        x = x.float()
    if x.ndim < 2:
        raise InputError(arg, f"x must hold samples along its first dimension, got shape {list(x.shape)}")
    if len(x) != len(y):
        raise InputError(arg, f"x has {len(x)} samples and y {len(y)}")
    if len(x) == 0:
        raise InputError(arg, "holds no samples")
    if not torch.isfinite(x.float()).all():
        raise InputError(arg, "x holds NaN or infinite values")
    return x.float(), y


def check_layer(model: nn.Module, layer: str) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        module = model.get_submodule(layer) if layer else None
    except AttributeError:
        module = None
    if module is None:
        raise InputError("layer", f"the model has no submodule {layer!r}; its Linear/Conv2d layers: {names}")
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise InputError(
            "layer", f"{layer!r} is a {type(module).__name__}, not a Linear or Conv2d layer; those are: {names}"
        )


def with_output(base: nn.Module, output: Any, allow_modules: Sequence[str]) -> tuple[nn.Module, OutputSelector | None]:
    """The model whose forward returns the prediction, and the selector stored in the bundle."""
    if output is None:
        return base, None
    try:
        sel = OutputSelector.of(output)
        allow = list(allow_modules) + ([sel.function.partition(":")[0]] if sel.function else [])  # the caller's
        select = output if callable(output) else sel.resolve(allow)  # a function: the object given
        return SelectOutput(base, select, sel.model_dump_json(exclude_none=True)), sel
    except ArchImportError as e:
        raise InputError("output", str(e).removeprefix("output: ")) from None


def dry_forward(model: nn.Module, x: torch.Tensor, input_shape: list[int], has_output: bool) -> torch.Tensor:
    """One sample through the model: (1, *out) output, or an error naming what is wrong."""
    try:
        with torch.no_grad():
            out = model(x[:1])
    except Exception as e:  # noqa: BLE001  the user's forward: any error means the shape or the model is wrong
        raise InputError(
            "input_shape" if not has_output else "output",
            f"the model cannot run one sample of shape {input_shape}: {type(e).__name__}: {str(e).splitlines()[0]}",
        ) from None
    try:
        return check_output(out, "the model's forward")
    except TypeError as e:
        raise InputError("output", str(e)) from None


def check_targets(arg: str, y: torch.Tensor, out: torch.Tensor, task: str) -> torch.Tensor:
    """y -> (N,) int64 class indices in range, or (N, *out) float regression targets."""
    if task == "classification":
        if out.ndim != 2 or out.shape[1] < 2:
            raise InputError(
                "task",
                f"classification needs (batch, classes) logits with at least 2 classes; the model gives "
                f"{list(out.shape[1:])} per sample (use task='regression' for real-valued outputs)",
            )
        if y.is_floating_point() or y.dtype == torch.bool:
            raise InputError(
                arg,
                f"labels must be integer class indices for classification, got {str(y.dtype).removeprefix('torch.')}",
            )
        if y.ndim != 1:
            raise InputError(arg, f"labels must have shape (N,), got {list(y.shape)}")
        lo, hi, n = int(y.min()), int(y.max()), out.shape[1]
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise InputError(arg, f"label {bad} is out of range for a model with {n} outputs (classes 0..{n - 1})")
        return y.long()
    per = math.prod(out.shape[1:])
    if y.numel() != len(y) * per:
        raise InputError(arg, f"regression targets have {y.numel() // max(len(y), 1)} values per sample; "
                              f"the model outputs {list(out.shape[1:])}")  # fmt: skip
    return y.float().reshape(len(y), *out.shape[1:])


def arch_spec(
    base: nn.Module, arch: ArchSpec | str | None, output: OutputSelector | None, allow_modules: Sequence[str]
) -> ArchSpec:
    """The spec the bundle stores: given, or the model's own class by import path (no kwargs)."""
    builtin = next((name for name, cls in BUILTIN.items() if type(base) is cls), None)
    if arch is None and builtin is not None:
        raise InputError(
            "arch", f"pass arch=ArchSpec(arch={builtin!r}, kwargs={{...}}) with the constructor's arguments"
        )
    if arch is None:
        try:
            arch = ArchSpec(arch=import_path_of(type(base), "arch"))
        except ArchImportError as e:
            raise InputError("arch", f"{str(e).removeprefix('arch: ')}, or pass arch=ArchSpec(...)") from None
    elif isinstance(arch, str):
        arch = ArchSpec(arch=arch)
    if arch.arch not in BUILTIN and ":" not in arch.arch:
        log.warning(
            "arch %r is registered in this process only: `ocd serve` cannot load this bundle; name the class by "
            "import path ('package.module:Class') to serve it", arch.arch,
        )  # fmt: skip
    return arch.model_copy(update={"output": output})


def check_arch(spec: ArchSpec, model: nn.Module, x: torch.Tensor, out: torch.Tensor, allow: Sequence[str]) -> None:
    """Rebuild the model from ``spec`` as the server will, load the weights, compare one output."""
    paths = [spec.arch] + ([spec.output.function] if spec.output and spec.output.function else [])
    allow = list(allow) + [p.partition(":")[0] for p in paths if ":" in p]  # the objects the caller passed
    try:
        rebuilt = spec.build(allow)
    except (ArchImportError, ValueError, TypeError) as e:
        raise InputError(
            "arch", f"cannot rebuild the model from {spec.arch!r} with kwargs {spec.kwargs}: {e}"
        ) from None
    try:
        rebuilt.load_state_dict(model.state_dict())
    except RuntimeError as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip()) or str(e)
        raise InputError(
            "arch", f"{spec.arch!r} with kwargs {spec.kwargs} does not take the model's weights: {detail}"
        ) from None
    with torch.no_grad():
        again = check_output(rebuilt.eval()(x[:1]))
    if again.shape != out.shape or not torch.allclose(again, out, rtol=1e-4, atol=1e-5):
        raise InputError("arch", f"{spec.arch!r} with kwargs {spec.kwargs} rebuilds a model whose output differs")


def input_spec(
    modality: str,
    shape: list[int],
    normalization: Normalization | tuple[Sequence[float], Sequence[float]] | None,
    tabular: TabularSpec | None,
    audio: AudioSpec | None,
) -> InputSpec:
    """How the service turns a request into the model's input: the modality's preprocessing."""
    if modality not in MODALITIES:
        raise InputError("modality", f"unknown modality {modality!r}; use one of {list(MODALITIES)}")
    if isinstance(normalization, (tuple, list)):
        normalization = Normalization(mean=list(normalization[0]), std=list(normalization[1]))
    if normalization is not None:
        if len(normalization.mean) != len(normalization.std):
            raise InputError("normalization", "mean and std must have the same length")
        if any(s <= 0 for s in normalization.std):
            raise InputError("normalization", "std must be positive")
    options: dict[str, Any] = {}
    if modality == "image":
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise InputError("input_shape", f"an image model takes (channels 1 or 3, height, width), got {shape}")
        if normalization is not None and len(normalization.mean) not in (1, shape[0]):
            want = "1 value" if shape[0] == 1 else f"1 or {shape[0]} values"
            raise InputError("normalization", f"needs {want} per statistic (channel), got {len(normalization.mean)}")
        options["color"] = "L" if shape[0] == 1 else "RGB"
    elif modality == "tabular":
        if tabular is None:
            raise InputError(
                "tabular", "modality 'tabular' needs the preprocessing fitted on train: "
                "training.api.tabular_data(frame, target) returns it"
            )  # fmt: skip
        if [tabular.width] != shape:
            raise InputError("tabular", f"the preprocessing encodes {tabular.width} columns; input_shape is {shape}")
        options["tabular"] = tabular.model_dump()
    elif modality == "audio":
        audio = audio or AudioSpec()
        options["audio"] = audio.model_dump()
        if len(shape) != 3 or shape[:2] != [1, audio.n_mels]:
            raise InputError(
                "input_shape", f"an audio model takes log-mel features (1, {audio.n_mels}, frames), got {shape}"
            )
    for arg, given, where in (("tabular", tabular, "tabular"), ("audio", audio, "audio")):
        if given is not None and modality != where:
            raise InputError(arg, f"given for modality {modality!r}; it belongs to modality {where!r}")
    return InputSpec(shape=shape, normalization=normalization, options=options)


def check_labels(labels: Sequence[str] | None, out: torch.Tensor, task: str) -> list[str] | None:
    if task != "classification":
        if labels is not None:
            raise InputError("labels", "class names are for task='classification'")
        return None
    n = out.shape[1]
    if labels is None:
        return [str(i) for i in range(n)]
    labels = [str(v) for v in labels]
    if len(labels) != n:
        raise InputError("labels", f"{len(labels)} names for a model with {n} outputs")
    if len(set(labels)) != n:
        raise InputError("labels", "names must be distinct")
    return labels


def publish_version(models_dir: Path | None, name: str, version: str | None, overwrite: bool) -> str:
    """The version to publish: the next one (1, 2, ...) unless given; an existing one only with
    ``overwrite``. Checked before training."""
    for arg, value in (("name", name), ("version", version)):
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise InputError(arg, f"{value!r} is not a {arg}: letters, digits, '_', '-' and '.', not first")
    if models_dir is None:
        return version or "1"
    have = list_versions(models_dir, name)
    if version is None:
        numeric = [int(v) for v in have if v.isdigit()]
        return str(max(numeric, default=0) + 1)
    if version in have and not overwrite:
        raise InputError(
            "version", f"{Path(models_dir) / name / version} exists; omit version to publish as the next one, "
            "or pass overwrite=True"
        )  # fmt: skip
    return version
