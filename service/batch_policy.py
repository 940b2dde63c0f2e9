"""Batching policy: when a batch closes, how large it may grow, and when the engine takes another.

Pure decisions on numbers (no queue, no clock, no event loop), unit-tested in tests/test_batching.py;
the mechanism that applies them (queue, futures, the engine's pipe) is ``batcher.Batcher``. Every
tuning constant of the batching lives here, with why it has its value; the operator's knobs
(``max_batch_size``, ``max_wait_ms``, ``max_queue``) are ``Settings``.
"""

from __future__ import annotations

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
    measured when the engine loads (``worker.Engine.calibrate``)."""

    fixed: float
    per_sample: float
    steps: int = 1
    base: BatchCost | None = None  # the base mode's (steps 0: the base model alone), when measured

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
        halves win when a < P*n."""
        cap = self.max_batch_size
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
