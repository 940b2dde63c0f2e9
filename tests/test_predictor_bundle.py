import json

import pytest
import torch

from ocd_core.adapt import LowRankDelta, adapted_forward
from ocd_core.bundle import ArchSpec, BundleError, InputSpec, Manifest, list_versions, load_bundle, save_bundle
from ocd_core.conditioning import CondConfig, CondEncoder
from ocd_core.denoisers import CompactConfig, build_denoiser
from ocd_core.predictor import OCDModel, draw_noise, repeat_rows
from ocd_core.scale import ScaleConfig, ScaleNet, scale_loss
from ocd_core.schedule import ScheduleConfig
from ocd_core.targets import TargetConfig


@pytest.fixture
def model(lenet):
    torch.manual_seed(1)
    cond = CondEncoder(120, 84, 10, CondConfig(dim=16, hidden=16), weight_shape=(84, 120))
    den = build_denoiser(CompactConfig(prediction="epsilon"), (84, 120), 16)  # untrained: large deltas
    scale = ScaleNet(120, 84, 10, ScaleConfig(hidden=8))
    scale.log_offset.fill_(0.0)  # deltas large enough to move the outputs visibly
    return OCDModel(lenet, "fc1", cond, den, scale, ScheduleConfig(), "classification", 1e-3)


def manifest(name="mnist", version="1"):
    return Manifest(
        name=name,
        version=version,
        task="classification",
        modality="image",
        input=InputSpec(shape=[1, 28, 28]),
        labels=[str(i) for i in range(10)],
        base=ArchSpec(arch="lenet5", kwargs={"num_classes": 10}),
        layer="fc1",
        latent_dims=(120, 84, 10),
        mean_scale=1e-3,
        targets=TargetConfig(),
        schedule=ScheduleConfig(),
        denoiser=CompactConfig(prediction="epsilon"),
        cond=CondConfig(dim=16, hidden=16),
        scale=ScaleConfig(hidden=8),
    )


def test_prediction_shapes_and_uncertainty(model, mnist_batch):
    x, _ = mnist_batch
    p = model.predict(x, steps=5, ensemble=3, seeds=list(range(20)))
    assert (
        p.members.shape == (60, 10)
        and p.stacked().shape == (20, 3, 10)
        and p.mean.shape == (20, 10)
        and p.uncertainty.shape == (20,)
    )
    assert torch.allclose(p.members.sum(-1), torch.ones(60), atol=1e-5)
    assert torch.allclose(p.mean, p.stacked().mean(1))
    assert torch.allclose(p.uncertainty, -(p.mean * p.mean.log()).sum(-1), atol=1e-5)
    assert set(p.timings) == {"base", "ddim", "adapt"}
    assert (p.stacked()[:, 0] - p.stacked()[:, 1]).abs().max() > 1e-3  # members differ (different noise)
    assert (p.mean - p.base).abs().max() > 1e-3  # the deltas change the prediction


def test_steps_zero_is_the_base_model_alone(model, mnist_batch):
    x, _ = mnist_batch
    p = model.predict(x, steps=0, ensemble=1, seeds=list(range(20)))
    with torch.no_grad():
        want = model.base(x).softmax(-1)  # the base network itself, not the predictor's taps
    assert p.members.shape == p.mean.shape == p.base.shape == (20, 10) and p.counts == [1] * 20
    assert torch.equal(p.mean, want) and torch.equal(p.base, want) and torch.equal(p.members, want)
    assert torch.allclose(p.uncertainty, -(want * want.log()).sum(-1), atol=1e-6)
    assert set(p.timings) == {"base"}
    with pytest.raises(ValueError, match=r"steps 0 \(the base model alone\) takes ensemble 1, got \[1, 2\]"):
        model.predict(x[:2], steps=0, ensemble=[1, 2], seeds=[0, 1])


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_result_depends_on_own_seed_not_on_batch(model, mnist_batch, eta):
    x, _ = mnist_batch
    seeds = [100 + i for i in range(20)]
    batch = model.predict(x, steps=4, ensemble=2, eta=eta, seeds=seeds).stacked()
    for i in (0, 7, 19):
        alone = model.predict(x[i : i + 1], steps=4, ensemble=2, eta=eta, seeds=[seeds[i]]).stacked()
        assert (alone[0] - batch[i]).abs().max().item() < 1e-5
    again = model.predict(x.flip(0), steps=4, ensemble=2, eta=eta, seeds=seeds[::-1]).stacked().flip(0)
    assert (again - batch).abs().max().item() < 1e-5
    other = model.predict(x, steps=4, ensemble=2, eta=eta, seeds=seeds[1:] + seeds[:1]).stacked()
    assert (other - batch).abs().max().item() > 1e-3  # the seed does decide the result


