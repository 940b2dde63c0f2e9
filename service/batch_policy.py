"""Batching policy: when a batch closes, how large it may grow, and when the engine takes another.

Pure decisions on numbers (no queue, no clock, no event loop), unit-tested in tests/test_batching.py;
the mechanism that applies them (queue, futures, the engine's pipe) is ``batcher.Batcher``. Every
tuning constant of the batching lives here, with why it has its value; the operator's knobs
(``max_batch_size``, ``max_wait_ms``, ``max_queue``) are ``Settings``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Member(Protocol):
    """What the policy reads of a queued job."""

    steps: int  # DDIM steps
    ensemble: int  # members sampled for it
    share: float  # its part of its request: 1/N for a request of N samples


@dataclass(frozen=True)
class BatchCost:
    """An engine's seconds for a batch of k members at ``steps`` DDIM steps: ``fixed + per_sample * k``,
    measured when the engine loads (``worker.Engine.calibrate``); ``row_bytes``, the memory of one
    sample with one member, and ``max_rows``, the samples (or members) that fit the engine's memory
    budget at once (``worker.Engine.fit_memory``; None: not measured, no limit)."""

    fixed: float
    per_sample: float
    steps: int = 1
    base: BatchCost | None = None  # the base mode's (steps 0: the base model alone), when measured
    row_bytes: int | None = None
    max_rows: int | None = None

    def predict(self, jobs: Sequence[Member]) -> float:
        """Roughly the seconds for these jobs (one ``steps`` value): members cost per_sample each,
        and DDIM steps beyond the calibration's scale the whole batch (an upper bound). Base-mode
        jobs (steps 0) cost the base mode's calibration, or the adapted one's as an upper bound."""
        if jobs[0].steps == 0 and self.base is not None:
            return self.base.fixed + self.base.per_sample * len(jobs)
        members = sum(j.ensemble for j in jobs)
        return (self.fixed + self.per_sample * members) * max(1.0, jobs[0].steps / max(self.steps, 1))


@dataclass(frozen=True)
class BatchPolicy:
    """``max_batch_size`` requests per batch (1: batching off); a batch waits at most ``max_wait_s``
    after its first request for more."""

    max_batch_size: int
    max_wait_s: float
    # batches of one model at its engine at once: the next one waits there, ready to run ...
    pipeline_depth: int = 2
    # ... but only behind a batch predicted to take less than this: a batch is committed when sent,
    # and a client that hangs up while its batch waits behind a long one would still cost inference
    pipeline_horizon_s: float = 0.05
    # event-loop turns from a socket's data to the middleware that counts its request: a batch that
    # seems to hold every request first lets the loop take in those already at the sockets
    yields: int = 3

    def cap(self, in_flight: int, loop_s: float | None, cost: BatchCost | None) -> int:
        """Most jobs for the next batch: ``max_batch_size``, or half the requests in the server when
        pipelining pays. While a batch runs, the event loop can only answer the batch before and
        read what its clients send next: a batch of everyone in flight leaves the loop idle during
        inference, and inference idle while the loop works. Two halves overlap the two. With n
        requests in flight, P loop seconds per request (``loop_s``) and inference a + b*k for k
        requests (``cost``), one batch cycles in P*n + a + b*n and two halves in max(2a + b*n, P*n):
        halves win when a < P*n. Never more samples than fit the engine's memory (``cost.max_rows``)."""
        cap = self.max_batch_size
        if cost is not None and cost.max_rows is not None:
            cap = min(cap, cost.max_rows)
        if cost is None or cap == 1 or loop_s is None:
            return cap
        if cost.fixed < loop_s * in_flight:
            cap = min(cap, max(1, math.ceil(in_flight / 2)))
        return cap

    @staticmethod
    def holds_all(batch_shares: float, dispatched: float, in_flight: int) -> bool:
        """Whether the batch being collected (its requests' shares) and the batches at the engine
        (``dispatched``) hold every inference request in the server: none other can arrive before
        one of them is answered, so the batch closes without waiting out ``max_wait_s``."""
        return in_flight <= batch_shares + dispatched + 1e-6

    def wait_left(self, waited_s: float) -> float:
        """Seconds a batch may still wait for more requests, ``waited_s`` after its first (<= 0: it
        closes with what is queued; up to ``cap`` it always takes what is queued, even with no wait)."""
        return self.max_wait_s - waited_s

    def is_long(self, group: Sequence[Member], cost: BatchCost | None) -> bool:
        """Whether a group is predicted to take ``pipeline_horizon_s`` or more (unknown cost: long)."""
        return cost is None or cost.predict(group) >= self.pipeline_horizon_s

    def engine_has_room(self, running: int, long_running: int) -> bool:
        """Whether the engine may take another batch: none running, or fewer than ``pipeline_depth``
        and all of them quick (without the wait behind a quick one the engine would idle between
        batches while the event loop is busy)."""
        return running == 0 or (running < self.pipeline_depth and long_running == 0)


