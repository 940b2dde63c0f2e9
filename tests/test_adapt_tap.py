import copy

import pytest
import torch
import torch.nn.functional as F

from ocd_core.adapt import LowRankDelta, adapted_forward
from ocd_core.tap import tap


def per_sample_copies(model, layer, x, deltas):
    outs = []
    for xi, d in zip(x, deltas):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.get_submodule(layer).weight += d
        outs.append(m(xi.unsqueeze(0)).squeeze(0))
    return torch.stack(outs)


@pytest.mark.parametrize(
    "layer,fast", [("fc1", True), ("fc1", False), ("fc2", True), ("conv2", False), ("conv1", True)]
)
def test_adapted_forward_equals_modified_copies(lenet, mnist_batch, layer, fast):
    x, _ = mnist_batch
    w = lenet.get_submodule(layer).weight
    deltas = torch.randn(x.shape[0], *w.shape, generator=torch.Generator().manual_seed(0)) * 0.05
    out = adapted_forward(lenet, layer, x, deltas, fast=fast)
    ref = per_sample_copies(lenet, layer, x, deltas)
    assert out.shape == (20, 10)
    assert (out - ref).abs().max().item() < 1e-5
    assert (out - lenet(x)).abs().max().item() > 1e-3  # the deltas do change the outputs


def test_zero_deltas_give_the_base_model(lenet, mnist_batch):
    x, _ = mnist_batch
    assert torch.allclose(adapted_forward(lenet, "fc1", x, torch.zeros(20, 84, 120)), lenet(x), atol=1e-6)


def test_adapt_refuses_mismatched_deltas(lenet, mnist_batch):
    x, _ = mnist_batch
    with pytest.raises(ValueError, match=r"delta shape \(84, 121\) != fc1.weight \(84, 120\)"):
        adapted_forward(lenet, "fc1", x, torch.zeros(20, 84, 121))
    with pytest.raises(ValueError, match="19 deltas for 20 inputs"):
        adapted_forward(lenet, "fc1", x, torch.zeros(19, 84, 120))


def test_tap_linear_captures_input_output_and_network_output(lenet, mnist_batch):
    x, _ = mnist_batch
    lat = tap(lenet, "fc1", x)
    h = F.relu(lenet.conv3(lenet.pool(F.relu(lenet.conv2(lenet.pool(F.relu(lenet.conv1(x)))))))).flatten(1)
    assert lat.inp.shape == (20, 120) and lat.act.shape == (20, 84) and lat.out.shape == (20, 10)
    assert torch.allclose(lat.inp, h)
    assert torch.allclose(lat.act, lenet.fc1(h))
    assert torch.allclose(lat.out, lenet(x))
    assert not lenet.fc1._forward_hooks  # the hook is removed


def test_tap_conv2d(lenet, mnist_batch):
    x, _ = mnist_batch
    lat = tap(lenet, "conv2", x)
    assert lat.inp.shape == (20, 6, 14, 14) and lat.act.shape == (20, 16, 10, 10)
    assert torch.allclose(lat.act, lenet.conv2(lat.inp))
    assert [t.shape for t in lat.flat()] == [(20, 1176), (20, 1600), (20, 10)]


def test_tap_unknown_layer(lenet, mnist_batch):
    with pytest.raises(ValueError, match="model has no layer 'fc3'"):
        tap(lenet, "fc3", mnist_batch[0])


def test_output_grad_is_the_label_free_error_signal(lenet, mnist_batch):
    x, _ = mnist_batch
    lat = tap(lenet, "fc1", x, grad_task="classification")
    act = lenet.fc1(lat.inp).detach().requires_grad_(True)
    out = lenet.fc2(F.relu(act))
    (ref,) = torch.autograd.grad(F.cross_entropy(out, out.argmax(1), reduction="sum"), act)
    assert lat.grad.shape == (20, 84)
    assert torch.allclose(lat.grad, ref, atol=1e-6)
    assert torch.allclose(lat.out, lenet(x)) and not lat.out.requires_grad
    alone = tap(lenet, "fc1", x[3:4], grad_task="classification").grad
    assert torch.allclose(alone[0], lat.grad[3], atol=1e-6)  # per sample, not batch-averaged
    reg = tap(lenet, "fc1", x[:2], grad_task="regression").grad
    assert torch.allclose(reg[0], lenet.fc2.weight.sum(0) * (lat.act[0] > 0), atol=1e-6)


