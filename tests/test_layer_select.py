import math

import torch

from ocd_core.layer_select import candidate_layers, kde_entropy, rank_layers


def test_kde_entropy_grows_with_spread():
    grid = torch.linspace(0, 100, 100)
    narrow = torch.full((1, 50), 5.0)
    wide = torch.linspace(0, 60, 50)[None]
    h = kde_entropy(torch.cat([narrow, wide]), grid=grid)
    assert h[1] > h[0]
    # a single point on a grid node: one Gaussian bump sampled at spacing 100/99 -> the exact discrete sum
    p = torch.distributions.Normal(0.0, 0.2).log_prob(grid - grid[10])
    assert math.isclose(kde_entropy(grid[10].view(1, 1), grid=grid).item(), -(p.exp() * p).sum().item(), rel_tol=1e-5)


def test_rank_layers_scores_every_candidate(lenet, mnist_batch):
    x, y = mnist_batch
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    a = rank_layers(lenet, x, y, draws=12, seed=3, chunk=5)
    b = rank_layers(lenet, x, y, draws=12, seed=3, chunk=4)
    assert sorted(s.layer for s in a) == sorted(candidate_layers(lenet)) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert a[0].score == 1.0 and all(0 < s.score <= 1 for s in a)
    assert [s.entropy for s in a] == sorted((s.entropy for s in a), reverse=True)
    assert [(s.layer, round(s.entropy, 4)) for s in a] == [(s.layer, round(s.entropy, 4)) for s in b]  # chunking-free
    after = lenet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())  # untouched