class CostFit:
    """Keeps a ``BatchCost`` true to the live batches: the calibration at load reads the machine's load
    at that moment (a busy host made mnist:2 measure 0 ms + k x 65.9 ms, against 2.01 ms + k x 0.144 ms
    idle) and was never measured again. Each answered batch at the calibration's steps (or in the base
    mode) adds (members, seconds) to an exponentially weighted least-squares fit of ``fixed +
    per_sample * k``. The calibration enters as two points (k = 1 and k = ``size``) that fade faster
    than live batches (gone after ~20). Batches that all have the same size cannot tell the fixed cost
    from the per-sample one: then the slope stays and the fixed part follows their mean."""

    decay = 0.97  # per batch: the last ~30 batches carry most of the weight
    prior_decay = 0.7  # per batch, for the calibration's two points
    spread = 0.05  # the relative spread of batch sizes below which the slope is not re-fitted

    def __init__(self, cost: BatchCost, size: int = 8):
        self.cost = cost
        self.live = {key: [0.0] * 5 for key in ("adapted", "base")}  # W, Σx, Σy, Σxx, Σxy
        self.prior = {key: [0.0] * 5 for key in ("adapted", "base")}
        for key, c in (("adapted", cost), ("base", cost.base)):
            for k in (1, size) if c is not None else ():
                self.prior[key] = [a + b for a, b in zip(self.prior[key], _point(k, c.fixed + c.per_sample * k))]

    def _solve(self, key: str, old: BatchCost) -> BatchCost:
        w, sx, sy, sxx, sxy = (a + b for a, b in zip(self.live[key], self.prior[key]))
        mx, my = sx / w, sy / w
        var = sxx / w - mx * mx
        slope = (sxy / w - mx * my) / var if var > (self.spread * mx) ** 2 else old.per_sample
        slope = max(0.0, slope)
        fixed = my - slope * mx
        if fixed < 0:  # (a line through the origin: all of it per sample)
            fixed, slope = 0.0, my / mx
        return dataclasses.replace(old, fixed=fixed, per_sample=slope)

    def _add(self, key: str, x: float, y: float) -> None:
        self.live[key] = [v * self.decay + p for v, p in zip(self.live[key], _point(x, y))]
        self.prior[key] = [v * self.prior_decay for v in self.prior[key]]

    def observe(self, jobs: Sequence[Member], seconds: float) -> BatchCost:
        """One answered batch (one ``steps`` value) and its engine seconds -> the updated cost."""
        steps, c = jobs[0].steps, self.cost
        if steps == 0 and c.base is not None:
            self._add("base", len(jobs), seconds)
            self.cost = dataclasses.replace(c, base=self._solve("base", c.base))
        elif steps == c.steps:
            self._add("adapted", sum(j.ensemble for j in jobs), seconds)
            self.cost = self._solve("adapted", c)
        return self.cost


def _point(x: float, y: float) -> list[float]:
    """One observation's terms of the least-squares sums: W, Σx, Σy, Σxx, Σxy."""
    return [1.0, x, y, x * x, x * y]
