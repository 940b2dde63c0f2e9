"""Helpers for tests against a real uvicorn server on loopback."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from ocd_core.bundle import ArchSpec, InputSpec, Manifest, Normalization, save_bundle
from ocd_core.conditioning import CondConfig, CondEncoder
from ocd_core.denoisers import CompactConfig, build_denoiser
from ocd_core.nets import build_net
from ocd_core.predictor import OCDModel
from ocd_core.scale import ScaleConfig, ScaleNet
from ocd_core.schedule import ScheduleConfig
from ocd_core.targets import TargetConfig

ROOT = Path(__file__).resolve().parents[1]


def make_bundle(root: Path, name: str = "mnist", version: str = "1", seed: int = 0) -> Path:
    """A LeNet5 OCD bundle with random weights (the service's behaviour does not need a trained one)."""
    torch.manual_seed(seed)
    base = build_net("lenet5").eval()
    cond = CondEncoder(120, 84, 10, CondConfig(dim=16, hidden=16), weight_shape=(84, 120))
    den = build_denoiser(CompactConfig(prediction="epsilon"), (84, 120), 16)
    scale = ScaleNet(120, 84, 10, ScaleConfig(hidden=8))
    model = OCDModel(base, "fc1", cond, den, scale, ScheduleConfig(), "classification", 1e-2)
    manifest = Manifest(name=name, version=version, task="classification", modality="image",
                        input=InputSpec(shape=[1, 28, 28], normalization=Normalization(mean=[0.13], std=[0.31])),
                        labels=[str(i) for i in range(10)], base=ArchSpec(arch="lenet5", kwargs={"num_classes": 10}),
                        layer="fc1", latent_dims=(120, 84, 10), mean_scale=1e-2, targets=TargetConfig(),
                        schedule=ScheduleConfig(), denoiser=CompactConfig(prediction="epsilon"),
                        cond=CondConfig(dim=16, hidden=16), scale=ScaleConfig(hidden=8))
    return save_bundle(model, manifest, root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``ocd serve`` in a subprocess on a free loopback port."""

    def __init__(self, models_dir: Path, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OCD_THREADS": "1", **{f"OCD_{k.upper()}": str(v) for k, v in settings.items()}}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log = open(models_dir.parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "training.cli", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--models", str(models_dir)],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.logs()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready: {self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metric(self, name: str, **labels) -> float:
        """Sum of a metric's samples with these labels, from /metrics."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                head, value = line.rsplit(" ", 1)
                if all(f'{k}="{v}"' in head for k, v in labels.items()):
                    total += float(value)
        return total

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
