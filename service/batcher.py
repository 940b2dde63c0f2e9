"""Dynamic batching of requests whose weight deltas differ.

Requests queue per model; a batch closes at ``max_batch_size`` (or half the requests in flight,
when that pipelines inference with the event loop: ``Batcher._cap``), or ``max_wait_ms`` after its
first request, or as soon as it holds every inference request the app has in hand (``InFlight``:
a lone client does not wait for company that cannot come). The batcher hands it to the engine (in
the inference process, or on a thread; never on the event loop), which may hold a second batch
ready behind the one it runs (``BatchPolicy.pipeline_depth``): one base forward, one DDIM loop over all
members, one adapted forward. Requests with different ``ddim_steps`` run as separate groups of the
batch (the DDIM loop length differs); different ensemble sizes share one group (members are
ragged, not padded: no wasted work). A request whose client hung up or whose deadline passed is
dropped before it costs inference.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import metrics
from .batch_policy import BatchCost, BatchPolicy, CostFit
from .errors import ClientGone, DeadlineExceeded, QueueFull


@dataclass
class Job:
    x: torch.Tensor  # one sample in model space, (*input_shape)
    steps: int
    ensemble: int
    seed: int
    deadline: float  # time.monotonic()
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued: float = field(default_factory=time.monotonic)
    queue_s: float = 0.0
    batch_size: int = 0
    gone: Callable[[], bool] | None = None  # has the client hung up? (checked before running; must not block)
    share: float = 1.0  # this job's part of its request: 1/N for a request of N inputs


RunBatch = Callable[[list[Job]], Awaitable[tuple[list[Any], dict[str, float]]]]  # -> predictions, stage seconds


def disconnected(receive: Callable[[], Awaitable[dict]]) -> bool:
    """Whether the client of an ASGI request (its body already read) has hung up, without waiting:
    step ``receive()`` once; a message ready now is the answer, else the client is still there.

    (Starlette's ``Request.is_disconnected`` yields to the event loop once per call; a batch checks
    every job between taking it from the queue and running it, and must not yield there: the
    loop would first answer the previous batch and read the next requests, and inference would
    stop overlapping with them.)"""
    step = receive()
    try:
        step.send(None)
    except StopIteration as done:
        return done.value.get("type") == "http.disconnect"
    step.close()  # it would have waited: nothing has happened on the connection
    return False


class InFlight:
    """How many inference requests (POSTs) the app holds, from arrival to answer. A batch that
    holds them all has no one to wait for: the others can only come back once answered. Every
    departure wakes the batchers to check. Also the event loop's CPU time per request
    (``loop_s``), which decides whether batches pipeline (``Batcher._cap``)."""

    def __init__(self) -> None:
        self.n = 0
        self.arrivals = 0
        self.listeners: list[asyncio.Event] = []
        self.loop_s: float | None = None  # event-loop thread CPU seconds per request (moving average)
        self._mark: tuple[float, int] | None = None

    def arrive(self) -> None:
        self.n += 1
        self.arrivals += 1

    def measure(self) -> float | None:
        """Update and return ``loop_s``; call it on the event loop's thread."""
        now, count = time.thread_time(), self.arrivals
        if self._mark is None:
            self._mark = (now, count)
        elif count - self._mark[1] >= 16:
            per = (now - self._mark[0]) / (count - self._mark[1])
            self.loop_s = per if self.loop_s is None else 0.8 * self.loop_s + 0.2 * per
            self._mark = (now, count)
        return self.loop_s

    def leave(self) -> None:
        self.n -= 1
        for event in self.listeners:
            event.set()


