"""ONNX Runtime backend (``OCD_BACKEND=onnx``): the bundle's exported graphs, the same sampler.

The networks run in ONNX Runtime (CPU execution provider, or CUDA with onnxruntime-gpu); the noise
is drawn per request exactly as the torch path draws it and the DDIM loop is the same
``NoiseSchedule.ddim_sample``, so for the same seeds both backends agree within float error
(tests/test_onnx.py checks 1e-4). Graphs come from ``ocd export-onnx <bundle dir>``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ocd_core.bundle import BundleError, weights_digest
from ocd_core.predictor import OCDModel, RaggedPrediction, SamplePrediction, draw_noise

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


class OnnxOCD:
    """``predict_ragged`` of an OCDModel, with every network in ONNX Runtime.

    ``model`` (the torch bundle, on the CPU) supplies the schedule, the head and the ensemble summary only."""

    def __init__(self, directory: str | Path, model: OCDModel, device: str = "cpu", threads: int = 0,
                 device_required: bool = True):
        import onnxruntime as ort

        directory = Path(directory)
        info_path = directory / "onnx.json"
        missing = [g for g in GRAPHS if not (directory / f"{g}.onnx").is_file()]
        if missing or not info_path.is_file():
            raise BundleError(f"{directory}: no ONNX graphs ({', '.join(missing) or 'onnx.json'} missing); "
                              f"run `ocd export-onnx {directory}`")
        self.info = json.loads(info_path.read_text())
        if self.info.get("weights_sha256") != weights_digest(directory):
            raise BundleError(f"{directory}: the ONNX graphs were exported from other weights; "
                              f"run `ocd export-onnx {directory}` again")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = providers_for(device, device_required)
        self.sessions = {g: ort.InferenceSession(str(directory / f"{g}.onnx"), opts, providers=providers)
                         for g in GRAPHS}
        self.inputs: dict[str, list[str]] = self.info.get("inputs", {})
        for g, sess in self.sessions.items():  # the exporter drops unused inputs; anything else is a mismatch
            extra = {i.name for i in sess.get_inputs()} - set(self.inputs.get(g, []))
            if extra:
                raise BundleError(f"{directory / (g + '.onnx')}: inputs {sorted(extra)} not in onnx.json; "
                                  f"run `ocd export-onnx {directory}` again")
        self.model, self.device = model, device
        self._lock = threading.Lock()

    def run(self, graph: str, *inputs: np.ndarray) -> list[np.ndarray]:
        """Run a graph on its inputs in the exported order (by name: inputs the graph dropped are skipped)."""
        names = self.inputs[graph]
        if len(names) != len(inputs):
            raise ValueError(f"{graph}: {len(inputs)} inputs for {names}")
        sess = self.sessions[graph]
        have = {i.name for i in sess.get_inputs()}
        return sess.run(None, {n: v for n, v in zip(names, inputs) if n in have})

    def _run(self, x: torch.Tensor, steps: int, counts: list[int], eta: float,
             seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        m = self.model
        reps = np.asarray(counts)
        t0 = time.perf_counter()
        inp, act, out, base_out, *live = self.run("base", x.detach().cpu().numpy().astype(np.float32, copy=False))
        t1 = time.perf_counter()
        ctx = [np.repeat(c, reps, 0) for c in self.run("cond", inp, act, out)]
        rho = np.repeat(self.run("scale", inp, act, out)[0], reps, 0)
        x_T, step_noise = draw_noise(seeds, counts, m.delta_shape, steps, eta, "cpu")

        def step(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(self.run("denoiser_step", x_t.numpy(), t.numpy(), *ctx)[0])

        unit = m.schedule.ddim_sample(step, x_T, steps, eta, step_noise, m.prediction)
        deltas = (unit * torch.from_numpy(rho).view(-1, *([1] * (unit.ndim - 1)))).numpy()
        t2 = time.perf_counter()
        adapted = self.run("adapt", deltas, *(np.repeat(v, reps, 0) for v in live))[0]
        t3 = time.perf_counter()
        return (m.head(torch.from_numpy(adapted)), m.head(torch.from_numpy(base_out)),
                {"base": t1 - t0, "ddim": t2 - t1, "adapt": t3 - t2})

    def predict_ragged(self, x: torch.Tensor, steps: int, ensembles: Sequence[int], seeds: Sequence[int],
                       eta: float = 0.0) -> tuple[list[SamplePrediction], dict[str, float]]:
        """Same contract as ``OCDModel.predict_ragged``: x (B, *input), one seed and ensemble size per sample."""
        pred, timings = self.predict_batched(x, steps, ensembles, seeds, eta)
        return pred.split(), timings

    @torch.no_grad()
    def predict_batched(self, x: torch.Tensor, steps: int, ensembles: Sequence[int], seeds: Sequence[int],
                        eta: float = 0.0) -> tuple[RaggedPrediction, dict[str, float]]:
        """Same contract as ``OCDModel.predict_batched``."""
        if len(seeds) != x.shape[0] or len(ensembles) != x.shape[0]:
            raise ValueError(f"{len(seeds)} seeds and {len(ensembles)} ensemble sizes for {x.shape[0]} inputs")
        with self._lock:
            out, base, timings = self._run(x, steps, list(ensembles), eta, seeds)
        return self.model.summarise_ragged(out, base, ensembles), timings
