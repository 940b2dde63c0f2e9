import pytest
import torch

from ocd_core.targets import TargetConfig, overfit_deltas, overfit_deltas_reference


@pytest.mark.parametrize(
    "cfg",
    [
        TargetConfig(),  # original MNIST recipe: Adam, lr 5e-4, 3 steps
        TargetConfig(optimizer="adam", lr=5e-3, steps=10),
        TargetConfig(optimizer="sgd", lr=0.05, steps=4, momentum=0.9),
        TargetConfig(optimizer="sgd", lr=0.1, steps=2),
    ],
)
@pytest.mark.parametrize("layer", ["fc1", "conv2"])
def test_vectorised_targets_match_reference(lenet, mnist_batch, cfg, layer):
    x, y = mnist_batch
    fast = overfit_deltas(lenet, layer, x, y, cfg, chunk=7)  # chunking must not matter
    ref = overfit_deltas_reference(lenet, layer, x, y, cfg)
    assert fast.shape == (20, *lenet.get_submodule(layer).weight.shape)
    assert fast.abs().max().item() > 0
    # float error relative to each delta's size: the two paths sum gradients in different orders, and Adam
    # divides by sqrt(v), so an entry whose gradient is ~0 can move by a visible fraction of lr (measured:
    # conv2 under AVX2, one entry 1.1e-3 of the delta's max, the whole delta 2.5e-5 of its norm). SGD is
    # linear in the gradient: there every entry agrees to ~1e-6 of the delta's max.
    assert relative_error(fast, ref).max().item() < 2e-4
    if cfg.optimizer == "sgd":
        err = (fast - ref).flatten(1).abs().max(1).values / ref.flatten(1).abs().max(1).values
        assert err.max().item() < 2e-5


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample ||a - b|| / ||b|| over (N, ...) tensors -> (N,)."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def test_targets_mse_loss_on_regression_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x, y = torch.randn(12, 5), torch.randn(12, 1)
    cfg = TargetConfig(loss="mse", lr=1e-2, steps=5)
    fast = overfit_deltas(net, "0", x, y, cfg)
    assert fast.shape == (12, 16, 5)
    assert relative_error(fast, overfit_deltas_reference(net, "0", x, y, cfg)).max().item() < 2e-4


def test_targets_leave_model_untouched(lenet, mnist_batch):
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    overfit_deltas(lenet, "fc1", *mnist_batch)
    assert all(torch.equal(before[k], v) for k, v in lenet.state_dict().items())


def test_delta_of_linear_layer_is_nearly_rank_one(lenet, mnist_batch):
    s = torch.linalg.svdvals(overfit_deltas(lenet, "fc1", *mnist_batch))
    energy = s[:, 0] ** 2 / (s**2).sum(1)
    assert energy.min().item() > 0.99


def test_unknown_layer_names_the_candidates(lenet, mnist_batch):
    with pytest.raises(
        ValueError, match=r"model has no layer 'fc9'; Linear/Conv2d layers: \['conv1', 'conv2', 'conv3', 'fc1', 'fc2'\]"
    ):
        overfit_deltas(lenet, "fc9", *mnist_batch)


def test_targets_work_under_no_grad(lenet, mnist_batch):
    """Evaluation calls overfit_deltas inside torch.no_grad (the oracle row): same deltas."""
    x, y = mnist_batch
    with torch.no_grad():
        inside = overfit_deltas(lenet, "fc1", x, y)
    assert torch.equal(inside, overfit_deltas(lenet, "fc1", x, y))
