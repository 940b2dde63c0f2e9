"""The Python API on a user's own model and data: scikit-learn's 8x8 digits and a small MLP."""

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


def test_pipeline_on_own_module(tmp_path):
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:1500]
    torch.manual_seed(0)
    register_architecture("digits_mlp", DigitsMLP)
    base = DigitsMLP()
    train_base(base, x[tr], y[tr], epochs=10, progress=False)
    res = ocd_pipeline(
        base,
        "fc2",
        (x[tr], y[tr]),
        (x[te], y[te]),
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
    assert res.metrics["rows"]["base"]["acc"] > 0.85
    assert res.bundle == tmp_path / "digits" / "1"
    loaded, manifest = load_bundle(res.bundle)
    assert manifest.layer == "fc2" and manifest.latent_dims == (32, 32, 10)
    p1 = loaded.predict(x[te][:4], steps=5, ensemble=3, seeds=[1, 2, 3, 4])
    p2 = res.model.predict(x[te][:4], steps=5, ensemble=3, seeds=[1, 2, 3, 4])
    assert p1.stacked().shape == (4, 3, 10) and torch.equal(p1.members, p2.members)
