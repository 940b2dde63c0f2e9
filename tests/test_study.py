"""training/study.py's helpers: the augmented views its targets variant trains on."""

import torch

from training.study import affine_views


def test_affine_views_are_seeded_and_keep_the_background():
    x = torch.full((3, 1, 28, 28), -0.42)  # MNIST's normalised background
    x[:, :, 10:18, 12:16] = 2.8  # a stroke
    a, b, c = affine_views(x, 2, seed=0), affine_views(x, 2, seed=0), affine_views(x, 2, seed=1)
    assert a.shape == (6, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(affine_views(torch.full((2, 1, 8, 8), -0.42), 1, seed=0), torch.full((2, 1, 8, 8), -0.42))
    assert a.min().item() >= -0.42 - 1e-6 and a.max().item() <= 2.8 + 1e-6  # bilinear: within the image's range
    moved = (a[:3] - x).abs().amax(dim=(1, 2, 3))
    assert (moved > 0.5).all()  # every view moved the stroke
    assert ((a[:3] > 1.0).sum(dim=(1, 2, 3)) - (x > 1.0).sum(dim=(1, 2, 3))).abs().max() <= 12  # about its size
