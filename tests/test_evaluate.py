"""The evaluation's baselines and measures: k-NN and noise deltas, the TENT peer, error-detection AUROC."""

import pytest
import torch

from ocd_core.conditioning import CondConfig, CondEncoder
from ocd_core.denoisers import CompactConfig, build_denoiser
from ocd_core.fit import build_target_set
from ocd_core.predictor import OCDModel
from ocd_core.scale import ScaleConfig, ScaleNet
from ocd_core.schedule import ScheduleConfig
from ocd_core.targets import TargetConfig, overfit_deltas_reference
from training.evaluate import entropy, error_auroc, nearest_neighbour_deltas, noise_deltas, tent_deltas


@pytest.fixture
def model(lenet):
    torch.manual_seed(1)
    cond = CondEncoder(120, 84, 10, CondConfig(dim=16, hidden=16), weight_shape=(84, 120))
    den = build_denoiser(CompactConfig(), (84, 120), 16)
    return OCDModel(lenet, "fc1", cond, den, ScaleNet(120, 84, 10, ScaleConfig(hidden=8)), ScheduleConfig(),
                    "classification", 1e-3)  # fmt: skip


def test_error_auroc_counts_pairs_and_ties():
    unc = torch.tensor([0.9, 0.1, 0.5, 0.5])
    errors = torch.tensor([True, False, True, False])
    # errors {0.9, 0.5} vs correct {0.1, 0.5}: 0.9 > both, 0.5 > 0.1, 0.5 = 0.5 (half) -> 3.5 / 4
    assert error_auroc(unc, errors) == 0.875
    assert error_auroc(unc, ~errors) == 0.125
    assert error_auroc(unc, torch.zeros(4, dtype=torch.bool)) is None  # no errors: undefined
    assert entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).tolist() == pytest.approx([0.6931472, 0.0])


def test_knn_deltas_are_the_neighbours_mean(model, mnist_batch):
    x, y = mnist_batch
    train = build_target_set(model.base, "fc1", x, y, TargetConfig())
    assert torch.equal(nearest_neighbour_deltas(model, train, x), train.deltas)  # each sample is its own nearest
    feats = torch.cat([train.inp, train.act, train.out], 1)
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    five = torch.cdist(z, z).argsort(1)[:, :5]  # brute force: the 5 nearest, the sample itself first
    want = torch.stack([train.deltas[i].mean(0) for i in five])
    assert torch.allclose(nearest_neighbour_deltas(model, train, x, k=5), want, atol=1e-7)


def test_noise_delta_has_the_scale_nets_magnitude_and_the_seeds_direction(model, mnist_batch):
    x = mnist_batch[0][:6]
    d = noise_deltas(model, x, [10, 11, 12, 13, 14, 15])
    assert d.shape == (6, 84, 120)
    rho = model.scale_net(*model.latents(x).flat())
    assert torch.allclose(d.flatten(1).std(1), rho, rtol=0.05)  # 10,080 entries of unit noise times rho
    again = noise_deltas(model, x[2:3], [12])
    assert torch.allclose(again[0], d[2])  # a sample's delta depends on its seed only
    assert not torch.allclose(noise_deltas(model, x[2:3], [99])[0], d[2])


def test_tent_minimises_the_entropy_of_each_request_alone(model, mnist_batch):
    x = mnist_batch[0][:8]
    cfg = TargetConfig(lr=5e-3)
    deltas = tent_deltas(model, x, cfg, 3)
    ref = overfit_deltas_reference(model.base, "fc1", x, torch.zeros(8, dtype=torch.long),
                                   cfg.model_copy(update={"loss": "entropy", "steps": 3}))  # fmt: skip
    assert ((deltas - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item() < 2e-4
    from ocd_core.adapt import adapted_forward

    with torch.no_grad():
        before = entropy(model.base(x).softmax(-1))
        after = entropy(adapted_forward(model.base, "fc1", x, deltas).softmax(-1))
    assert (after < before).all()  # no label used; every request's own prediction sharpens
    alone = tent_deltas(model, x[3:4], cfg, 3)
    assert torch.allclose(alone[0], deltas[3], atol=1e-7)  # per request: the batch does not matter
