"""Output encodings, apart from input decoding: what a prediction becomes in a /predict answer
(``encode``), a v2 answer (``encode_v2``, declared by ``v2_outputs``) and, for images, a PNG.
The manifest's task picks one, here and only here (``output_for``)."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

import torch

from ocd_core.bundle import Manifest
from ocd_core.predictor import SamplePrediction

if TYPE_CHECKING:
    from .base import Modality


def tensor(name: str, values: torch.Tensor) -> dict[str, Any]:
    """A v2 FP32 output tensor."""
    return {"name": name, "datatype": "FP32", "shape": list(values.shape), "data": values.flatten().tolist()}


class Output:
    def encode(self, p: SamplePrediction, return_uncertainty: bool = True) -> dict[str, Any]:
        raise NotImplementedError

    def encode_v2(self, preds: list[SamplePrediction]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def v2_outputs(self) -> list[dict[str, Any]]:
        raise NotImplementedError


class Probabilities(Output):
    """Classification: the ensemble mean per label, its most probable label, and the predictive
    entropy of the mean (nats)."""

    def __init__(self, labels: list[str] | None):
        self.labels = labels

    def _labels(self, n: int) -> list[str]:
        return self.labels or [str(i) for i in range(n)]

    def encode(self, p: SamplePrediction, return_uncertainty: bool = True) -> dict[str, Any]:
        probs = p.mean.tolist()  # (in Python: a torch argmax costs more than the list's max here)
        labels = self._labels(len(probs))
        return {
            "label": labels[probs.index(max(probs))],
            "probabilities": dict(zip(labels, probs)),
            "uncertainty": p.uncertainty.item() if return_uncertainty else None,
        }

    def encode_v2(self, preds: list[SamplePrediction]) -> list[dict[str, Any]]:
        probs = torch.stack([p.mean for p in preds])
        labels = self._labels(probs.shape[-1])
        return [
            tensor("probabilities", probs),
            {
                "name": "label",
                "datatype": "BYTES",
                "shape": [len(preds)],
                "data": [labels[int(i)] for i in probs.argmax(1)],
            },
            tensor("uncertainty", torch.stack([p.uncertainty for p in preds])),
        ]

    def v2_outputs(self) -> list[dict[str, Any]]:
        return [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.labels or [])]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "uncertainty", "datatype": "FP32", "shape": [-1]},
        ]


class Values(Output):
    """Regression: the ensemble mean and std, in the answer's units (``modality.decode_target``,
    ``modality.target_std``); ``scalar``: a one-value answer as a number, not a list."""

    def __init__(self, modality: Modality, out_shape: list[int], scalar: bool):
        self.modality, self.out_shape, self.scalar = modality, out_shape, scalar

    def _value_std(self, p: SamplePrediction) -> tuple[torch.Tensor, torch.Tensor]:
        return self.modality.decode_target(p.mean), p.uncertainty * self.modality.target_std

    def encode(self, p: SamplePrediction, return_uncertainty: bool = True) -> dict[str, Any]:
        value, std = self._value_std(p)
        one = self.scalar and value.numel() == 1
        return {
            "value": value.item() if one else value.tolist(),
            "uncertainty": (std.item() if one else std.tolist()) if return_uncertainty else None,
        }

    def encode_v2(self, preds: list[SamplePrediction]) -> list[dict[str, Any]]:
        value, std = (torch.stack(t) for t in zip(*(self._value_std(p) for p in preds)))
        return [tensor("value", value), tensor("uncertainty", std)]

    def v2_outputs(self) -> list[dict[str, Any]]:
        return [{"name": n, "datatype": "FP32", "shape": [-1, *self.out_shape]} for n in ("value", "uncertainty")]


class Picture(Output):
    """A rendered image: the ensemble mean (3, H, W) in [0, 1] as a PNG (base64 in /predict, the
    bytes on /render, an FP32 tensor on v2); the uncertainty is the mean per-pixel ensemble std."""

    def __init__(self, image_shape: list[int]):
        self.image_shape = image_shape

    def png(self, p: SamplePrediction) -> bytes:
        from PIL import Image

        img = (p.mean.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="PNG")
        return buf.getvalue()

    def encode(self, p: SamplePrediction, return_uncertainty: bool = True) -> dict[str, Any]:
        return {
            "image": base64.b64encode(self.png(p)).decode(),
            "uncertainty": float(p.uncertainty.mean()) if return_uncertainty else None,
        }

    def encode_v2(self, preds: list[SamplePrediction]) -> list[dict[str, Any]]:
        return [
            tensor("image", torch.stack([p.mean for p in preds])),
            tensor("uncertainty", torch.stack([p.uncertainty.mean() for p in preds])),
        ]

    def v2_outputs(self) -> list[dict[str, Any]]:
        return [
            {"name": "image", "datatype": "FP32", "shape": [-1, *self.image_shape]},
            {"name": "uncertainty", "datatype": "FP32", "shape": [-1]},
        ]


def output_for(manifest: Manifest, modality: Modality) -> Output:
    """The output encoding of a model: an image for a rendering modality, else by the task."""
    options = manifest.input.options
    if modality.renders:
        return Picture(options.get("image", [3, -1, -1]))
    if manifest.task == "classification":
        return Probabilities(manifest.labels)
    return Values(modality, options.get("out_shape", [1]), scalar=modality.scalar_values)
