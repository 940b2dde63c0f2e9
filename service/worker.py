"""Engines: a batch of jobs -> predictions, in this process or in an inference process.

In the server process the event loop parses requests while inference runs on a thread; both need
the GIL for their Python work, so under load each slows the other (batched throughput at c=64:
1,757 req/s with inference on a thread). ``InferenceProcess`` runs every model's engine in one
spawned process instead, a thread and a pipe per model: the server process then only pickles a
batch's inputs (B x input floats) and its predictions, on the event loop itself (a batch thread
would wait for the busy loop's GIL at each hand-off). ``OCD_INFERENCE_PROCESS=false`` keeps
inference on a thread of the server process (``LocalEngine``).

If the inference process dies (killed, out of memory), the batch in flight fails with a 500 and
the next batch starts a new one.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ocd_core.bundle import BundleError, load_bundle
from ocd_core.predictor import SamplePrediction

from .batcher import BatchCost, Job
from .settings import Settings

log = logging.getLogger("ocd.service")


class Engine:
    """Runs a batch of jobs through a predictor (an OCDModel, or OnnxOCD for ``OCD_BACKEND=onnx``)."""

    def __init__(self, model, device: str):
        self.model, self.device = model, torch.device(device)
        self.cost: BatchCost | None = None  # set by calibrate()

    def __call__(self, jobs: list[Job]) -> tuple[list[SamplePrediction], dict[str, float]]:
        x = torch.stack([j.x for j in jobs])
        return self.run(x, jobs[0].steps, [j.ensemble for j in jobs], [j.seed for j in jobs])

    def run(self, x: torch.Tensor, steps: int, ensembles: list[int], seeds: list[int]
            ) -> tuple[list[SamplePrediction], dict[str, float]]:
        """x (B, *input) on the CPU -> one CPU prediction per row, and the batch's seconds per stage."""
        preds, timings = self.model.predict_ragged(x.to(self.device), steps, ensembles, seeds)
        cpu = [SamplePrediction(*(t.cpu() for t in (p.members, p.mean, p.uncertainty, p.base))) for p in preds]
        return cpu, timings

    def calibrate(self, input_shape: list[int], steps: int, size: int = 8, repeats: int = 3,
                  budget_s: float = 2.0) -> BatchCost:
        """Warm the engine up (first calls allocate and select kernels) and measure its batch cost
        from the best of ``repeats`` batches of 1 and of ``size`` zero inputs (B, *input_shape),
        timed by the engine's own stage timings. A model whose warm-up batch of one says the
        calibration would take over ``budget_s`` (the NeRF bundle renders a whole image per sample:
        2.7 s on the CPU) gets the warm-up's time as its fixed cost, an upper bound."""
        x = torch.zeros(size, *input_shape)

        def seconds(k: int) -> float:
            return sum(self.run(x[:k], steps, [1] * k, list(range(k)))[1].values())

        first = seconds(1)
        if first * repeats * (1 + size) > budget_s:
            self.cost = BatchCost(fixed=first, per_sample=0.0)
            return self.cost
        one, many = (min(seconds(k) for _ in range(repeats)) for k in (1, size))
        per_sample = max(0.0, (many - one) / (size - 1))
        self.cost = BatchCost(fixed=max(0.0, one - per_sample), per_sample=per_sample)
        return self.cost


def build_engine(path: Path, settings: Settings) -> Engine:
    """The engine for one bundle directory, on the settings' device and backend, warmed up and
    calibrated (``Engine.calibrate``) at the model's default DDIM steps."""
    device = settings.resolved_device()
    if settings.backend == "onnx":  # the torch bundle on the CPU keeps the schedule; ORT runs the networks
        from .onnx_engine import OnnxOCD

        model, manifest = load_bundle(path, "cpu")
        engine = Engine(OnnxOCD(path, model, device, settings.threads, device_required=settings.device != "auto"), "cpu")
    else:
        model, manifest = load_bundle(path, device)
        engine = Engine(model, device)
    engine.calibrate(manifest.input.shape, manifest.serving.ddim_steps)
    return engine


# ---- the inference process -------------------------------------------------------------------
class LocalEngine:
    """An ``Engine`` on a thread of the server process (``OCD_INFERENCE_PROCESS=false``), awaitable
    by the batcher."""

    def __init__(self, engine: Engine, label: str):
        self.engine, self.cost = engine, engine.cost
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{label}")

    async def __call__(self, jobs: list[Job]) -> tuple[list[SamplePrediction], dict[str, float]]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.engine, jobs)

    def close(self) -> None:
        self.executor.shutdown(wait=False)


def _serve_model(engine: Engine, conn: Connection) -> None:
    """One model's loop in the inference process:
    (seq, x, steps, ensembles, seeds) -> (seq, "ok", packed, timings) or (seq, "error", message, traceback)."""
    while True:
        try:
            seq, x, steps, ensembles, seeds = conn.recv()
        except (EOFError, OSError):  # the server process closed the pipe or is gone
            return
        try:
            preds, timings = engine.run(torch.from_numpy(x), steps, ensembles, seeds)
            reply: tuple = (seq, "ok", pack(preds), timings)
        except Exception as e:  # noqa: BLE001  (reported to the server process: a 500 for this batch)
            reply = (seq, "error", f"{type(e).__name__}: {e}", traceback.format_exc())
        conn.send(reply)


