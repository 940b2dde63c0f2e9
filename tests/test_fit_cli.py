"""``ocd fit`` on data as users keep it: an image folder, a CSV, a WAV folder per class and an .npz, with
weights from safetensors or a torch.save state dict; a wrong argument ends with one line and exit 2."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from serving import ROOT

import ocd_cli
from ocd_core.audio import write_wav
from ocd_core.bundle import load_bundle, read_manifest

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
from user_models import ResearchLeNet  # noqa: E402

FAST = ["--steps", "40", "--hidden", "16", "--ddim-steps", "5", "--ensemble", "3", "--quiet"]


def fit(tmp_path: Path, *args: str) -> int:
    return ocd_cli.main(
        ["fit", *args, "--models", str(tmp_path / "models"), "--reports", str(tmp_path / "reports"), *FAST]
    )


def test_image_folder_with_pth_weights_then_safetensors(tmp_path, capsys):
    torch.manual_seed(0)
    weights = ResearchLeNet(num_classes=4).state_dict()
    torch.save({"epoch": 3, "state_dict": weights}, tmp_path / "lenet.pth")  # a training checkpoint
    common = ["--arch", "user_models:ResearchLeNet", "--kwargs", '{"num_classes": 4}', "--output", "0",
              "--layer", "fc1", "--data", str(EXAMPLES / "digits"), "--name", "digits"]  # fmt: skip
    assert fit(tmp_path, *common, "--weights", str(tmp_path / "lenet.pth")) == 0
    out = capsys.readouterr().out
    assert f"bundle: {tmp_path / 'models' / 'digits' / '1'}" in out
    assert "serve it: ocd serve --models" in out and out.rstrip().endswith("--allow-module user_models")
    model, m = load_bundle(tmp_path / "models" / "digits" / "1", allow_modules=["user_models"])
    assert m.labels == ["0", "1", "2", "7"] and m.modality == "image" and m.input.options == {"color": "L"}
    assert m.base.arch == "user_models:ResearchLeNet" and m.base.output.index == 0
    assert all(torch.equal(v, weights[k]) for k, v in model.base.state_dict().items())  # the given weights
    metrics = json.loads((tmp_path / "reports" / "digits" / "metrics.json").read_text())
    assert metrics["rows"]["base"]["acc"]["mean"] == pytest.approx(1 / 4, abs=0.2)  # untrained weights: chance
    save_file(weights, str(tmp_path / "lenet.safetensors"))
    assert fit(tmp_path, *common, "--weights", str(tmp_path / "lenet.safetensors")) == 0
    assert read_manifest(tmp_path / "models" / "digits" / "2").provenance["n_train"] == 168  # 240 - 36 - 36


def mlp_args(layer: str, data: Path) -> list[str]:
    """The dict-output MLP of examples/user_models.py on ``data``."""
    return ["--arch", "user_models:DictMLP", "--output", "logits", "--layer", layer, "--data", str(data)]


def test_csv_with_target_column_trains_the_base_when_no_weights(tmp_path):
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame["target"] = frame["target"].map({0: "malignant", 1: "benign"})
    frame.to_csv(tmp_path / "cancer.csv", index=False)
    args = mlp_args("fc2", tmp_path / "cancer.csv")
    assert fit(tmp_path, *args, "--target", "target", "--name", "cancer", "--epochs", "5") == 0
    m = read_manifest(tmp_path / "models" / "cancer" / "1")
    assert (m.modality, m.labels, m.input.shape) == ("tabular", ["benign", "malignant"], [30])
    spec = m.input.options["tabular"]
    train = frame.iloc[sorted(set(range(569)) - set(_held_out(569)))]
    assert spec["fields"][0]["name"] == "mean radius"
    assert spec["fields"][0]["mean"] == pytest.approx(train["mean radius"].mean(), rel=1e-6)  # fitted on train only
    metrics = json.loads((tmp_path / "reports" / "cancer" / "metrics.json").read_text())
    assert metrics["rows"]["base"]["acc"]["mean"] > 0.85  # a trained base model, 5 epochs


def test_csv_regression(tmp_path):
    """A real-valued target: the MLP's one output, the target standardised on train and stored."""
    from sklearn.datasets import load_diabetes

    load_diabetes(as_frame=True).frame.to_csv(tmp_path / "diabetes.csv", index=False)
    args = mlp_args("fc2", tmp_path / "diabetes.csv") + ["--kwargs", '{"d_in": 10, "d_out": 1}', "--task", "regression"]
    assert fit(tmp_path, *args, "--target", "target", "--name", "diabetes", "--epochs", "20") == 0
    m = read_manifest(tmp_path / "models" / "diabetes" / "1")
    assert (m.task, m.labels, m.targets.loss, m.latent_dims) == ("regression", None, "mse", (32, 32, 1))
    train = load_diabetes(as_frame=True).frame.drop(index=_held_out(442))["target"]
    assert m.input.options["tabular"]["target_mean"] == pytest.approx(train.mean(), rel=1e-6)
    rows = json.loads((tmp_path / "reports" / "diabetes" / "metrics.json").read_text())["rows"]
    assert rows["base"]["mse"]["mean"] < 0.8  # standardised units: the trained base explains some variance


