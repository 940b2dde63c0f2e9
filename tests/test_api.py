"""The Python API on a user's own model and data: scikit-learn's 8x8 digits and a small MLP."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from ocd_core.bundle import ArchSpec, load_bundle
from ocd_core.denoisers import CompactConfig
from ocd_core.fit import FitConfig
from ocd_core.nets import register_architecture
from training.api import ocd_pipeline
from training.recipes import EvalConfig
from training.train_base import train_base


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_pipeline_on_own_module(tmp_path, caplog):
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te, va = perm[:1200], perm[1200:1500], perm[1500:1797]
    torch.manual_seed(0)
    register_architecture("digits_mlp", DigitsMLP)
    base = DigitsMLP()
    train_base(base, x[tr], y[tr], epochs=10, progress=False)
    res = ocd_pipeline(
        base,
        "fc2",
        (x[tr], y[tr]),
        (x[te], y[te]),
        val=(x[va], y[va]),
        name="digits",
        arch=ArchSpec(arch="digits_mlp", kwargs={"hidden": 32}),
        input_shape=[64],
        labels=[str(i) for i in range(10)],
        models_dir=tmp_path,
        progress=False,
        fit=FitConfig(train_steps=40, batch_size=64, denoiser=CompactConfig(hidden=16)),
        eval=EvalConfig(ddim_steps=[1, 5], default_steps=5, ensemble=3),
    )
    assert res.targets.deltas.shape == (1200, 32, 32)
    assert [r.getMessage() for r in caplog.records if r.name == "ocd.api"] == [
        "arch 'digits_mlp' is registered in this process only: `ocd serve` cannot load this bundle; name the "
        "class by import path ('package.module:Class') to serve it"
    ]
    assert set(res.metrics["rows"]) == {
        "base",
        "oracle",
        "ocd",
        "ocd_ensemble",
        "no_scale",
        "nearest_neighbour",
        "knn_average",
        "noise_delta",
        "tent_1",
        "tent_3",
        "ddim_1",
        "ddim_5",
    }
    with torch.no_grad():  # the base row, recomputed here: the test split's accuracy of the trained base
        base_acc = (base.eval()(x[te]).argmax(-1) == y[te]).float().mean().item()
    assert res.metrics["rows"]["base"]["acc"] == pytest.approx(base_acc, abs=1e-9) and base_acc > 0.85
    for row, m in res.metrics["rows"].items():  # accuracies over 300 test digits: multiples of 1/300 (float32)
        assert abs(m["acc"] * len(te) - round(m["acc"] * len(te))) < 1e-3, row
    assert res.bundle == tmp_path / "digits" / "1"
    loaded, manifest = load_bundle(res.bundle)
    assert manifest.layer == "fc2" and manifest.latent_dims == (32, 32, 10)
    s = manifest.serving  # the default mode, chosen on val (training/modes.py)
    assert {k: (m.ddim_steps, m.ensemble) for k, m in s.all_modes().items()} == {
        "base": (0, 1),
        "ocd": (5, 1),
        "ocd_ensemble": (5, 3),
        "ddim_1": (1, 1),
    }
    assert (
        res.metrics["served"]
        == {"base": "base", "ocd": "ocd", "ocd_ensemble": "ocd_ensemble", "ddim_1": "ddim_1"}[s.mode]
    )
    gains = {k: {m: v["per_seed"][0] for m, v in mode.val.items()} for k, mode in s.modes.items()}
    assert gains["base"] == {"acc": 0.0, "ce": 0.0} and set(gains) == {"base", "ocd", "ocd_ensemble", "ddim_1"}
    assert all(m.cost > 0 for m in s.modes.values()) and s.modes["base"].cost == 1.0
    if s.mode == "base":  # nothing gained on val without losing somewhere, within the cost budget
        assert not any(
            (g["acc"] > 0 and g["ce"] <= 0 or g["acc"] == 0 and g["ce"] < 0) and s.modes[k].cost <= 5.0
            for k, g in gains.items()
        )
    else:
        assert gains[s.mode]["acc"] >= 0 and gains[s.mode]["ce"] <= 0 and gains[s.mode] != gains["base"]
    p1 = loaded.predict(x[te][:4], steps=5, ensemble=3, seeds=[1, 2, 3, 4])
    p2 = res.model.predict(x[te][:4], steps=5, ensemble=3, seeds=[1, 2, 3, 4])
    assert p1.stacked().shape == (4, 3, 10) and torch.equal(p1.members, p2.members)
