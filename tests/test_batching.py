"""Batcher policy and the inference process's wire format, without a server."""
import asyncio

import pytest
import torch

from ocd_core.predictor import SamplePrediction
from service.batcher import Batcher, InFlight, disconnected
from service.worker import pack, unpack


def batcher(max_batch_size=64, cost=None, loop_s=None, n=0) -> Batcher:
    inflight = InFlight()
    inflight.n, inflight.loop_s = n, loop_s
    inflight.measure = lambda: inflight.loop_s  # the policy, not the clock, is under test here
    b = Batcher("m", "m:1", lambda jobs: ([], {}), max_batch_size, 2.0, 16, inflight)
    b.cost = dict(cost or {})
    return b


def test_fixed_cost_is_the_intercept_of_the_measured_sizes():
    assert batcher().fixed_cost() is None
    assert batcher(cost={64: 0.016}).fixed_cost() == 0.016  # one size: its whole time, an upper bound
    assert batcher(cost={32: 0.012, 64: 0.016}).fixed_cost() == pytest.approx(0.008)
    # least squares through (1, 4), (16, 7.5), (64, 17) ms: slope 0.2043 ms, intercept 3.984 ms
    assert batcher(cost={1: 0.004, 16: 0.0075, 64: 0.017}).fixed_cost() == pytest.approx(0.003984, abs=1e-6)
    assert batcher(cost={8: 0.001, 16: 0.004}).fixed_cost() == 0.0  # never negative


@pytest.mark.parametrize("cost,loop_s,n,cap", [
    ({32: 0.012, 64: 0.016}, 0.0003, 64, 32),  # a = 8 ms < 64 x 0.3 ms: two halves overlap the loop
    ({64: 0.050}, 0.0003, 64, 64),  # a heavy model: a batch's fixed cost dwarfs the loop's work
    ({32: 0.012, 64: 0.016}, 0.0005, 20, 10),
    ({32: 0.012, 64: 0.016}, 0.0003, 20, 64),  # 20 x 0.3 ms < a: one batch
    ({32: 0.012, 64: 0.016}, 0.0003, 500, 64),  # a deep queue: full batches
    ({32: 0.012, 64: 0.016}, None, 64, 64),  # nothing measured yet
    ({}, 0.0003, 64, 64),
])
def test_cap_halves_the_batch_only_when_pipelining_pays(cost, loop_s, n, cap):
    assert batcher(cost=cost, loop_s=loop_s, n=n)._cap() == cap
    assert batcher(max_batch_size=1, cost=cost, loop_s=loop_s, n=n)._cap() == 1  # batching off stays off


def test_pack_and_unpack_keep_ragged_ensembles():
    preds = [SamplePrediction(torch.full((k, 10), float(i)), torch.full((10,), i + 0.5), torch.tensor(i + 0.25),
                              torch.full((10,), i - 1.0)) for i, k in enumerate([1, 3, 2])]
    back = unpack(pack(preds), [1, 3, 2])
    assert len(back) == 3
    for p, q in zip(preds, back):
        for f in ("members", "mean", "uncertainty", "base"):
            assert torch.equal(getattr(p, f), getattr(q, f)), f


def test_disconnected_steps_receive_once_without_waiting():
    async def main():
        gate = asyncio.Event()
        messages = []

        async def receive():
            await gate.wait()
            return messages.pop(0)

        assert disconnected(receive) is False  # would wait: the client is still there
        assert gate._waiters == type(gate._waiters)()  # and nothing was left waiting
        gate.set()
        messages.append({"type": "http.disconnect"})
        assert disconnected(receive) is True
        messages.append({"type": "http.request", "body": b"", "more_body": False})
        assert disconnected(receive) is False

    asyncio.run(main())
