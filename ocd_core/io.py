"""Atomic writes: a temp file in the target's directory, then ``os.replace`` (never a torn file)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")


def _replace(tmp: Path, path: Path) -> None:
    """fsync the temp file, rename it over ``path``, fsync the directory: durable and atomic."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # readable by a service running as another user (some writers make 0600)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_file(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors file written atomically (tensors are moved to the CPU and made contiguous)."""
    path = Path(path)
    tmp = _tmp(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _replace(tmp, path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """A training checkpoint (tensors, numbers, dicts only: it must load with weights_only=True)."""
    path = Path(path)
    tmp = _tmp(path)
    torch.save(obj, tmp)
    _replace(tmp, path)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_bytes(data)
    _replace(tmp, path)


def atomic_write_text(text: str, path: str | Path) -> None:
    atomic_write_bytes(text.encode(), path)