def test_regression_head_reports_std(lenet, mnist_batch):
    m = OCDModel(
        lenet,
        "fc1",
        CondEncoder(120, 84, 10, CondConfig(dim=8, hidden=8), (84, 120)),
        build_denoiser(CompactConfig(), (84, 120), 8),
        ScaleNet(120, 84, 10, ScaleConfig(hidden=8)),
        ScheduleConfig(),
        "regression",
        1e-3,
    )
    p = m.predict(mnist_batch[0][:4], steps=2, ensemble=3, seeds=[0, 1, 2, 3])
    assert p.uncertainty.shape == (4, 10)
    assert torch.allclose(p.uncertainty, p.stacked().std(1, unbiased=False))


def test_scale_loss_is_the_papers():
    # 10·log10((ρ − ρ*)² / ρ*² + 1e-8): (3 − 2)² / 4 = 0.25 -> −6.0206 dB; (0.5 − 0.1)² / 0.01 = 16 -> 12.041 dB
    assert scale_loss(torch.tensor([3.0]), torch.tensor([2.0])).item() == pytest.approx(-6.0206, abs=1e-4)
    assert scale_loss(torch.tensor([0.5]), torch.tensor([0.1])).item() == pytest.approx(12.0412, abs=1e-4)
    assert scale_loss(torch.tensor([1.0]), torch.tensor([1.0])).item() == pytest.approx(-80.0)
    assert scale_loss(torch.tensor([3.0, 0.5]), torch.tensor([2.0, 0.1])).item() == pytest.approx(
        (-6.0206 + 12.0412) / 2, abs=1e-4
    )


def test_bundle_round_trip(model, mnist_batch, tmp_path):
    path = save_bundle(model, manifest(), tmp_path)
    assert path == tmp_path / "mnist" / "1"
    assert sorted(p.name for p in path.iterdir()) == [
        "base.safetensors",
        "diffusion.safetensors",
        "manifest.json",
        "scale.safetensors",
    ]
    loaded, m = load_bundle(path)
    x = mnist_batch[0]
    a = model.predict(x, steps=3, ensemble=2, seeds=list(range(20))).members
    b = loaded.predict(x, steps=3, ensemble=2, seeds=list(range(20))).members
    assert torch.equal(a, b)
    assert m == manifest().model_copy(update={"created": m.created})
    assert not any(p.name.startswith(".") for p in (tmp_path / "mnist").iterdir())  # no temp dirs left
    with pytest.raises(FileExistsError):
        save_bundle(model, manifest(), tmp_path)


