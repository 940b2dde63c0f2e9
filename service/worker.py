"""Engines: a batch of jobs -> predictions, in this process or in an inference process.

In the server process the event loop parses requests while inference runs on a thread; both need
the GIL for their Python work, so under load each slows the other (batched throughput at c=64:
1,757 req/s with inference on a thread). ``InferenceProcess`` runs every model's engine in one
spawned process instead, a thread and a pipe per model: the server process then only pickles a
batch's inputs (B x input floats) and its predictions, on the event loop itself (a batch thread
would wait for the busy loop's GIL at each hand-off). ``OCD_INFERENCE_PROCESS=false`` keeps
inference on a thread of the server process (``LocalEngine``).

If the inference process dies (killed, out of memory), the batches sent to it fail with a 500, a
new one starts at once, and batches that come meanwhile wait for it. One that hangs (no answer to a
batch ``OCD_WATCHDOG_S`` after the batch's deadline; a healthy one stops a batch at its deadline)
is killed, and the same follows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import struct
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import torch

from ocd_core.bundle import BundleError, load_bundle
from ocd_core.memory import peak_bytes
from ocd_core.predictor import BatchPrediction, Expired, Predictor, SamplePrediction

from .batch_policy import BatchCost
from .batcher import Job
from .errors import DeadlineExceeded
from .gcfreeze import freeze_heap
from .settings import Settings

log = logging.getLogger("ocd.service")


class Engine:
    """Runs a batch of jobs through a predictor (torch, or ONNX Runtime for ``OCD_BACKEND=onnx``)."""

    def __init__(self, predictor: Predictor):
        self.predictor, self.device = predictor, predictor.runtime.device
        self.cost: BatchCost | None = None  # set by calibrate() and fit_memory()

    def __call__(self, jobs: list[Job]) -> tuple[list[SamplePrediction], dict[str, float]]:
        x = torch.stack([j.x for j in jobs])
        try:
            pred, timings = self.run(
                x, jobs[0].steps, [j.ensemble for j in jobs], [j.seed for j in jobs], max(j.deadline for j in jobs)
            )
        except Expired as e:
            raise DeadlineExceeded(str(e)) from None
        return pred.split(), timings

    def run(
        self, x: torch.Tensor, steps: int, ensembles: list[int], seeds: list[int], deadline: float | None = None
    ) -> tuple[BatchPrediction, dict[str, float]]:
        """x (B, *input) on the CPU -> the batch's predictions on the CPU, and its seconds per stage;
        past ``deadline`` (``time.monotonic()``, the latest of the batch's requests) the work stops
        between stages and ensemble chunks (``Expired``): nobody waits for it any more."""
        pred = self.predictor.predict(x.to(self.device), steps, ensembles, seeds=seeds, deadline=deadline)
        return pred.to("cpu"), pred.timings

    def fit_memory(self, input_shape: list[int], steps: int, budget_bytes: int) -> int | None:
        """Measure the memory of one sample with one member at ``steps`` (``ocd_core.memory``; run after
        the warm-up) -> how many samples, or ensemble members, fit ``budget_bytes`` at once (at least 1;
        None where it cannot be measured). The predictor runs larger ensembles in chunks of that many
        members, and ``cost.max_rows`` caps the batches."""
        x = torch.zeros(1, *input_shape)
        per_row = peak_bytes(lambda: self.run(x, steps, [1], [0]), self.device)
        rows = None if per_row is None else max(1, budget_bytes // max(per_row, 1))
        self.predictor.max_rows = rows
        if self.cost is not None:
            self.cost = dataclasses.replace(self.cost, row_bytes=per_row, max_rows=rows)
        return rows

    def calibrate(
        self, input_shape: list[int], steps: int, size: int = 8, repeats: int = 3, budget_s: float = 2.0
    ) -> BatchCost:
        """Warm the engine up (first calls allocate and select kernels) and measure its batch cost,
        at ``steps`` DDIM steps and in the base mode (steps 0), from the best of ``repeats`` batches
        of 1 and of ``size`` zero inputs (B, *input_shape), timed by the engine's own stage timings.
        A model whose second batch of one says the calibration would take over ``budget_s`` (the NeRF
        bundle renders a whole image per sample: 1.7 s on the CPU) gets that batch's time as its
        fixed cost, an upper bound; one whose warm-up alone took longer than ``budget_s`` gets the
        warm-up's time."""
        x = torch.zeros(size, *input_shape)

        def measure(steps: int) -> BatchCost:
            def seconds(k: int) -> float:
                return sum(self.run(x[:k], steps, [1] * k, list(range(k)))[1].values())

            warm = seconds(1)  # (on a GPU: context, allocator, kernel selection; not what a batch costs)
            one = warm if warm > budget_s else seconds(1)
            if one * repeats * (1 + size) > budget_s:
                return BatchCost(fixed=one, per_sample=0.0, steps=steps)
            one, many = (min(seconds(k) for _ in range(repeats)) for k in (1, size))
            per_sample = max(0.0, (many - one) / (size - 1))
            return BatchCost(fixed=max(0.0, one - per_sample), per_sample=per_sample, steps=steps)

        adapted = measure(steps)
        self.cost = BatchCost(adapted.fixed, adapted.per_sample, steps, base=measure(0))
        return self.cost


def build_engine(path: Path, settings: Settings) -> Engine:
    """The engine for one bundle directory, on the settings' device and backend, warmed up and
    calibrated (``Engine.calibrate``) at the model's default DDIM steps."""
    device = settings.resolved_device()
    if settings.backend == "onnx":  # the same predictor; ONNX Runtime runs the networks
        from ocd_core.onnx_runtime import OnnxRuntime

        model, manifest = load_bundle(path, "cpu", settings.allowed_modules())
        runtime = OnnxRuntime(path, device, settings.threads, device_required=settings.device != "auto")
        engine = Engine(model.predictor(runtime))
    else:
        model, manifest = load_bundle(path, device, settings.allowed_modules())
        engine = Engine(model.predictor())
    engine.calibrate(manifest.input.shape, manifest.serving.ddim_steps)
    engine.fit_memory(manifest.input.shape, manifest.serving.ddim_steps, settings.batch_memory_mb << 20)
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
    """One model's loop in the inference process: (seq, x, steps, ensembles, seeds, deadline) ->
    (seq, "ok", packed, timings), (seq, "expired", message, "") or (seq, "error", message, traceback)."""
    while True:
        try:
            seq, x, steps, ensembles, seeds, deadline = conn.recv()
        except (EOFError, OSError):  # the server process closed the pipe or is gone
            return
        except Exception:  # noqa: BLE001  an unreadable message: the pipe is out of step; end the process
            traceback.print_exc()  # (the server sees EOF and starts a new one)
            os._exit(70)
        try:
            pred, timings = engine.run(torch.from_numpy(x), steps, ensembles, seeds, deadline)
            reply: tuple = (seq, "ok", pack(pred), timings)
        except Expired as e:
            reply = (seq, "expired", str(e), "")
        except Exception as e:  # noqa: BLE001  (reported to the server process: a 500 for this batch)
            reply = (seq, "error", f"{type(e).__name__}: {e}", traceback.format_exc())
        conn.send(reply)


def pack(pred: BatchPrediction) -> tuple[np.ndarray, ...]:
    """A batch's predictions as four arrays (members, mean, uncertainty, base): four arrays pickle in a
    few µs, 4 x B tensors took ~1 ms at B = 32."""
    return tuple(t.numpy() for t in (pred.members, pred.mean, pred.uncertainty, pred.base))


def unpack(arrays: tuple[np.ndarray, ...], ensembles: list[int]) -> list[SamplePrediction]:
    """``pack``'s inverse: one SamplePrediction per row, its tensors views of the four arrays."""
    return BatchPrediction(*(torch.from_numpy(a) for a in arrays), list(ensembles)).split()


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
    freeze_heap()
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Channel:
    """The server process's end of one model's pipe, driven by the event loop. ``request`` queues a
    batch without blocking (what the socket does not take now is written when it can: the process
    may still be running the batch before) and the reply comes back to the request's future by its
    sequence number. Framed as ``multiprocessing.Connection`` frames (a 4-byte length, then the
    pickle), so the inference process's side is a plain Connection."""

    def __init__(self, conn: Connection):
        self.conn, self.fd = conn, conn.fileno()
        os.set_blocking(self.fd, False)
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop it is attached to, at the first request
        self.out, self.inbox = bytearray(), bytearray()
        self.waiting: dict[int, asyncio.Future] = {}
        self.broken: BaseException | None = None

    def request(self, seq: int, message: tuple) -> asyncio.Future:
        """Send ``message`` (its first item ``seq``) -> the future of the reply's other items."""
        if self.broken is not None:
            raise EOFError(f"the inference process's pipe is closed: {self.broken}")
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.loop.add_reader(self.fd, self._read)
        data = ForkingPickler.dumps(message)
        if len(data) > 0x7FFFFFFF:
            raise ValueError(f"a batch of {len(data)} bytes is over the pipe's 2 GiB frame")
        self.out += struct.pack("!i", len(data))
        self.out += data
        future = self.waiting[seq] = self.loop.create_future()
        self._write()
        if self.broken is not None:  # the write found the pipe closed: the batch was never delivered
            self.waiting.pop(seq, None)
            if future.done():
                future.exception()  # (retrieved)
            raise EOFError(f"the inference process's pipe is closed: {self.broken}")
        return future

    def _write(self) -> None:
        try:
            sent = os.write(self.fd, self.out)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            return self._fail(e)
        del self.out[:sent]
        if self.out:
            self.loop.add_writer(self.fd, self._write)
        else:
            self.loop.remove_writer(self.fd)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError as e:
            return self._fail(e)
        if not data:
            return self._fail(EOFError("the inference process closed its pipe"))
        self.inbox += data
        try:
            while len(self.inbox) >= 4:
                (size,) = struct.unpack_from("!i", self.inbox)
                if size < 0:
                    raise ValueError("a reply frame over 2 GiB")
                if len(self.inbox) < 4 + size:
                    break
                reply = pickle.loads(self.inbox[4 : 4 + size])
                del self.inbox[: 4 + size]
                future = self.waiting.pop(reply[0], None)
                if future is not None and not future.done():  # (cancelled: its caller went away)
                    future.set_result(reply[1:])
        except Exception as e:  # noqa: BLE001  the pipe is out of step: fail its calls (the process restarts)
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        """The pipe broke (the process died, or close()): every waiting request learns it (EOFError)."""
        if self.broken is None:
            self.broken = error
            if self.loop is not None:
                self.loop.remove_reader(self.fd)
                self.loop.remove_writer(self.fd)
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(EOFError(f"the inference process's pipe broke: {error}"))
        self.waiting.clear()

    def close(self) -> None:
        """Detach from the event loop (call it on the loop's thread) and close the pipe: the process's
        thread for this model reads EOF and ends."""
        self._fail(EOFError("closed by the server"))
        self.conn.close()


class InferenceProcess:
    """Every model's engine in one spawned process; ``engine(label)`` is the server process's side."""

    def __init__(self, models: list[tuple[str, Path]], settings: Settings):
        self.models, self.settings = models, settings
        self.restarting: asyncio.Lock | None = None  # created on the event loop, at the first restart
        self.restarts: set[asyncio.Task] = set()
        self.generation = 0
        self.seq = 0  # numbers the batches sent
        self.process: mp.process.BaseProcess | None = None
        self.channels: dict[str, Channel] = {}
        self.costs: dict[str, BatchCost] = {}  # each engine's calibration, sent with "ready"
        self.stopped = False  # detached: its models were unloaded
        self.start()

    def start(self) -> None:
        """Spawn the process and wait until every model loaded (a load error is a ``BundleError``)."""
        ctx = mp.get_context("spawn")  # no fork of the server's threads; CUDA initialises in the child
        pipes = {label: ctx.Pipe() for label, _ in self.models}
        self.process = ctx.Process(
            target=_main,
            name="ocd-inference",
            daemon=True,
            args=([(label, str(path), pipes[label][1]) for label, path in self.models], self.settings),
        )
        self.process.start()
        for _, child in pipes.values():
            child.close()
        for label, (conn, _) in pipes.items():
            try:
                status, message, _ = conn.recv()
            except EOFError:
                status, message = "error", f"the inference process exited (code {self.process.exitcode})"
            if status != "ready":
                for parent, _ in pipes.values():
                    parent.close()
                self._join()
                raise BundleError(f"{label}: {message}")
            self.costs[label] = message
        self.channels = {label: Channel(conn) for label, (conn, _) in pipes.items()}
        self.generation += 1  # (after the channels: a call that reads the new generation gets the new pipes)
        log.info("inference process %d serves %s", self.process.pid, ", ".join(self.channels))

    def stop(self) -> None:
        """Close the pipes (on the event loop's thread, if it used them) and end the process."""
        self.detach()
        self._join()

    def detach(self) -> None:
        """Close the pipes (on the event loop's thread): the process's threads read EOF and it exits;
        no batch is sent to it, or restarts it, any more."""
        self.stopped = True
        for channel in self.channels.values():
            channel.close()

    def join(self) -> None:
        """Wait for the process to exit (blocking; after ``detach``)."""
        self._join()

    def _join(self) -> None:
        if self.process is not None:
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()

    def engine(self, label: str) -> RemoteEngine:
        return RemoteEngine(self, label)

    async def call(
        self, label: str, x: np.ndarray, steps: int, ensembles: list[int], seeds: list[int], deadline: float
    ) -> tuple:
        """One batch through the process, from the event loop -> ("ok", packed, timings), ("expired",
        message, "") or ("error", message, traceback). A model's batches run there in the order sent,
        one at a time. A batch that was sent when the process died fails (a 500) while a new process
        starts in the background; one whose pipe had already broken waits for the new process and runs there."""
        for attempt in range(2):
            generation = self.generation
            self.seq += 1
            try:
                reply = self.channels[label].request(self.seq, (self.seq, x, steps, ensembles, seeds, deadline))
            except EOFError:  # not sent: the process died before, or is being replaced
                if attempt or self.stopped:
                    raise RuntimeError("the inference process is not running") from None
                await self.restart(generation)
                continue
            hung = max(0.0, deadline - time.monotonic()) + self.settings.watchdog_s
            try:
                return await asyncio.wait_for(reply, hung)
            except (EOFError, OSError, asyncio.TimeoutError) as e:
                if isinstance(e, asyncio.TimeoutError) and generation == self.generation:
                    log.error(
                        "%s: the inference process (pid %s) gave no answer %g s after a batch's deadline "
                        "(OCD_WATCHDOG_S): it hangs; killing it",
                        label, self.process.pid, self.settings.watchdog_s,
                    )  # fmt: skip
                    self.process.kill()  # (its pipes then report EOF; the restart below replaces it)
                restart = asyncio.get_running_loop().create_task(self.restart(generation))
                self.restarts.add(restart)  # (a strong reference until it is done)
                restart.add_done_callback(self._restarted)
                what = "hung" if isinstance(e, asyncio.TimeoutError) else "exited"
                raise RuntimeError(
                    f"the inference process {what} during this batch; a new one serves the next"
                ) from None
        raise AssertionError("unreachable")

    def _restarted(self, task: asyncio.Task) -> None:
        self.restarts.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the next batch tries again
            log.error("the new inference process did not start: %s", task.exception())

    async def restart(self, generation: int) -> None:
        """Start a new process (off the event loop) unless another batch already did since ``generation``."""
        if self.restarting is None:
            self.restarting = asyncio.Lock()
        async with self.restarting:
            if generation != self.generation:
                return
            for channel in self.channels.values():
                channel.close()
            await asyncio.get_running_loop().run_in_executor(None, self.stop_and_start)

    def stop_and_start(self) -> None:
        self._join()  # (first: its pipe can report EOF a moment before the process can be reaped)
        log.error("inference process exited (code %s); starting a new one", self.process.exitcode)
        self.start()


class RemoteEngine:
    """The ``Engine`` interface for a model served by the inference process."""

    def __init__(self, process: InferenceProcess, label: str):
        self.process, self.label = process, label
        self.cost = process.costs[label]

    async def __call__(self, jobs: list[Job]) -> tuple[list[SamplePrediction], dict[str, float]]:
        ensembles = [j.ensemble for j in jobs]
        x = torch.stack([j.x for j in jobs]).numpy()
        deadline = max(j.deadline for j in jobs)
        reply = await self.process.call(self.label, x, jobs[0].steps, ensembles, [j.seed for j in jobs], deadline)
        if reply[0] == "expired":
            raise DeadlineExceeded(reply[1])
        if reply[0] != "ok":
            log.error("inference failed in the inference process:\n%s", reply[2])
            raise RuntimeError(reply[1])
        return unpack(reply[1], ensembles), reply[2]
