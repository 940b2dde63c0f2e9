"""End to end on a few hundred MNIST images: `ocd train mnist --variant smoke` -> bundle + report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ocd_core.bundle import load_bundle
from ocd_core.denoisers import CompactConfig
from ocd_core.fit import FitConfig, build_target_set, fit_ocd
from ocd_core.tap import tap


def test_train_smoke_produces_bundle_and_report(tmp_path):
    args = [
        sys.executable,
        "-m",
        "ocd_cli",
        "train",
        "mnist",
        "--variant",
        "smoke",
        "--quiet",
        "--runs",
        str(tmp_path / "runs"),
        "--models",
        str(tmp_path / "models"),
        "--reports",
        str(tmp_path / "reports"),
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"bundle: {tmp_path / 'models' / 'mnist' / '1'}" in out.stdout
    model, m = load_bundle(tmp_path / "models" / "mnist" / "1")
    assert (
        m.name == "mnist"
        and m.layer == "fc1"
        and m.task == "classification"
        and m.labels == [str(i) for i in range(10)]
    )
    assert m.provenance["split_sizes"] == [200, 100, 100] and m.provenance["recipe"] == "smoke"
    assert m.input.normalization is not None and len(m.input.normalization.mean) == 1
    rows = {
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
        "ddim_2",
        "ocd_heldout",
        "ocd_heldout_ensemble",
        "alt_layer",
    }
    assert set(m.metrics) == rows
    report = tmp_path / "reports" / "mnist"
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["rows"]) == rows and metrics["seeds"] == [0, 1]
    for row in rows:
        assert set(metrics["rows"][row]) == {"acc", "ce"}
        assert len(metrics["rows"][row]["acc"]["per_seed"]) == 2
        acc = metrics["rows"][row]["acc"]
        assert all(abs(a * 100 - round(a * 100)) < 1e-4 for a in acc["per_seed"]), (
            row,
            acc,
        )  # 100 test images (float32)
        assert acc["mean"] == pytest.approx(sum(acc["per_seed"]) / 2, abs=1e-6), row
        base = metrics["rows"]["base"]["acc"]["per_seed"]
        assert acc["gain_per_seed"] == pytest.approx([a - b for a, b in zip(acc["per_seed"], base)], abs=1e-6), row
    assert metrics["rows"]["base"]["acc"]["gain_per_seed"] == [0.0, 0.0]
    for png in ("training_curves.png", "ddim_steps.png", "reliability.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (report / "report.md").read_text()
    assert "| OCD ensemble |" in text and "## Per-seed paired gain" in text
    assert "| ablation: alternative layer `fc2` instead of `fc1` (1 sample) |" in text
    p = model.predict(torch.zeros(2, 1, 28, 28), steps=2, ensemble=2, seeds=[0, 1])
    assert p.stacked().shape == (2, 2, 10)

    # the serving modes: measured on val for both seeds, the default named in the bundle and the report
    modes = {"base": (0, 1), "ocd": (2, 1), "ocd_ensemble": (2, 2), "ddim_1": (1, 1)}
    assert {k: (v.ddim_steps, v.ensemble) for k, v in m.serving.modes.items()} == modes
    assert all(len(v.val["acc"]["per_seed"]) == 2 and v.cost > 0 for v in m.serving.modes.values())
    assert m.serving.modes["base"].cost == 1.0 and m.serving.mode in modes and m.serving.chosen
    row = {"base": "base", "ocd": "ocd", "ocd_ensemble": "ocd_ensemble", "ddim_1": "ddim_1"}[m.serving.mode]
    assert metrics["served"] == row
    assert metrics["serving"] == json.loads(m.serving.model_dump_json())
    assert f"**Served default: `{m.serving.mode}`**" in text and f"| `{m.serving.mode}` **(served)** |" in text
    gains = {k: [v.val[x]["per_seed"] for x in ("acc", "ce")] for k, v in m.serving.modes.items()}
    if m.serving.mode != "base":  # served only when not worse than base on either seed, either metric
        acc, ce = gains[m.serving.mode]
        assert min(acc) >= 0 and max(ce) <= 0 and m.serving.modes[m.serving.mode].cost <= 5.0
    val_acc = [
        json.loads(p.read_text())["ocd"]["acc"] for p in sorted((tmp_path / "runs").glob("*/seed*/eval_val.json"))
    ]
    base_acc = [
        json.loads(p.read_text())["base"]["acc"] for p in sorted((tmp_path / "runs").glob("*/seed*/eval_val.json"))
    ]
    assert gains["ocd"][0] == pytest.approx([a - b for a, b in zip(val_acc, base_acc)])

    # a second run resumes: every stage is found on disk, the same version is reused
    evals = sorted((tmp_path / "runs").glob("*/seed*/eval.json"))
    stamps = [e.stat().st_mtime_ns for e in evals]
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [e.stat().st_mtime_ns for e in evals] == stamps
    assert sorted(p.name for p in (tmp_path / "models" / "mnist").iterdir()) == ["1"]


def test_diffusion_training_resumes_from_checkpoint_exactly(lenet, mnist_batch, tmp_path):
    x, y = mnist_batch
    targets = build_target_set(lenet, "fc1", x, y, progress=False)
    cfg = FitConfig(train_steps=8, batch_size=8, checkpoint_every=4, denoiser=CompactConfig(hidden=8))
    full, hist = fit_ocd(lenet, "fc1", targets, cfg, checkpoint=tmp_path / "a.ckpt", progress=False)
    assert (tmp_path / "a.ckpt").exists() and len(hist["denoise_mse"]) == 8
    # "interrupted" after step 4: the checkpoint holds step 4; resuming runs steps 5..8 only
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert int(state["step"]) == 4
    resumed, hist2 = fit_ocd(lenet, "fc1", targets, cfg, checkpoint=tmp_path / "a.ckpt", progress=False)
    assert hist2["denoise_mse"] == hist["denoise_mse"]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["mnist", "diamonds", "credit", "spoken_digits", "nerf"])
def test_alt_layer_is_the_top_ranked_other_layer(name):
    """The ablation's layer is the committed ranking's best layer other than the one OCD adapts."""
    from training.recipes import RECIPES

    recipe = RECIPES[name]("cpu")
    sel = json.loads((Path(__file__).parents[1] / "reports" / name / "layer_selection.json").read_text())
    assert sel["used_layer"] == recipe.layer
    assert recipe.alt_layer == next(r["layer"] for r in sel["ranking"] if r["layer"] != recipe.layer)


def test_select_layer_writes_the_ranking_into_the_report(tmp_path):
    from training.pipeline import run_recipe
    from training.recipes import RECIPES
    from training.select_layer import select_layer

    recipe = RECIPES["credit"]("smoke")
    run_recipe(recipe, tmp_path / "runs", tmp_path / "models", tmp_path / "reports", progress=False, device="cpu")
    rows = select_layer(recipe, tmp_path / "models", tmp_path / "reports", tmp_path / "runs", draws=8, samples=50)
    assert [r["rank"] for r in rows] == [1, 2, 3] and sorted(r["layer"] for r in rows) == ["fc1", "fc2", "out"]
    assert rows[0]["score"] == 1.0
    text = (tmp_path / "reports" / "credit" / "report.md").read_text()
    assert text.count("## Layer selection") == 1 and f"| 1 | {rows[0]['layer']} |" in text
    select_layer(recipe, tmp_path / "models", tmp_path / "reports", tmp_path / "runs", draws=8, samples=50)
    assert (tmp_path / "reports" / "credit" / "report.md").read_text().count("## Layer selection") == 1


def test_a_bundle_published_before_modes_gets_them_from_its_val_split(tmp_path):
    from ocd_core.bundle import ServingDefaults, read_manifest
    from ocd_core.io import atomic_write_text
    from training.pipeline import choose_bundle_modes, run_recipe
    from training.recipes import RECIPES

    recipe = RECIPES["credit"]("smoke")
    bundle, _ = run_recipe(recipe, tmp_path / "runs", tmp_path / "models", tmp_path / "reports", progress=False)
    m = read_manifest(bundle)
    legacy = m.model_copy(update={"serving": ServingDefaults(ddim_steps=2)})  # as written before modes
    atomic_write_text(legacy.model_dump_json(), bundle / "manifest.json")
    assert read_manifest(bundle).serving.mode == "ocd" and read_manifest(bundle).serving.modes == {}
    s = choose_bundle_modes(bundle, tmp_path / "runs", "cpu", progress=False)
    assert read_manifest(bundle).serving == s
    assert set(s.modes) == {"base", "ocd", "ocd_ensemble", "ddim_1"}
    assert all(len(v.val["acc"]["per_seed"]) == 2 and v.cost > 0 for v in s.modes.values())  # 2 noise seeds
    assert s.modes["base"].val["acc"]["per_seed"] == [0.0, 0.0]
    assert s.chosen.endswith(" (one trained model: noise seeds)")
    # the same trained model: its val rows under seed 0 are the run's own val rows of seed 0
    run_val = json.loads(next((tmp_path / "runs").glob("*/seed0/eval_val.json")).read_text())
    assert s.modes["ocd"].val["ce"]["per_seed"][0] == pytest.approx(run_val["ocd"]["ce"] - run_val["base"]["ce"])
    other = m.model_copy(update={"provenance": {**m.provenance, "split_digest": "0" * 16}})
    atomic_write_text(other.model_dump_json(), bundle / "manifest.json")
    with pytest.raises(ValueError, match="split is not the one this bundle was trained on"):
        choose_bundle_modes(bundle, tmp_path / "runs", "cpu", progress=False)


def test_scale_is_the_root_mean_square_so_a_constant_shift_stays_bounded():
    """ρ* is each delta's RMS: a near-constant delta (spoken digits conv1: std 3e-7, mean 1e-3) must
    not give x_0 = δ/ρ* entries in the thousands."""
    from ocd_core.fit import TargetSet

    shift = torch.full((1, 4, 3), 1e-3)
    shift[0, 0, 0] += 1e-9  # std ~ 3e-10
    sign = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]]).repeat(2, 1)[None] * 2e-3  # zero mean, ±2e-3
    z = torch.zeros(2, 1)
    t = TargetSet(torch.cat([shift, sign]), z, z, z, z)
    assert torch.allclose(t.scales, torch.tensor([1e-3, 2e-3]), rtol=1e-5)
    x0 = t.deltas.flatten(1) / t.scales[:, None]
    assert x0.abs().max().item() < 1.0001


def test_ocd_on_a_conv_layer_with_pooled_latents(lenet, mnist_batch):
    """CondConfig.latent_pool on a Conv2d layer pools its latents per channel (B, C, H, W) ->
    (B, C, p, p) for training and serving alike; the model then samples and adapts the conv."""
    from ocd_core.conditioning import CondConfig

    x, y = mnist_batch
    targets = build_target_set(lenet, "conv2", x, y, progress=False, pool=3)
    assert targets.inp.shape == (20, 6 * 9) and targets.act.shape == (20, 16 * 9) and targets.grad.shape == (20, 16 * 9)
    cfg = FitConfig(
        train_steps=4, batch_size=8, cond=CondConfig(latent_pool=3, dim=16, hidden=16), denoiser=CompactConfig(hidden=8)
    )
    model, _ = fit_ocd(lenet, "conv2", targets, cfg, progress=False)
    lat = model.latents(x[:2])
    assert lat.inp.shape == (2, 6, 3, 3) and lat.act.shape == (2, 16, 3, 3)
    ref = F.adaptive_avg_pool2d(tap(lenet, "conv2", x[:2]).act, 3)
    assert torch.allclose(lat.act, ref, atol=1e-6)
    out = model.predict(x[:3], steps=2, ensemble=2, seeds=[0, 1, 2])
    assert out.mean.shape == (3, 10) and torch.isfinite(out.mean).all()
