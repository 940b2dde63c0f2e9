"""The modality interface: decode a request's input to a sample tensor in model space, and hand
the prediction to the model's ``Output`` (outputs.py) for encoding. The base class is the "tensor"
modality: nested JSON arrays and v2 numeric tensors of the manifest's input shape."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ocd_core.bundle import Manifest
from ocd_core.predictor import SamplePrediction

from ..errors import InputError
from .outputs import Output, output_for

V2_NUMERIC = {"FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


def flatten(data: Any) -> list:
    """A nested list -> its leaves in order (iterative: any depth, no RecursionError)."""
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def to_float32(x: torch.Tensor, field: str) -> torch.Tensor:
    """float64 values -> float32, or an InputError for a finite value float32 cannot hold."""
    finite = x[torch.isfinite(x)]
    if finite.numel() and (big := finite.abs().max().item()) > FLOAT32_MAX:
        raise InputError(field, f"{big:g} overflows float32 (|value| <= {FLOAT32_MAX:.4g})")
    return x.float()


class Modality:
    """Decoding: JSON values, uploads and v2 tensors -> samples (*input shape) in model space.
    Encoding is the ``output``'s (classification, regression or an image), chosen from the manifest.
    ``renders``: a pose-in, image-out model, which /render serves."""

    name: ClassVar[str] = "tensor"
    renders: ClassVar[bool] = False
    # JSON bodies up to this size decode on the event loop: for a small input the hop to a worker
    # thread costs more than the decoding (MNIST PNG: 60 µs to decode; batched throughput 886 -> 1,186 req/s)
    inline_bytes: ClassVar[int] = 32 * 1024

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.shape = tuple(manifest.input.shape)
        norm = manifest.input.normalization
        self._mean = torch.tensor(norm.mean) if norm else None
        self._std = torch.tensor(norm.std) if norm else None
        self.output: Output = output_for(manifest, self)

    # -- decoding ---------------------------------------------------------------------
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw sample (*shape) -> model space, with the normalisation fitted at training."""
        if self._mean is None:
            return x
        view = (-1,) + (1,) * (x.ndim - 1) if len(self._mean) > 1 else ()
        return (x - self._mean.view(view)) / self._std.view(view) if view else (x - self._mean) / self._std

    def decode_json_inline(self, value: Any, nbytes: int) -> torch.Tensor | None:
        """``decode_json(value)`` right away when that is cheap (``value`` came in a JSON body of
        ``nbytes``, at most ``inline_bytes``), else None: decode it on a worker thread."""
        return self.decode_json(value) if nbytes <= self.inline_bytes else None

    def decode_json(self, value: Any, field: str = "input") -> torch.Tensor:
        """A JSON value -> one sample (*shape) in model space."""
        return self.normalise(self.check_array(value, field))

    def decode_upload(
        self, data: bytes, filename: str | None, content_type: str | None, field: str = "file"
    ) -> torch.Tensor:
        raise InputError(field, f"file uploads are not supported for {self.name} models")

    def check_array(self, value: Any, field: str) -> torch.Tensor:
        """A nested list of numbers of the input shape (or its shape without a leading 1) -> tensor."""
        if not isinstance(value, list):
            raise InputError(field, f"expected a nested array of shape {list(self.shape)}, got {type(value).__name__}")
        try:
            x = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, OverflowError, RuntimeError, RecursionError):
            raise InputError(
                field, f"expected a rectangular nested array of numbers of shape {list(self.shape)}"
            ) from None
        if tuple(x.shape) != self.shape and not (self.shape[0] == 1 and tuple(x.shape) == self.shape[1:]):
            raise InputError(field, f"expected shape {list(self.shape)}, got {list(x.shape)}")
        return self.check_values(to_float32(x, field).reshape(self.shape), field)

    def check_values(self, x: torch.Tensor, field: str) -> torch.Tensor:
        if not torch.isfinite(x).all():
            raise InputError(field, "values must be finite numbers (no NaN or infinity)")
        return x

    def v2_inputs(self) -> list[dict[str, Any]]:
        return [{"name": "input", "datatype": "FP32", "shape": [-1, *self.shape]}]

    def decode_v2(self, inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Open Inference Protocol request tensors -> a list of samples in model space."""
        by_name = {t["name"]: t for t in inputs}
        if "input" not in by_name:
            raise InputError("inputs", f"expected an input named 'input', got {sorted(by_name)}")
        t = by_name["input"]
        field = "inputs[input]"
        if t["datatype"] not in V2_NUMERIC:
            raise InputError(f"{field}.datatype", f"expected FP32 (or another numeric type), got {t['datatype']}")
        shape = list(t["shape"])
        want = f"[N, {', '.join(map(str, self.shape))}]"
        if len(shape) != len(self.shape) + 1 or tuple(shape[1:]) != self.shape or shape[0] < 0:
            raise InputError(f"{field}.shape", f"expected {want}, got {shape}")
        if shape[0] == 0:
            raise InputError(f"{field}.shape", f"holds no samples (N is 0 in {shape})")
        flat = flatten(t["data"])
        if len(flat) != math.prod(shape):
            raise InputError(f"{field}.data", f"holds {len(flat)} values, shape {shape} needs {math.prod(shape)}")
        try:
            x64 = torch.tensor(flat, dtype=torch.float64).view(shape)
        except (TypeError, ValueError, OverflowError, RuntimeError):
            raise InputError(f"{field}.data", "expected numbers") from None
        x = to_float32(x64, f"{field}.data")
        x = self.check_values(x, f"{field}.data")
        return [self.normalise(s) for s in x]

    # -- what the output encoding needs from the input side ---------------------------
    def decode_target(self, mean: torch.Tensor) -> torch.Tensor:
        """Regression: the model's output (*out) -> the answer's units (identity here)."""
        return mean

    target_std: float = 1.0  # regression: the model's output unit in the answer's units
    scalar_values: ClassVar[bool] = False  # regression: a one-value answer as a number, not a list

    # -- encoding: the output's ---------------------------------------------------------
    def encode(self, p: SamplePrediction, return_uncertainty: bool = True) -> dict[str, Any]:
        """One request's prediction -> /predict response fields."""
        return self.output.encode(p, return_uncertainty)

    def encode_v2(self, preds: list[SamplePrediction]) -> list[dict[str, Any]]:
        """A v2 request's predictions -> its output tensors."""
        return self.output.encode_v2(preds)

    def v2_outputs(self) -> list[dict[str, Any]]:
        return self.output.v2_outputs()