def test_bundle_refuses_a_pickle(model, tmp_path):
    path = save_bundle(model, manifest(), tmp_path)
    torch.save(model.base.state_dict(), path / "base.safetensors")  # a torch.save zip in disguise
    with pytest.raises(BundleError, match=r"base\.safetensors: is a pickle / torch.save file, refusing to load it"):
        load_bundle(path)
    import pickle

    (path / "base.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(BundleError, match="is a pickle"):
        load_bundle(path)


def test_a_safetensors_header_that_starts_like_a_pickle_loads(tmp_path):
    """A safetensors header of 0x80 + 256·k bytes makes the file's first byte 0x80, a pickle's opening
    byte (a real scale net hit 0x680): the safetensors structure is what decides."""
    from safetensors.torch import load_file, save_file

    from ocd_core.bundle import _check_safetensors

    for k in range(1, 400):
        path = tmp_path / f"t{k}.safetensors"
        save_file({"w" * k: torch.arange(3.0)}, str(path))
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    _check_safetensors(path)  # no BundleError
    assert torch.equal(load_file(str(path))["w" * k], torch.arange(3.0))


def test_bundle_refuses_unknown_version_and_missing_files(model, tmp_path):
    path = save_bundle(model, manifest(), tmp_path)
    raw = json.loads((path / "manifest.json").read_text())
    raw["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"manifest.json: unknown format_version 99; this reader supports 1"):
        load_bundle(path)
    raw["format_version"] = 1
    (path / "manifest.json").write_text(json.dumps(raw))
    (path / "scale.safetensors").unlink()
    with pytest.raises(BundleError, match=r"scale\.safetensors: missing \(the manifest lists it\)"):
        load_bundle(path)
    with pytest.raises(BundleError, match="manifest.json: missing; not a bundle directory"):
        load_bundle(tmp_path)


def test_bundle_refuses_paths_outside_and_corrupt_files(model, tmp_path):
    path = save_bundle(model, manifest(), tmp_path)
    assert (path.stat().st_mode & 0o777) == 0o755  # readable by a service running as another user
    assert all((f.stat().st_mode & 0o777) == 0o644 for f in path.iterdir())
    raw = json.loads((path / "manifest.json").read_text())
    raw["files"]["base"] = "../../etc/passwd"
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"files.base must be a plain file name, got '../../etc/passwd'"):
        load_bundle(path)
    raw["files"]["base"] = "base.safetensors"
    (path / "manifest.json").write_text(json.dumps(raw))
    data = (path / "diffusion.safetensors").read_bytes()
    (path / "diffusion.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(BundleError, match=r"diffusion\.safetensors: unreadable safetensors file"):
        load_bundle(path)


def test_overwrite_swaps_versions_in_place(model, tmp_path):
    save_bundle(model, manifest(), tmp_path)
    save_bundle(model, manifest(), tmp_path, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == ["1"]
    load_bundle(tmp_path / "mnist" / "1")


def test_versions_sort_numerically(model, tmp_path):
    for v in ("2", "10", "1"):
        save_bundle(model, manifest(version=v), tmp_path)
    assert list_versions(tmp_path, "mnist") == ["1", "2", "10"]


def test_ragged_ensembles_equal_separate_predictions(model, mnist_batch):
    x, _ = mnist_batch
    batch = model.predict(x[:3], 4, [1, 3, 2], seeds=[5, 6, 7])
    preds, timings = batch.split(), batch.timings
    assert batch.members.shape == (6, 10)
    with pytest.raises(ValueError, match=r"members of a ragged batch \(K = \[1, 2, 3\]\) do not stack"):
        batch.stacked()
    assert [p.members.shape for p in preds] == [(1, 10), (3, 10), (2, 10)]
    for i, k in enumerate([1, 3, 2]):
        alone = model.predict(x[i : i + 1], steps=4, ensemble=k, seeds=[5 + i])
        assert (alone.stacked()[0] - preds[i].members).abs().max().item() < 1e-5
        assert (alone.uncertainty[0] - preds[i].uncertainty).abs().item() < 1e-5
    assert set(timings) == {"base", "ddim", "adapt"}


@pytest.fixture
def fast_model(lenet):
    """A model on the factor-space path: x̂_0-prediction with static probes."""
    torch.manual_seed(2)
    cond = CondEncoder(120, 84, 10, CondConfig(dim=16, hidden=16), weight_shape=(84, 120))
    den = build_denoiser(CompactConfig(static_probes=True, depth=1, hidden=16, probes=4), (84, 120), 16)
    scale = ScaleNet(120, 84, 10, ScaleConfig(hidden=8))
    scale.log_offset.fill_(0.0)
    return OCDModel(lenet, "fc1", cond, den, scale, ScheduleConfig(), "classification", 1e-3)


def test_lowrank_sampling_equals_dense(fast_model, mnist_batch):
    """DDIM in factor space (never forming Δ) == the dense sampler, and the predictions match."""
    m, (x, _) = fast_model, mnist_batch
    den = m.denoiser
    assert den.factor_space(0.0, 10) is den and den.factor_space(0.5, 10) is None
    assert den.factor_space(0.0, 24) is den and den.factor_space(0.0, 25) is None  # 4·25·(84+120) > 2·84·120: dense
    pred, rt = m.predictor(), m.predictor().runtime
    with torch.no_grad():
        up = rt.upstream(x)
        reps = torch.full((20,), 2)
        ctx = repeat_rows(rt.context(up.lat), reps)
        rho = rt.scale(up.lat).repeat_interleave(reps)
        x_T, _ = draw_noise(list(range(20)), 2, (84, 120), 10, 0.0, "cpu")
        low = pred.sample_deltas(ctx, rho, x_T, 10, lowrank=True)
        dense = pred.sample_deltas(ctx, rho, x_T, 10, lowrank=False)
        assert isinstance(low, LowRankDelta) and low.u.shape == (40, 84, 40) and low.v.shape == (40, 120, 40)
        assert low.dense().shape == dense.shape == (40, 84, 120)
        assert (low.dense() - dense).abs().max().item() < 1e-5 * dense.abs().max().item()
        xs = x.repeat_interleave(2, 0)
        want = adapted_forward(m.base, "fc1", xs, dense).softmax(-1)
    p = m.predict(x, steps=10, ensemble=2, seeds=list(range(20)))
    assert (p.members.reshape(40, 10) - want).abs().max().item() < 1e-5
    assert (p.mean - p.base).abs().max() > 1e-3  # the deltas do change the prediction


def test_upstream_split_gives_the_full_model_result(model, mnist_batch):
    x, _ = mnist_batch
    rt = model.predictor().runtime
    live, tail = rt.tail(x)
    assert [v.shape for v in live] == [(20, 120)] and tail is not model.base  # conv stack runs once
    split = model.predict(x, steps=3, ensemble=2, seeds=list(range(20))).members
    rt._split = None  # no split: every member runs the whole base model
    whole = model.predict(x, steps=3, ensemble=2, seeds=list(range(20))).members
    assert (split - whole).abs().max().item() < 1e-5


@pytest.mark.parametrize("steps", [1, 2, 30])
def test_factor_space_ddim_equals_dense_ddim(fast_model, mnist_batch, steps):
    """The sampler itself, also past the point where the predictor switches to dense (30 steps)."""
    m = fast_model
    with torch.no_grad():
        lat = m.latents(mnist_batch[0][:5])
        ctx = m.denoiser.prepare(m.cond(*lat.flat()))
        x_T = torch.randn(5, 84, 120, generator=torch.Generator().manual_seed(steps))
        dense = m.schedule.ddim_sample(lambda x, t: m.denoiser(x, t, ctx), x_T, steps, prediction="sample")
        a, u, v = m.schedule.ddim_sample_lowrank(
            lambda r, t: m.denoiser.factors(r, t, ctx),
            lambda u, v: m.denoiser.read_lowrank(u, v, ctx),
            m.denoiser.read(x_T, ctx),
            steps,
        )
    assert a.shape == (5,) and u.shape == (5, 84, 4 * steps) and v.shape == (5, 120, 4 * steps)
    low = a.view(5, 1, 1) * x_T + u @ v.transpose(1, 2)
    assert (low - dense).abs().max().item() < 1e-5 * dense.abs().max().item()


def test_compact_denoiser_keeps_its_original_function():
    """With the original options (per-step probes, two hidden layers) the refactored denoiser computes
    the formula it had before: each axis MLP on [probe reads, position, latents], FiLM'd by e_t."""
    import math

    import torch.nn.functional as F

    from ocd_core.layers import timestep_embedding

    torch.manual_seed(4)
    den = build_denoiser(CompactConfig(), (84, 120), 16).eval()
    cond = CondEncoder(120, 84, 10, CondConfig(dim=16, hidden=16), weight_shape=(84, 120))(
        torch.randn(3, 120), torch.randn(3, 84), torch.randn(3, 10)
    )
    x, t = torch.randn(3, 84, 120), torch.tensor([10, 500, 990])

    def axis(net, feats, ax, e):
        pos = net.pos.expand(3, -1, -1)
        h = net.inp(torch.cat([f for f in (feats, pos, ax) if f is not None], -1))
        gamma, beta = net.film(e).unsqueeze(1).chunk(2, -1)
        return net.body(h * (1 + gamma) + beta)

    with torch.no_grad():
        e = F.silu(den.time(timestep_embedding(t, den.emb_dim)) + den.cond(cond.emb))
        p_col = axis(den.col_probe, None, cond.cols, e) / math.sqrt(120)
        p_row = axis(den.row_probe, None, cond.rows, e) / math.sqrt(84)
        u = axis(den.rows, x @ p_col, cond.rows, e)
        v = axis(den.cols, x.transpose(1, 2) @ p_row, cond.cols, e)
        want = den.skip(e).unsqueeze(-1) * x + u @ v.transpose(1, 2) / math.sqrt(4)
        got = den(x, t, cond)
    assert (got - want).abs().max().item() < 1e-5
    assert sorted(den.state_dict())[:4] == [
        "col_probe.body.1.bias",
        "col_probe.body.1.weight",
        "col_probe.body.3.bias",
        "col_probe.body.3.weight",
    ]


def test_every_torch_predictor_of_a_model_shares_its_lock(model):
    """The taps and adapt hooks hook the shared base model: predictors made before and after .to(),
    and one over an explicit TorchRuntime, all hold the model's one lock."""
    from ocd_core.runtime import TorchRuntime

    first = model.predictor()
    assert first._lock is model.lock and model.predictor() is first
    model.to("cpu")
    assert model.predictor() is not first and model.predictor()._lock is model.lock
    assert model.predictor(TorchRuntime(model))._lock is model.lock
