"""Camera poses in, rendered images out (tinyNeRF); the image encoding is ``outputs.Picture``."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import Modality


class PoseModality(Modality):
    """A camera pose in, a rendered image out (tinyNeRF): {"azimuth": deg, "elevation": deg,
    "radius": r} or [azimuth, elevation, radius]. /predict answers a base64 PNG, /render the PNG
    itself, v2 the image tensor (N, 3, H, W) in [0, 1]; the uncertainty is the ensemble's mean
    per-pixel std."""

    name = "pose"
    renders = True
    KEYS = ("azimuth", "elevation", "radius")
    RADIUS = (1.0, 50.0)

    def decode_json(self, value: Any, field: str = "input") -> torch.Tensor:
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(self.KEYS))
            if unknown:
                raise InputError(f"{field}.{unknown[0]}", f"unknown field; a pose has {', '.join(self.KEYS)}")
            missing = [k for k in self.KEYS if k not in value]
            if missing:
                raise InputError(f"{field}.{missing[0]}", "missing")
            for k in self.KEYS:
                if isinstance(value[k], bool) or not isinstance(value[k], (int, float)):
                    raise InputError(f"{field}.{k}", f"expected a number, got {type(value[k]).__name__}")
            value = [value[k] for k in self.KEYS]
        x = self.check_array(value, field)
        return self._check_pose(x, field)

    def _check_pose(self, x: torch.Tensor, field: str) -> torch.Tensor:
        if not -90 <= float(x[1]) <= 90:
            raise InputError(f"{field}.elevation", f"must be between -90 and 90 degrees, got {float(x[1]):g}")
        lo, hi = self.RADIUS
        if not lo <= float(x[2]) <= hi:
            raise InputError(f"{field}.radius", f"must be between {lo:g} and {hi:g}, got {float(x[2]):g}")
        return x

    def decode_v2(self, inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
        return [self._check_pose(x, f"inputs[input][{i}]") for i, x in enumerate(super().decode_v2(inputs))]