def _held_out(n: int) -> list[int]:
    from training.data.splits import make_split

    s = make_split(n, round(n * 0.15), round(n * 0.15), 0)
    return s.val + s.test


def test_wav_folder_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    for hz in (300, 700, 1500):  # three classes of tones with noise, varied pitch and length
        (tmp_path / "wavs" / f"tone{hz}").mkdir(parents=True)
        for i in range(20):
            t = np.arange(int(16000 * rng.uniform(0.5, 1.0))) / 16000
            x = 0.5 * np.sin(2 * math.pi * hz * rng.uniform(0.9, 1.1) * t) + 0.05 * rng.standard_normal(len(t))
            (tmp_path / "wavs" / f"tone{hz}" / f"{i}.wav").write_bytes(
                write_wav(torch.tensor(x, dtype=torch.float32), 16000)
            )
    args = ["--arch", "user_models:AudioNet", "--output", "0", "--layer", "fc1", "--data", str(tmp_path / "wavs")]
    assert fit(tmp_path, *args, "--name", "tones", "--epochs", "10") == 0
    m = read_manifest(tmp_path / "models" / "tones" / "1")
    assert (m.modality, m.labels, m.input.shape) == ("audio", ["tone1500", "tone300", "tone700"], [1, 40, 101])
    assert set(m.input.options["audio"]) >= {"sample_rate", "n_mels"} and len(m.input.normalization.mean) == 1

    x = rng.standard_normal((200, 30)).astype(np.float32)
    np.savez(tmp_path / "rows.npz", x=x, y=(x[:, 0] > 0).astype(np.int64), labels=np.array(["neg", "pos"]))
    args = mlp_args("fc1", tmp_path / "rows.npz")
    assert fit(tmp_path, *args, "--name", "rows", "--epochs", "5") == 0
    m = read_manifest(tmp_path / "models" / "rows" / "1")
    assert (m.modality, m.labels, m.input.shape) == ("tensor", ["neg", "pos"], [30])


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--arch", "user_models:ResearchLeNet", "--layer", "fc1", "--data", "digits", "--kwargs", '{"classes": 4}'],
            "--kwargs: user_models:ResearchLeNet(**{'classes': 4}) failed: TypeError: "
            "ResearchLeNet.__init__() got an unexpected keyword argument 'classes'",
        ),
        (
            ["--arch", "user_models:ResearchLeNet", "--layer", "fc1", "--data", "digits", "--input-shape", "1x28x28"],
            "--input-shape: expected C,H,W as integers, got '1x28x28'",
        ),
        (
            ["--arch", "user_models:ResearchLeNet", "--layer", "fc1", "--data", "digits", "--input-shape", "2,28,28"],
            "--input-shape: an image is (channels 1 or 3, height, width), got [2, 28, 28]",
        ),
        (
            ["--arch", "user_models:ResearchLeNet", "--layer", "fc1", "--data", "digits", "--output", "operator:add"],
            "--output: output function 'operator:add': is not a function",
        ),
        (
            ["--arch", "user_models:ResearchLeNet", "--layer", "fc1", "--data", "digits", "--task", "regression"],
            "--task: regression needs real-valued targets; a folder per class gives class labels (use a CSV with "
            "--target or an .npz)",
        ),
        (
            ["--arch", "user_models:ResearchLeNet", "--layer", "fc1", "--data", "nowhere"],
            "--data: nowhere does not exist",
        ),
        (
            ["--arch", "user_models:ResearchLeNet", "--layer", "fc1", "--data", "digits", "--kwargs", "[4]"],
            "--kwargs: expected a JSON object of constructor arguments (not an object)",
        ),
        (
            ["--arch", "user_models:ResearchLeNet", "--layer", "fc1", "--data", "digits", "--weights", "none.pth"],
            "--weights: none.pth does not exist",
        ),
        (
            ["--arch", "user_models:Missing", "--layer", "fc1", "--data", "digits"],
            "--arch: architecture 'user_models:Missing': module 'user_models' has no 'Missing'",
        ),
        (
            ["--arch", "user_models:DictMLP", "--layer", "fc1", "--data", "digits"],
            "--input-shape: the model cannot run one sample of shape [1, 28, 28]: RuntimeError: "
            "mat1 and mat2 shapes cannot be multiplied (28x28 and 30x32)",
        ),
        (
            [
                "--arch",
                "user_models:ResearchLeNet",
                "--kwargs",
                '{"num_classes": 4}',
                "--output",
                "0",
                "--layer",
                "relu",
                "--data",
                "digits",
            ],  # fmt: skip
            "--layer: the model has no submodule 'relu'; its Linear/Conv2d layers: "
            "['conv1', 'conv2', 'fc1', 'fc2', 'fc3']",
        ),
    ],
)
def test_wrong_arguments_end_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(EXAMPLES)
    assert fit(tmp_path, *args, "--name", "x", "--epochs", "1") == 2
    assert capsys.readouterr().err == f"ocd fit: {message}\n"
    assert not (tmp_path / "models").exists()
