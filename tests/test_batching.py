"""Batcher policy and the inference process's wire format, without a server."""
import asyncio

import pytest
import torch

from ocd_core.predictor import SamplePrediction
from service.batcher import BatchCost, Batcher, InFlight, disconnected
from service.worker import Engine, pack, unpack


def batcher(max_batch_size=64, fixed=None, loop_s=None, n=0) -> Batcher:
    inflight = InFlight()
    inflight.n, inflight.loop_s = n, loop_s
    inflight.measure = lambda: inflight.loop_s  # the policy, not the clock, is under test here
    cost = None if fixed is None else BatchCost(fixed=fixed, per_sample=0.0002)
    return Batcher("m", "m:1", lambda jobs: ([], {}), max_batch_size, 2.0, 16, inflight, cost)


@pytest.mark.parametrize("fixed,loop_s,n,cap", [
    (0.002, 0.0003, 64, 32),  # a = 2 ms < 64 x 0.3 ms: two halves overlap the loop
    (0.002, 0.0003, 63, 32),  # ceil(n / 2)
    (0.050, 0.0003, 64, 64),  # a heavy model: a batch's fixed cost dwarfs the loop's work
    (0.008, 0.0005, 20, 10),
    (0.008, 0.0003, 20, 64),  # 20 x 0.3 ms < a: one batch
    (0.008, 0.0003, 500, 64),  # a deep queue: full batches
    (0.008, None, 64, 64),  # the loop not measured yet
    (None, 0.0003, 64, 64),  # an engine without a calibration
])
def test_cap_halves_the_batch_only_when_pipelining_pays(fixed, loop_s, n, cap):
    assert batcher(fixed=fixed, loop_s=loop_s, n=n)._cap() == cap
    assert batcher(max_batch_size=1, fixed=fixed, loop_s=loop_s, n=n)._cap() == 1  # batching off stays off


def test_calibration_measures_the_fixed_and_per_sample_cost():
    """A stand-in predictor whose stage timings are 3 ms + 0.5 ms per sample, except a slow first
    call (the warm-up, which calibration must leave out): the calibration recovers both."""
    calls = []

    class Timed:
        def predict_ragged(self, x, steps, ensembles, seeds):
            calls.append((tuple(x.shape), steps))
            first = 0.5 if len(calls) == 1 else 0.0
            k = len(ensembles)
            preds = [SamplePrediction(torch.zeros(1, 10), torch.zeros(10), torch.tensor(0.0), torch.zeros(10))] * k
            return preds, {"base": 0.001 + first, "ddim": 0.002 + 0.0004 * k, "adapt": 0.0001 * k}

    engine = Engine(Timed(), "cpu")
    cost = engine.calibrate([1, 28, 28], steps=5, size=8, repeats=2, budget_s=10.0)
    assert cost == engine.cost
    assert cost.fixed == pytest.approx(0.003)
    assert cost.per_sample == pytest.approx(0.0005)
    assert calls == [((1, 1, 28, 28), 5)] * 3 + [((8, 1, 28, 28), 5)] * 2

    calls.clear()  # a model too slow to calibrate within the budget: the warm-up bounds the fixed cost
    cost = Engine(Timed(), "cpu").calibrate([3], steps=5, size=8, repeats=2, budget_s=1.0)
    assert cost == BatchCost(fixed=pytest.approx(0.5035), per_sample=0.0)
    assert calls == [((1, 3), 5)]


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
