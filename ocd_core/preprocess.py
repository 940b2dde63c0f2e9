"""Tabular preprocessing stored in a bundle's manifest: named fields -> model input vector.

Fitted on the training split only (training.data.tabular); applied identically by the service.
Numbers are standardised (missing -> the training median, when the training data had gaps);
categories are one-hot over the categories seen in training (missing -> its own category, when
seen in training).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel


class FieldSpec(BaseModel):
    name: str
    kind: Literal["number", "category"]
    mean: float = 0.0
    std: float = 1.0
    fill: float | None = None  # number: value for a missing entry (None: missing is an error)
    categories: list[str] = []  # category: one column each, in this order
    missing_category: bool = False  # category: missing is a category of its own

    @property
    def width(self) -> int:
        return 1 if self.kind == "number" else len(self.categories) + int(self.missing_category)


class TabularSpec(BaseModel):
    fields: list[FieldSpec]
    target: str
    target_transform: Literal["none", "log"] = "none"
    target_mean: float = 0.0  # regression: the model predicts (transform(y) − mean) / std
    target_std: float = 1.0

    @property
    def width(self) -> int:
        return sum(f.width for f in self.fields)


class RowError(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def encode_value(f: FieldSpec, value: Any, where: str) -> list[float]:
    """One field's value -> its columns; RowError naming ``where`` for a bad value."""
    missing = value is None or (isinstance(value, float) and math.isnan(value) and f.kind == "category")
    if f.kind == "number":
        if missing:
            if f.fill is None:
                raise RowError(where, "is required (no missing values in training)")
            value = f.fill
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RowError(where, f"expected a number, got {type(value).__name__}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise RowError(where, "must be a finite number (no NaN or infinity)")
        if abs(value) > 1e30:
            raise RowError(where, f"{value:g} is out of range (|value| <= 1e30)")
        return [(value - f.mean) / f.std]
    cols = [0.0] * f.width
    if missing:
        if not f.missing_category:
            raise RowError(where, "is required (no missing values in training)")
        cols[-1] = 1.0
        return cols
    if not isinstance(value, str):
        raise RowError(where, f"expected a string category, got {type(value).__name__}")
    if value not in f.categories:
        raise RowError(where, f"unknown category {value!r}; known: {f.categories}")
    cols[f.categories.index(value)] = 1.0
    return cols


def encode_row(spec: TabularSpec, row: Any, where: str = "input") -> torch.Tensor:
    """A dict of named fields -> (width,) float tensor; every field required, no extras."""
    if not isinstance(row, dict):
        raise RowError(where, f"expected an object of named fields, got {type(row).__name__}")
    names = [f.name for f in spec.fields]
    for key in row:
        if key not in names:
            raise RowError(f"{where}.{key}", f"unknown field; expected {names}")
    out: list[float] = []
    for f in spec.fields:
        if f.name not in row:
            raise RowError(f"{where}.{f.name}", "missing field")
        out += encode_value(f, row[f.name], f"{where}.{f.name}")
    return torch.tensor(out, dtype=torch.float32)


def decode_target(spec: TabularSpec, y: torch.Tensor) -> torch.Tensor:
    """Model output (standardised) -> the target in transformed units (e.g. log price)."""
    return y * spec.target_std + spec.target_mean