def pack(preds: list[SamplePrediction]) -> tuple[np.ndarray, ...]:
    """A batch's predictions as four arrays (members of all rows concatenated, then mean, uncertainty,
    base stacked): four arrays pickle in a few µs, 4 x B of them took ~1 ms at B = 32."""
    return (np.concatenate([p.members.numpy() for p in preds]), *(np.stack([getattr(p, f).numpy() for p in preds])
                                                                    for f in ("mean", "uncertainty", "base")))


def unpack(arrays: tuple[np.ndarray, ...], ensembles: list[int]) -> list[SamplePrediction]:
    """``pack``'s inverse: one SamplePrediction per row, its tensors views of the four arrays."""
    members, mean, unc, base = (torch.from_numpy(a) for a in arrays)
    return [SamplePrediction(m, mean[i], unc[i], base[i]) for i, m in enumerate(members.split(ensembles))]


def _main(models: list[tuple[str, str, Connection]], settings: Settings) -> None:
    """The inference process: load every model, answer "ready" (or the load error) on its pipe,
    then serve each model on its own thread."""
    from .malloc import tune_malloc

    if settings.tune_malloc:
        tune_malloc()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    threads = []
    for label, path, conn in models:
        try:
            engine = build_engine(Path(path), settings)
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
            continue
        conn.send(("ready", engine.cost, None))
        threads.append(threading.Thread(target=_serve_model, args=(engine, conn), name=f"infer-{label}"))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until ``fd`` has data (or EOF) to read, without blocking the event loop."""
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class InferenceProcess:
    """Every model's engine in one spawned process; ``engine(label)`` is the server process's side."""

    def __init__(self, models: list[tuple[str, Path]], settings: Settings):
        self.models, self.settings = models, settings
        self.lock = threading.Lock()
        self.generation = 0
        self.seq = 0  # numbers the batches sent
        self.process: mp.process.BaseProcess | None = None
        self.conns: dict[str, Connection] = {}
        self.costs: dict[str, BatchCost] = {}  # each engine's calibration, sent with "ready"
        self.start()

    def start(self) -> None:
        """Spawn the process and wait until every model loaded (a load error is a ``BundleError``)."""
        ctx = mp.get_context("spawn")  # no fork of the server's threads; CUDA initialises in the child
        pipes = {label: ctx.Pipe() for label, _ in self.models}
        self.process = ctx.Process(target=_main, name="ocd-inference", daemon=True,
                                   args=([(label, str(path), pipes[label][1]) for label, path in self.models],
                                         self.settings))
        self.process.start()
        for _, child in pipes.values():
            child.close()
        self.conns = {label: parent for label, (parent, _) in pipes.items()}
        self.generation += 1
        for label, conn in self.conns.items():
            try:
                status, message, _ = conn.recv()
            except EOFError:
                status, message = "error", f"the inference process exited (code {self.process.exitcode})"
            if status != "ready":
                self.stop()
                raise BundleError(f"{label}: {message}")
            self.costs[label] = message
        log.info("inference process %d serves %s", self.process.pid, ", ".join(self.conns))

    def stop(self) -> None:
        for conn in self.conns.values():
            conn.close()  # its threads read EOF and the process exits
        if self.process is not None:
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()

    def engine(self, label: str) -> RemoteEngine:
        return RemoteEngine(self, label)

    async def call(self, label: str, x: np.ndarray, steps: int, ensembles: list[int], seeds: list[int]) -> tuple:
        """One batch through the process, from the event loop (the model's batcher: one call per model
        at a time) -> ("ok", packed, timings) or ("error", message, traceback). The batch goes out at
        once (the model's thread there waits in ``recv``), the reply is read when the pipe turns
        readable; a reply to an earlier, cancelled call is dropped by its sequence number."""
        generation, conn = self.generation, self.conns[label]
        self.seq += 1
        seq, loop = self.seq, asyncio.get_running_loop()
        try:
            conn.send((seq, x, steps, ensembles, seeds))
            while True:
                await readable(loop, conn.fileno())
                reply = conn.recv()  # written in one piece by the process: the rest follows at once
                if reply[0] == seq:
                    return reply[1:]
        except (EOFError, OSError):
            await loop.run_in_executor(None, self.restart, generation)
            raise RuntimeError("the inference process exited during this batch; a new one serves the next") from None

    def restart(self, generation: int) -> None:
        """Start a new process unless another model's thread already did since ``generation``."""
        with self.lock:
            if generation != self.generation:
                return
            code = self.process.exitcode if self.process is not None else None
            log.error("inference process exited (code %s); starting a new one", code)
            self.stop()
            self.start()


class RemoteEngine:
    """The ``Engine`` interface for a model served by the inference process."""

    def __init__(self, process: InferenceProcess, label: str):
        self.process, self.label = process, label
        self.cost = process.costs[label]

    async def __call__(self, jobs: list[Job]) -> tuple[list[SamplePrediction], dict[str, float]]:
        ensembles = [j.ensemble for j in jobs]
        x = torch.stack([j.x for j in jobs]).numpy()
        reply = await self.process.call(self.label, x, jobs[0].steps, ensembles, [j.seed for j in jobs])
        if reply[0] != "ok":
            log.error("inference failed in the inference process:\n%s", reply[2])
            raise RuntimeError(reply[1])
        return unpack(reply[1], ensembles), reply[2]