def test_ema_warm_up_and_average():
    from ocd_core.ema import EMA

    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, mu=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # n=1: mu_1 = min(0.9, 2/11) -> s = 2/11·0 + 9/11·1
    assert ema.shadow.weight.item() == pytest.approx(9 / 11)
    for _ in range(200):
        ema.update(net)
    assert ema.shadow.weight.item() == pytest.approx(1.0, abs=1e-6)
    plain = EMA(torch.nn.Linear(1, 1, bias=False), mu=0.9, warmup=False)
    start = plain.shadow.weight.item()
    with torch.no_grad():
        net.weight.fill_(start + 1.0)
    plain.update(net)
    assert plain.shadow.weight.item() == pytest.approx(start + 0.1)


@pytest.mark.parametrize("layer,fast", [("fc1", True), ("conv2", False)])
def test_lowrank_delta_applies_like_its_dense_form(lenet, mnist_batch, layer, fast):
    """Δ = ρ·(a·X + U Vᵀ) applied without forming it (Linear) or formed (conv) == the dense delta."""
    x, _ = mnist_batch
    g = torch.Generator().manual_seed(3)
    shape = lenet.get_submodule(layer).weight.shape
    n_in = shape[1:].numel()
    d = LowRankDelta(
        rho=torch.rand(20, generator=g) * 0.05,
        a=torch.randn(20, generator=g),
        x=torch.randn(20, *shape, generator=g),
        u=torch.randn(20, shape[0], 6, generator=g),
        v=torch.randn(20, n_in, 6, generator=g),
    )
    dense = (d.rho * d.a).view(20, 1, 1) * d.x.reshape(20, shape[0], n_in) + d.rho.view(20, 1, 1) * d.u @ d.v.transpose(
        1, 2
    )
    assert d.shape == (20, *shape) and torch.allclose(d.dense(), dense.view(20, *shape), atol=1e-6)
    out = adapted_forward(lenet, layer, x, d, fast=fast)
    assert (out - per_sample_copies(lenet, layer, x, dense.view(20, *shape))).abs().max().item() < 1e-4


def test_lowrank_delta_on_a_linear_layer_with_a_sequence_dimension():
    """inp (N, T, in): every position gets the sample's delta."""
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(6, 4)
    d = LowRankDelta(
        rho=torch.rand(3, generator=g),
        a=torch.randn(3, generator=g),
        x=torch.randn(3, 4, 6, generator=g),
        u=torch.randn(3, 4, 2, generator=g),
        v=torch.randn(3, 6, 2, generator=g),
    )
    x = torch.randn(3, 5, 6, generator=g)
    model = torch.nn.Sequential(lin)
    out = adapted_forward(model, "0", x, d)
    want = torch.stack([x[n] @ (lin.weight + d.dense()[n]).T + lin.bias for n in range(3)])
    assert out.shape == (3, 5, 4) and (out - want).abs().max().item() < 1e-5


def test_split_with_a_non_batch_value_alive_at_the_layer_is_refused(lenet, mnist_batch):
    """A model that carries ``x.shape[0]`` past the layer cannot have its upstream values repeated per
    member: the split is refused (the predictor then runs the whole model) and predictions still work."""
    from ocd_core.split import check_split, split_model

    class Reshaping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(784, 32), torch.nn.Linear(32, 10)

        def forward(self, x):
            n = x.shape[0]
            return self.b(torch.relu(self.a(x.reshape(n, -1)))).reshape(n, -1)

    x, _ = mnist_batch
    model = Reshaping().eval()
    split = split_model(model, "b")
    assert split is not None and not check_split(model, split, x[:2])
    good = split_model(lenet, "fc1")
    assert check_split(lenet, good, x[:2])


def test_fast_max_pool_equals_max_pool2d_in_eval_and_keeps_it_for_training():
    """MaxPool2x2 in eval mode on the CPU (the max of four strided views) gives max_pool2d's values
    exactly, for even and odd sizes, 3-D and 4-D inputs, NaN and ties; training uses max_pool2d."""
    from ocd_core.layers import MaxPool2x2

    pool = MaxPool2x2().eval()
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 8, 8), (2, 3, 9, 7), (3, 5, 5), (1, 1, 2, 2)]:
        x = torch.randn(*shape, generator=g).relu()  # ReLU: many tied zeros, as in LeNet5
        x.view(-1)[3] = float("nan")
        want, got = F.max_pool2d(x, 2), pool(x)
        assert got.shape == want.shape and torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0)), shape
    pool.train()
    x = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    pool(x).sum().backward()
    assert torch.equal(x.grad.sum(), torch.tensor(2 * 3 * 4 * 4.0))  # max_pool2d's gradient: one input per window
