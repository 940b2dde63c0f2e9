"""Tabular rows: named fields, encoded with the preprocessing fitted at training."""

from __future__ import annotations

from typing import Any

import torch

from ocd_core.bundle import Manifest

from ..errors import InputError
from .base import Modality, flatten


class TabularModality(Modality):
    """A row of named fields: {"carat": 0.3, "cut": "Ideal", ...}, encoded with the preprocessing
    fitted at training (stored in the manifest). v2: one named input per field, N rows each."""

    name = "tabular"
    scalar_values = True

    def __init__(self, manifest: Manifest):
        super().__init__(manifest)
        from ocd_core.preprocess import TabularSpec

        self.spec = TabularSpec.model_validate(manifest.input.options["tabular"])
        self.target_std = self.spec.target_std

    def decode_json(self, value: Any, field: str = "input") -> torch.Tensor:
        from ocd_core.preprocess import RowError, encode_row

        try:
            return encode_row(self.spec, value, field)
        except RowError as e:
            raise InputError(e.field, e.reason) from None

    def v2_inputs(self) -> list[dict[str, Any]]:
        return [
            {"name": f.name, "datatype": "FP32" if f.kind == "number" else "BYTES", "shape": [-1]}
            for f in self.spec.fields
        ]

    def decode_v2(self, inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
        names = [f.name for f in self.spec.fields]
        by_name = {t["name"]: t for t in inputs}
        for name in by_name:
            if name not in names:
                raise InputError(f"inputs[{name}]", f"unknown input; expected {names}")
        columns, n = {}, None
        for name in names:
            if name not in by_name:
                raise InputError(f"inputs[{name}]", "missing input")
            data = flatten(by_name[name]["data"])
            if n is not None and len(data) != n:
                raise InputError(f"inputs[{name}].data", f"holds {len(data)} rows, other inputs hold {n}")
            n, columns[name] = len(data), data
        return [self.decode_json({k: columns[k][i] for k in names}, f"inputs[row {i}]") for i in range(n or 0)]

    # (Training encodes val/test categories unseen in train as missing; a request with one gets 422.)

    def decode_target(self, mean: torch.Tensor) -> torch.Tensor:
        from ocd_core.preprocess import decode_target

        return decode_target(self.spec, mean)
