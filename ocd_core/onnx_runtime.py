"""``OnnxRuntime``: the ``Runtime`` stages as ONNX Runtime sessions over a bundle's exported graphs.

``ocd export-onnx <bundle dir>`` traces each graph from the corresponding ``TorchRuntime`` stage
(training/export_onnx.py), so the two runtimes run the same computation and the one ``Predictor``
(noise per request, the DDIM loop, the ensemble summary) drives both; for the same seeds they agree
within float error (tests/test_onnx.py). CPU execution provider, or CUDA with onnxruntime-gpu.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from .adapt import LowRankDelta
from .bundle import BundleError, weights_digest
from .denoisers.base import FactorSampler
from .runtime import Upstream
from .tap import Latents

GRAPHS = ("base", "cond", "denoiser_step", "scale", "adapt")
log = logging.getLogger("ocd.service")


def providers_for(device: str, required: bool = True) -> list:
    """ONNX Runtime providers for a torch device string ("cpu", "cuda", "cuda:1"). Without the CUDA
    provider a CUDA device is an error when ``required`` (the device was asked for), else the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in have:
            index = int(device.split(":")[1]) if ":" in device else 0
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        if required:
            raise BundleError(f"device {device!r} needs onnxruntime-gpu (CUDAExecutionProvider); have {have}")
        log.warning("onnxruntime has no CUDA provider (have %s): ONNX Runtime runs on the CPU", have)
    return ["CPUExecutionProvider"]


class OnnxRuntime:
    """The five graphs of ``directory`` (base, cond, denoiser_step, scale, adapt) as a ``Runtime``.
    Tensors in and out are torch CPU tensors (zero-copy numpy views); ``device`` picks the provider."""

    device = torch.device("cpu")

    def __init__(self, directory: str | Path, device: str = "cpu", threads: int = 0, device_required: bool = True):
        import onnxruntime as ort

        directory = Path(directory)
        info_path = directory / "onnx.json"
        missing = [g for g in GRAPHS if not (directory / f"{g}.onnx").is_file()]
        if missing or not info_path.is_file():
            raise BundleError(
                f"{directory}: no ONNX graphs ({', '.join(missing) or 'onnx.json'} missing); "
                f"run `ocd export-onnx {directory}`"
            )
        self.info = json.loads(info_path.read_text())
        if self.info.get("weights_sha256") != weights_digest(directory):
            raise BundleError(
                f"{directory}: the ONNX graphs were exported from other weights; "
                f"run `ocd export-onnx {directory}` again"
            )
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = providers_for(device, device_required)
        self.sessions = {
            g: ort.InferenceSession(str(directory / f"{g}.onnx"), opts, providers=providers) for g in GRAPHS
        }
        self.inputs: dict[str, list[str]] = self.info.get("inputs", {})
        for g, sess in self.sessions.items():  # the exporter drops unused inputs; anything else is a mismatch
            extra = {i.name for i in sess.get_inputs()} - set(self.inputs.get(g, []))
            if extra:
                raise BundleError(
                    f"{directory / (g + '.onnx')}: inputs {sorted(extra)} not in onnx.json; "
                    f"run `ocd export-onnx {directory}` again"
                )
        self._have = {g: {i.name for i in sess.get_inputs()} for g, sess in self.sessions.items()}

    def run(self, graph: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run a graph on its inputs in the exported order (by name: inputs the graph dropped are skipped)."""
        names = self.inputs[graph]
        if len(names) != len(inputs):
            raise ValueError(f"{graph}: {len(inputs)} inputs for {names}")
        feed = {n: v.detach().cpu().numpy() for n, v in zip(names, inputs) if n in self._have[graph]}
        return [torch.from_numpy(np.asarray(o)) for o in self.sessions[graph].run(None, feed)]

    def upstream(self, x: torch.Tensor) -> Upstream:
        inp, act, out, base_out, *live = self.run("base", x.float())
        return Upstream(Latents(inp, act, out), base_out, tuple(live))

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return self.upstream(x).base_out  # the base graph also gives the latents: a few % more

    def context(self, lat: Latents) -> tuple[torch.Tensor, ...]:
        return tuple(self.run("cond", lat.inp, lat.act, lat.out))

    def scale(self, lat: Latents) -> torch.Tensor:
        return self.run("scale", lat.inp, lat.act, lat.out)[0]

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, ctx: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.run("denoiser_step", x_t, t, *ctx)[0]

    def factor_space(self, eta: float, steps: int) -> FactorSampler | None:
        return None  # the adapt graph takes dense deltas

    def adapt(self, live: tuple[torch.Tensor, ...], deltas: torch.Tensor | LowRankDelta) -> torch.Tensor:
        dense = deltas.dense() if isinstance(deltas, LowRankDelta) else deltas
        return self.run("adapt", dense, *live)[0]
