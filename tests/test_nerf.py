"""tinyNeRF groundwork: cameras, compositing, the analytic scene and the model (issue #6)."""

import json
import math

import numpy as np
import pytest
import torch

from ocd_core.bundle import load_bundle
from ocd_core.nets import build_net
from ocd_core.nets.nerf import TinyNeRF, look_at, pixel_rays, positional_encoding, sample_depths, volume_render
from ocd_core.tap import tap
from training.data.nerf_scene import PRIMITIVES, nerf_views, render_scene, spiral_poses


def test_cameras_sit_on_the_sphere_and_look_at_the_origin():
    pose = torch.tensor([[30.0, 45.0, 4.0], [200.0, 10.0, 3.0]])
    c2w = look_at(pose)
    eye = c2w[:, :, 3]
    assert torch.allclose(eye.norm(dim=-1), pose[:, 2])
    assert torch.allclose(
        eye[0],
        4
        * torch.tensor(
            [
                math.cos(math.radians(45)) * math.cos(math.radians(30)),
                math.cos(math.radians(45)) * math.sin(math.radians(30)),
                math.sin(math.radians(45)),
            ]
        ),
        atol=1e-5,
    )
    R = c2w[:, :, :3]
    assert torch.allclose(R.transpose(1, 2) @ R, torch.eye(3).expand(2, 3, 3), atol=1e-5)  # orthonormal
    o, d = pixel_rays(c2w, 101, 101, 80.0)  # odd size: the middle pixel's ray is the optical axis
    assert o.shape == d.shape == (2, 101 * 101, 3) and torch.allclose(d.norm(dim=-1), torch.ones(2, 101 * 101))
    assert torch.allclose(d[:, 50 * 101 + 50], -eye / eye.norm(dim=-1, keepdim=True), atol=1e-5)
    assert pixel_rays(c2w, 100, 100, 80.0, stride=4)[0].shape == (2, 625, 3)


def test_compositing():
    depths = sample_depths(1, 2, 2.0, 6.0, 4, False, torch.zeros(1))
    assert torch.allclose(depths[0, 0], torch.tensor([2.5, 3.5, 4.5, 5.5]))
    rgb = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).expand(1, 2, 4, 3)
    sigma = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 1e6, 0.0, 0.0]]])
    out = volume_render(sigma, rgb, depths, background=1.0)
    assert torch.allclose(out[0, 0], torch.ones(3))  # empty ray: the background
    assert torch.allclose(out[0, 1], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)  # the first opaque sample
    half = volume_render(torch.tensor([[[math.log(2.0), 0, 0, 0]]]), rgb[:, :1], depths[:, :1], background=0.0)
    assert torch.allclose(half[0, 0], 0.5 * torch.tensor([0.2, 0.4, 0.6]), atol=1e-6)  # alpha = 1 − e^(−ln2·1)
    assert positional_encoding(torch.zeros(5, 3), 6).shape == (5, 39)


def test_scene_shows_its_primitives():
    img = render_scene(torch.tensor([[0.0, 89.0, 4.0]]), H=21, W=21, n_samples=128)  # from straight above
    assert img.shape == (1, 3, 21, 21)
    assert torch.allclose(img[0, :, 10, 10], torch.tensor(PRIMITIVES[0][3]), atol=0.03)  # the red sphere on top
    assert torch.allclose(img[0, :, 0, 0], torch.ones(3), atol=0.03)  # the background in the corner


def test_poses_spiral_over_the_upper_hemisphere(tmp_path):
    p = spiral_poses(100)
    assert p.shape == (100, 3) and (p[:, 1] >= 10).all() and (p[:, 1] <= 70).all() and (p[:, 2] == 4).all()
    assert len(set(p[:, 0].round().tolist())) > 90  # azimuths spread out
    poses, images = nerf_views(tmp_path, n_poses=3, H=12, W=12)
    assert images.shape == (3, 3, 12, 12) and len(list(tmp_path.glob("nerf-*.safetensors"))) == 1
    again = nerf_views(tmp_path, n_poses=3, H=12, W=12)
    assert torch.equal(again[1], images) and torch.equal(again[0], poses)