class Batcher:
    """One per served model version."""

    def __init__(
        self,
        label: str,
        name: str,
        run_batch: RunBatch,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        inflight: InFlight | None = None,
        cost: BatchCost | None = None,
    ):
        """``label``: the model name for metrics (no per-version series); ``name``: name:version for logs;
        ``inflight``: without it a batch always waits up to ``max_wait_ms``; ``cost``: the engine's
        measured batch cost (without it batches never split to pipeline). The decisions are
        ``policy``'s (batch_policy.py)."""
        self.label, self.name, self.run_batch, self.inflight, self.cost = label, name, run_batch, inflight, cost
        self.fit = CostFit(cost) if cost is not None else None  # the cost, kept true to the live batches
        self.policy = BatchPolicy(max_batch_size, max_wait_ms / 1000)
        self.queue: asyncio.Queue[Job] = asyncio.Queue(max_queue)
        self.task: asyncio.Task | None = None
        self.busy = False  # collecting a batch
        self.running = 0  # batches handed to the engine and not answered yet (at most policy.pipeline_depth)
        self.long = 0  # how many of them are predicted to take policy.pipeline_horizon_s or more
        self.dispatched = 0.0  # the requests in them
        self.slot = asyncio.Event()  # a running batch was answered
        self.runs: set[asyncio.Task] = set()
        self.depth, self.waited = metrics.QUEUE_DEPTH.labels(label), metrics.QUEUE_DURATION.labels(label)
        self.wake = asyncio.Event()  # a job queued, or a request left the server
        if inflight is not None:
            inflight.listeners.append(self.wake)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(f"model {self.name}: queue full ({self.queue.maxsize} requests waiting)") from None
        self.wake.set()
        self.depth.set(self.queue.qsize())

    async def drain(self) -> None:
        """Wait until every queued request has been answered, then stop."""
        while not self.queue.empty() or self.busy or self.running:
            await asyncio.sleep(0.01)
        if self.task:
            self.task.cancel()

    def _cap(self) -> int:
        """The next batch's size limit (``BatchPolicy.cap``)."""
        if self.inflight is None:
            return self.policy.max_batch_size
        return self.policy.cap(self.inflight.n, self.inflight.measure(), self.cost)

    async def _collect(self) -> list[Job]:
        batch = [await self.queue.get()]
        self.busy = True  # from the first dequeue: drain() must wait for these jobs too
        loop, policy = asyncio.get_running_loop(), self.policy
        first = loop.time()
        cap = self._cap()
        while len(batch) < cap:  # take what is queued; then wait for more while the policy allows
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = policy.wait_left(loop.time() - first)
            if remaining <= 0:
                break
            if self._holds_all(batch):
                for _ in range(policy.yields):  # first let the loop take in requests already at the sockets
                    await asyncio.sleep(0)
                if self.queue.empty() and self._holds_all(batch):
                    break
                continue  # take what came, or wait for what is coming
            self.wake.clear()  # no await since the queue was found empty: nothing is missed
            try:
                await asyncio.wait_for(self.wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    def _holds_all(self, batch: list[Job]) -> bool:
        """``BatchPolicy.holds_all`` for ``batch`` (False without the app's in-flight count)."""
        shares = sum(j.share for j in batch)
        return self.inflight is not None and self.policy.holds_all(shares, self.dispatched, self.inflight.n)

    async def _free_slot(self) -> None:
        """Wait until the engine may take another batch (``BatchPolicy.engine_has_room``)."""
        while not self.policy.engine_has_room(self.running, self.long):
            self.slot.clear()
            await self.slot.wait()

    async def _loop(self) -> None:
        """Collect a batch whenever the engine has room for one (``policy.pipeline_depth``): the engine
        starts the next batch as it finishes one, while the event loop answers that one."""
        while True:
            await self._free_slot()
            batch = await self._collect()
            try:
                self.depth.set(self.queue.qsize())
                groups: dict[int, list[Job]] = defaultdict(list)
                for job in batch:
                    groups[job.steps].append(job)
                for group in groups.values():
                    await self._free_slot()
                    self._dispatch(group)
            except Exception as e:  # noqa: BLE001  never let one batch kill the model's batcher
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                self.busy = False

    def _dispatch(self, group: list[Job]) -> None:
        """Send a group to the engine, less the jobs whose client hung up or whose deadline passed
        (checked here, just before: a group may have waited for the engine behind another)."""
        now, live = time.monotonic(), []
        for job in group:
            if not job.future.done() and job.gone is not None and job.gone():
                job.future.set_exception(ClientGone())  # it costs no inference
            if job.future.done():
                continue
            if now > job.deadline:
                job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            job.queue_s = now - job.enqueued
            self.waited.observe(job.queue_s)
            live.append(job)
        if not (group := live):
            return
        long = self.policy.is_long(group, self.cost)
        self.running += 1
        self.long += long
        self.dispatched += sum(j.share for j in group)
        run = asyncio.get_running_loop().create_task(self._run(group, long))
        self.runs.add(run)  # (the loop keeps only a weak reference to a task)
        run.add_done_callback(self.runs.discard)

    async def _run(self, group: list[Job], long: bool) -> None:
        try:
            metrics.BATCH_SIZE.labels(self.label).observe(len(group))
            results, timings = await self.run_batch(group)
        except DeadlineExceeded as e:  # the engine stopped it: every request in it was answered 504 already
            metrics.ABANDONED.labels(self.label).inc()
            for job in group:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        except Exception as e:  # noqa: BLE001  a server-side failure: every request of the batch learns it
            for job in group:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        finally:
            self.running -= 1
            self.long -= long
            self.dispatched -= sum(j.share for j in group)
            self.slot.set()
        for stage, seconds in timings.items():
            metrics.INFERENCE.labels(self.label, stage).observe(seconds)
        if self.fit is not None:
            self.cost = self.fit.observe(group, sum(timings.values()))
        for job, result in zip(group, results):
            job.batch_size = len(group)
            if not job.future.done():
                job.future.set_result((result, timings))


async def infer(
    batcher: Batcher,
    xs: list[torch.Tensor],
    steps: int,
    ensemble: int,
    seeds: list[int],
    deadline: float,
    gone: Callable[[], bool] | None = None,
) -> list[tuple[Any, dict[str, float], Job]]:
    """One request of ``len(xs)`` samples: queue a job per sample, wait for all of them (or the
    deadline: DeadlineExceeded, or the client hanging up: ClientGone); -> (prediction, the batch's
    stage timings, job) per sample."""
    jobs = [Job(x, steps, ensemble, s, deadline, gone=gone, share=1 / len(xs)) for x, s in zip(xs, seeds)]
    try:
        for j in jobs:
            batcher.submit(j)
    except QueueFull:
        for j in jobs:
            j.future.cancel()
        raise
    loop = asyncio.get_running_loop()
    timer = loop.call_at(loop.time() + deadline - time.monotonic(), _expire, jobs)
    try:
        return [(*await j.future, j) for j in jobs]
    finally:
        timer.cancel()
        for j in jobs:
            if not j.future.done():
                j.future.cancel()  # after an error: the request's other jobs need not run
            elif not j.future.cancelled():
                j.future.exception()  # retrieved (else asyncio logs "exception was never retrieved")


def _expire(jobs: list[Job]) -> None:
    """The deadline passed: fail the jobs not done yet (the batcher drops them before they cost inference)."""
    for j in jobs:
        if not j.future.done():
            j.future.set_exception(DeadlineExceeded("no result in time"))
