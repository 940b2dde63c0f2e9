"""Modalities: one file each, one interface (``Modality``). A modality decodes a request's input to
a sample tensor of the manifest's input shape, normalised as in training; its ``output``
(outputs.py: probabilities, values or a picture, picked by the task) encodes the prediction. Below
this package the batcher and engines see only tensors."""

from __future__ import annotations

from ocd_core.bundle import Manifest

from .audio import AudioModality
from .base import Modality, flatten
from .image import ImageModality, png_image, png_pixels
from .pose import PoseModality
from .tabular import TabularModality

MODALITIES: dict[str, type[Modality]] = {
    "tensor": Modality,
    "image": ImageModality,
    "tabular": TabularModality,
    "audio": AudioModality,
    "pose": PoseModality,
}

__all__ = ["MODALITIES", "Modality", "flatten", "modality_for", "png_image", "png_pixels"]


def modality_for(manifest: Manifest) -> Modality:
    try:
        return MODALITIES[manifest.modality](manifest)
    except KeyError:
        raise ValueError(
            f"model {manifest.name}: unknown modality {manifest.modality!r}; known: {sorted(MODALITIES)}"
        ) from None
