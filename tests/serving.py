"""Helpers for tests against a real uvicorn server on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.launch import ROOT, Server  # noqa: F401  (re-exported for the tests)
from ocd_core.bundle import ArchSpec, InputSpec, Manifest, Normalization, save_bundle
from ocd_core.conditioning import CondConfig, CondEncoder
from ocd_core.denoisers import CompactConfig, build_denoiser
from ocd_core.nets import build_net
from ocd_core.predictor import OCDModel
from ocd_core.scale import ScaleConfig, ScaleNet
from ocd_core.schedule import ScheduleConfig
from ocd_core.targets import TargetConfig


def make_bundle(root: Path, name: str = "mnist", version: str = "1", seed: int = 0, in_channels: int = 1) -> Path:
    """A LeNet5 OCD bundle with random weights (the service's behaviour does not need a trained one)."""
    torch.manual_seed(seed)
    base = build_net("lenet5", in_channels=in_channels).eval()
    cond = CondEncoder(120, 84, 10, CondConfig(dim=16, hidden=16), weight_shape=(84, 120))
    den = build_denoiser(CompactConfig(prediction="epsilon"), (84, 120), 16)
    scale = ScaleNet(120, 84, 10, ScaleConfig(hidden=8))
    model = OCDModel(base, "fc1", cond, den, scale, ScheduleConfig(), "classification", 1e-2)
    manifest = Manifest(
        name=name,
        version=version,
        task="classification",
        modality="image",
        input=InputSpec(
            shape=[in_channels, 28, 28],
            normalization=Normalization(mean=[0.13] * in_channels, std=[0.31] * in_channels),
        ),
        labels=[str(i) for i in range(10)],
        base=ArchSpec(
            arch="lenet5", kwargs={"num_classes": 10, **({"in_channels": in_channels} if in_channels != 1 else {})}
        ),
        layer="fc1",
        latent_dims=(120, 84, 10),
        mean_scale=1e-2,
        targets=TargetConfig(),
        schedule=ScheduleConfig(),
        denoiser=CompactConfig(prediction="epsilon"),
        cond=CondConfig(dim=16, hidden=16),
        scale=ScaleConfig(hidden=8),
    )
    return save_bundle(model, manifest, root)


def inference_pids(pid: int) -> list[int]:
    """The spawned processes of ``pid`` (its inference process; not multiprocessing's resource tracker)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [
            int(c)
            for c in (task / "children").read_text().split()
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
        ]
    return out


def peak_rss(pid: int) -> int:
    """A process's peak resident set so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmHWM for {pid}")


def until(check, what: str, within: float = 60.0):
    """Poll ``check()`` until it is true -> its value (tests wait for states, not for time to pass)."""
    deadline = time.monotonic() + within
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.02)
    return value


# a diamonds row (the committed tabular regression bundles' fields)
DIAMOND_ROW = {"carat": 0.7, "cut": "Ideal", "color": "G", "clarity": "VS1", "depth": 61.5, "table": 56}
DIAMOND_ROW |= {"x": 5.7, "y": 5.7, "z": 3.5}
