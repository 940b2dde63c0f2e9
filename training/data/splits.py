"""Deterministic train / val / test splits, recorded by seed, sizes and a digest of the indices."""

from __future__ import annotations

import hashlib

import torch
from pydantic import BaseModel


class Split(BaseModel):
    seed: int
    train: list[int]
    val: list[int]
    test: list[int]

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.train, self.val, self.test):
            h.update(torch.tensor(part, dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()[:16]


def make_split(n: int, n_val: int, n_test: int, seed: int = 0, n_train: int | None = None) -> Split:
    """Shuffle range(n) with ``seed``; test first, then val, the rest (or ``n_train``) for training."""
    if n_val + n_test >= n:
        raise ValueError(f"cannot take {n_val} val + {n_test} test from {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    test, val, rest = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return Split(seed=seed, train=sorted(rest[:n_train] if n_train else rest), val=sorted(val), test=sorted(test))