def test_tiny_nerf_renders_and_learns():
    torch.manual_seed(0)
    model = build_net("tiny_nerf", H=40, W=40, stride=4, n_samples=16)
    assert isinstance(model, TinyNeRF)
    pose = torch.tensor([[10.0, 30.0, 4.0], [100.0, 50.0, 4.0]])
    model.eval()
    img = model(pose)
    assert img.shape == (2, 3, 10, 10) and torch.equal(img, model(pose))  # eval: midpoints, deterministic
    lat = tap(model, "fc1", pose)
    assert lat.inp.shape == (2, 100 * 16, 39) and lat.act.shape == (2, 1600, 128) and lat.out.shape == (2, 3, 10, 10)
    model.train()
    assert not torch.equal(model(pose), model(pose))  # training: stratified jitter
    target = render_scene(pose, 40, 40, n_samples=64)[:, :, ::4, ::4]
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(60):
        loss = ((model(pose) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    model.stride = 1
    assert model.eval()(pose).shape == (2, 3, 40, 40)


@pytest.fixture(scope="module")
def nerf_run(tmp_path_factory):
    """`ocd train nerf --variant smoke`: 20 poses at 16x16, 2 seeds, every stage and the ONNX export."""
    from training.pipeline import run_recipe
    from training.recipes import RECIPES

    root = tmp_path_factory.mktemp("nerf")
    bundle, report = run_recipe(
        RECIPES["nerf"]("smoke"), root / "runs", root / "models", root / "reports", progress=False, device="cpu"
    )
    return root, bundle, report


def test_nerf_recipe_trains_reports_and_exports(nerf_run):
    root, bundle, report = nerf_run
    model, m = load_bundle(bundle)
    assert m.modality == "pose" and m.task == "regression" and m.layer == "fc1" and m.cond.latent_pool == 3
    assert m.base.kwargs["stride"] == 1  # served at every pixel; trained on every 2nd
    assert m.latent_dims == (
        39,
        32,
        3 * 3 * 3,
    )  # pooled: PE features, fc1 units, the render at 3x3 (16 px: uneven bins)
    metrics = json.loads((report / "metrics.json").read_text())
    assert {"base", "oracle", "ocd", "ocd_ensemble", "no_scale", "nearest_neighbour", "alt_layer"} <= set(
        metrics["rows"]
    )
    for row in metrics["rows"].values():
        assert set(row) == {"mse", "psnr"}
        assert row["psnr"]["mean"] == pytest.approx(-10 * math.log10(row["mse"]["mean"]), abs=1.0)
    assert metrics["rows"]["oracle"]["mse"]["gain_mean"] < 0  # overfitting on the test view's own pixels helps
    png = (report / "renders.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(report / "renders.png").size == (2 * 16, 4 * 16)  # 2 test views, 4 rows of 16 px
    assert "![renders](renders.png)" in (report / "report.md").read_text()
    assert (bundle / "onnx.json").exists()  # exported and verified against torch at publish
    p = model.predict(torch.tensor([[30.0, 40.0, 4.0]]), steps=2, ensemble=2, seeds=[0])
    assert p.stacked().shape == (1, 2, 3, 16, 16) and p.base.shape == (1, 3, 16, 16)


def test_nerf_serving_render_predict_and_v2(nerf_run):
    import base64
    import io

    import httpx
    from PIL import Image
    from serving import Server

    root, bundle, _ = nerf_run
    model, _ = load_bundle(bundle)
    want = model.predict(torch.tensor([[30.0, 40.0, 4.0]]), steps=3, ensemble=2, seeds=[7]).mean[0]
    want_png = (want.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    for backend in ("torch", "onnx"):
        s = Server(root / "models", backend=backend)
        try:
            body = {
                "model": "nerf",
                "pose": {"azimuth": 30, "elevation": 40, "radius": 4},
                "ddim_steps": 3,
                "ensemble": 2,
                "seed": 7,
            }
            r = httpx.post(f"{s.url}/render", json=body, timeout=60)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
            assert r.headers["x-ocd-seed"] == "7" and r.headers["x-ocd-ddim-steps"] == "3"
            img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.float32))
            assert (img - torch.from_numpy(want_png)).abs().max() <= 1
            r = httpx.post(
                f"{s.url}/predict",
                json={"model": "nerf", "input": [30, 40, 4], "ddim_steps": 3, "ensemble": 2, "seed": 7},
                timeout=60,
            )
            assert (
                r.status_code == 200
                and base64.b64decode(r.json()["image"]) == httpx.post(f"{s.url}/render", json=body, timeout=60).content
            )
            assert r.json()["uncertainty"] > 0
            r = httpx.post(
                f"{s.url}/v2/models/nerf/infer",
                timeout=60,
                json={
                    "inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [30, 40, 4]}],
                    "parameters": {"ddim_steps": 3, "ensemble": 2, "seed": 7},
                },
            )
            out = {o["name"]: o for o in r.json()["outputs"]}
            assert out["image"]["shape"] == [1, 3, 16, 16]
            assert (torch.tensor(out["image"]["data"]).view(3, 16, 16) - want).abs().max() < 1e-4
            errors = [
                (
                    {"model": "nerf", "pose": {"azimuth": 30, "elevation": 95, "radius": 4}},
                    422,
                    "pose.elevation: must be between -90 and 90 degrees, got 95",
                ),
                ({"model": "nerf", "pose": {"azimuth": 30, "elevation": 40}}, 422, "pose.radius: missing"),
                ({"model": "nerf", "pose": [30, 40, 0.1]}, 422, "pose.radius: must be between 1 and 50, got 0.1"),
                ({"model": "nerf", "pose": [30, 40]}, 422, "pose: expected shape [3], got [2]"),
                (
                    {"model": "nerf", "pose": {"azimuth": "x", "elevation": 1, "radius": 4}},
                    422,
                    "pose.azimuth: expected a number, got str",
                ),
            ]
            for bad, code, message in errors:
                r = httpx.post(f"{s.url}/render", json=bad, timeout=30)
                assert r.status_code == code and r.json()["error"] == message, r.text
        finally:
            s.stop()


def test_render_refuses_models_that_do_not_render(tmp_path):
    import httpx
    from serving import Server, make_bundle

    make_bundle(tmp_path)
    s = Server(tmp_path)
    try:
        r = httpx.post(f"{s.url}/render", json={"model": "mnist", "pose": [0, 30, 4]}, timeout=30)
        assert r.status_code == 400
        assert r.json()["error"] == (
            "model: 'mnist' is a image model; /render serves rendering models (pose in, image out): use /predict"
        )
    finally:
        s.stop()


@pytest.mark.parametrize("h,w,p", [(100, 100, 8), (25, 25, 8), (7, 9, 4)])
def test_pooled_render_equals_adaptive_average_pooling(h, w, p):
    """pool_latents pools images with averaging matrices (exportable to ONNX at sizes p does not divide)."""
    import torch.nn.functional as F

    from ocd_core.tap import Latents, pool_latents

    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    pts = torch.randn(2, 50, 39)
    lat = pool_latents(Latents(pts, pts[..., :8], x, None), p)
    assert torch.allclose(lat.out, F.adaptive_avg_pool2d(x, p), atol=1e-6)
    assert torch.allclose(lat.inp, pts.mean(1)) and lat.act.shape == (2, 8) and lat.grad is None
