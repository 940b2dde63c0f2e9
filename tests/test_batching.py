"""Batcher policy and the inference process's wire format, without a server."""

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch

from ocd_core.predictor import BatchPrediction, Predictor, SamplePrediction
from service.batch_policy import BatchCost, BatchPolicy, CostFit
from service.batcher import Batcher, ClientGone, InFlight, Job, disconnected
from service.worker import Channel, Engine, pack, unpack


def batcher(max_batch_size=64, fixed=None, loop_s=None, n=0) -> Batcher:
    inflight = InFlight()
    inflight.n, inflight.loop_s = n, loop_s
    inflight.measure = lambda: inflight.loop_s  # the policy, not the clock, is under test here
    cost = None if fixed is None else BatchCost(fixed=fixed, per_sample=0.0002)
    return Batcher("m", "m:1", lambda jobs: ([], {}), max_batch_size, 2.0, 16, inflight, cost)


@pytest.mark.parametrize(
    "fixed,loop_s,n,cap",
    [
        (0.002, 0.0003, 64, 32),  # a = 2 ms < 64 x 0.3 ms: two halves overlap the loop
        (0.002, 0.0003, 63, 32),  # ceil(n / 2)
        (0.050, 0.0003, 64, 64),  # a heavy model: a batch's fixed cost dwarfs the loop's work
        (0.008, 0.0005, 20, 10),
        (0.008, 0.0003, 20, 64),  # 20 x 0.3 ms < a: one batch
        (0.008, 0.0003, 500, 64),  # a deep queue: full batches
        (0.008, None, 64, 64),  # the loop not measured yet
        (None, 0.0003, 64, 64),  # an engine without a calibration
    ],
)
def test_cap_halves_the_batch_only_when_pipelining_pays(fixed, loop_s, n, cap):
    cost = None if fixed is None else BatchCost(fixed=fixed, per_sample=0.0002)
    assert BatchPolicy(64, 0.002).cap(n, loop_s, cost) == cap
    assert BatchPolicy(1, 0.002).cap(n, loop_s, cost) == 1  # batching off stays off
    assert batcher(fixed=fixed, loop_s=loop_s, n=n)._cap() == cap  # the batcher asks the policy


def test_policy_closes_waits_and_pipelines_by_its_rules():
    p = BatchPolicy(max_batch_size=8, max_wait_s=0.005)
    assert p.wait_left(0.0) == 0.005 and p.wait_left(0.002) == pytest.approx(0.003) and p.wait_left(0.006) < 0
    assert BatchPolicy(8, 0.0).wait_left(0.0) == 0  # no wait: a batch takes only what is queued
    # a batch holds every request in the server: 3 in flight, 2 in the batch, 1 at the engine
    assert p.holds_all(2.0, 1.0, 3) and not p.holds_all(2.0, 0.0, 3)
    assert p.holds_all(0.5 + 0.5, 0.0, 1)  # a v2 request of two samples: shares of 1/2 each
    job = lambda ensemble: SimpleNamespace(steps=5, ensemble=ensemble, share=1.0)
    cost = BatchCost(fixed=0.01, per_sample=0.001, steps=5)
    assert not p.is_long([job(1)] * 10, cost)  # 20 ms < the 50 ms horizon
    assert p.is_long([job(8)] * 6, cost)  # 58 ms
    assert p.is_long([job(1)], None)  # an engine without a calibration: assume the worst
    assert p.engine_has_room(0, 0) and p.engine_has_room(1, 0)  # a second batch waits behind a quick one
    assert not p.engine_has_room(1, 1) and not p.engine_has_room(2, 0)  # not behind a long one, never three


def test_calibration_measures_the_fixed_and_per_sample_cost():
    """A stand-in predictor whose stage timings are ``slow`` + 3 ms + 0.5 ms per sample, and a
    ``warm`` extra on its first call (the warm-up, which calibration must leave out)."""
    calls = []

    class Timed:
        def __init__(self, slow=0.0, warm=0.5):
            self.slow, self.warm = slow, warm

        runtime = SimpleNamespace(device=torch.device("cpu"))

        def predict(self, x, steps, ensembles, seeds, deadline=None):
            calls.append((tuple(x.shape), steps))
            first = self.warm if len(calls) == 1 else 0.0
            k = len(ensembles)
            return BatchPrediction(
                torch.zeros(k, 10),
                torch.zeros(k, 10),
                torch.zeros(k),
                torch.zeros(k, 10),
                [1] * k,
                {"base": self.slow + 0.001 + first, "ddim": 0.002 + 0.0004 * k, "adapt": 0.0001 * k},
            )

    engine = Engine(Timed())
    cost = engine.calibrate([1, 28, 28], steps=5, size=8, repeats=2, budget_s=1.0)
    assert cost == engine.cost
    assert cost.fixed == pytest.approx(0.003)
    assert cost.per_sample == pytest.approx(0.0005)
    # warm-up, the budget check, 2 + 2; at the model's steps, then in the base mode (steps 0)
    assert (
        calls
        == [((1, 1, 28, 28), 5)] * 4 + [((8, 1, 28, 28), 5)] * 2 + [((1, 1, 28, 28), 0)] * 4 + [((8, 1, 28, 28), 0)] * 2
    )
    assert cost.base == BatchCost(fixed=pytest.approx(0.003), per_sample=pytest.approx(0.0005), steps=0)

    calls.clear()  # too slow to calibrate within the budget: a batch of one bounds the fixed cost
    cost = Engine(Timed(slow=0.1)).calibrate([3], steps=5, size=8, repeats=2, budget_s=1.0)
    base = BatchCost(fixed=pytest.approx(0.1035), per_sample=0.0, steps=0)
    assert cost == BatchCost(fixed=pytest.approx(0.1035), per_sample=0.0, steps=5, base=base)
    assert calls == [((1, 3), 5)] * 2 + [((1, 3), 0)] * 2

    calls.clear()  # a warm-up over the whole budget: no second call
    cost = Engine(Timed(warm=1.5)).calibrate([3], steps=5, size=8, repeats=2, budget_s=1.0)
    assert (cost.fixed, cost.per_sample, cost.steps) == (pytest.approx(1.5035), 0.0, 5)
    assert calls[0] == ((1, 3), 5) and calls[1] == ((1, 3), 0)  # the base mode: measured, warm by then
    assert cost.base.fixed == pytest.approx(0.003) and cost.base.per_sample == pytest.approx(0.0005)


def test_batch_cost_predicts_members_and_steps():
    cost = BatchCost(fixed=0.002, per_sample=0.0002, steps=5)
    job = lambda steps, ensemble: SimpleNamespace(steps=steps, ensemble=ensemble)
    assert cost.predict([job(5, 1)] * 10) == pytest.approx(0.004)
    assert cost.predict([job(5, 4), job(5, 6)]) == pytest.approx(0.004)  # ensemble members count
    assert cost.predict([job(50, 1)] * 10) == pytest.approx(0.04)  # 10x the steps: 10x the batch
    assert cost.predict([job(2, 1)] * 10) == pytest.approx(0.004)  # fewer steps: still the upper bound
    assert cost.predict([job(0, 1)] * 10) == pytest.approx(0.004)  # the base mode, not measured: the bound
    with_base = BatchCost(fixed=0.002, per_sample=0.0002, steps=5, base=BatchCost(0.0005, 0.00001, steps=0))
    assert with_base.predict([job(0, 1)] * 10) == pytest.approx(0.0006)  # the base mode's own cost
    assert with_base.predict([job(5, 1)] * 10) == pytest.approx(0.004)


@pytest.mark.parametrize("fixed,at_engine", [(0.001, 2), (1.0, 1)])
def test_a_second_batch_waits_at_the_engine_only_behind_a_quick_one(fixed, at_engine):
    """Three single-job batches: behind a quick batch the next one is sent at once (BatchPolicy.pipeline_depth);
    behind a slow one it stays queued, where a client that hangs up still costs nothing."""

    async def main():
        started, gate = [], asyncio.Event()

        async def engine(jobs):
            started.append([j.seed for j in jobs])
            await gate.wait()
            return [j.seed for j in jobs], {"ddim": 0.001}

        b = Batcher("m", "m:1", engine, 1, 0.0, 16, None, BatchCost(fixed, 0.0, steps=5))
        b.start()
        jobs = [Job(torch.zeros(1), 5, 1, seed, time.monotonic() + 10) for seed in range(3)]
        for j in jobs:
            b.submit(j)
        for _ in range(20):
            await asyncio.sleep(0)
        seen = list(started)
        gate.set()
        results = [(await j.future)[0] for j in jobs]
        await b.drain()
        return seen, results, started

    seen, results, started = asyncio.run(main())
    assert seen == [[0], [1]][:at_engine]
    assert results == [0, 1, 2] and started == [[0], [1], [2]]


def test_a_group_waiting_for_the_engine_is_checked_again_before_it_is_sent():
    """Jobs with different DDIM steps run as separate groups; the second waits for the engine
    behind the first (a slow one). Its client hangs up meanwhile: it is dropped (ClientGone), not run."""

    async def main():
        started, gate, hung_up = [], asyncio.Event(), []

        async def engine(jobs):
            started.append([j.seed for j in jobs])
            await gate.wait()
            return [j.seed for j in jobs], {"ddim": 0.001}

        b = Batcher("m", "m:1", engine, 64, 0.0, 16, None, BatchCost(1.0, 0.0, steps=5))
        b.start()
        first = Job(torch.zeros(1), 5, 1, 0, time.monotonic() + 10)
        second = Job(torch.zeros(1), 50, 1, 1, time.monotonic() + 10, gone=lambda: bool(hung_up))
        b.submit(first)
        b.submit(second)
        for _ in range(20):
            await asyncio.sleep(0)
        hung_up.append(True)
        gate.set()
        assert (await first.future)[0] == 0
        with pytest.raises(ClientGone):
            await second.future
        await b.drain()
        return started

    assert asyncio.run(main()) == [[0]]


def test_channel_routes_replies_and_fails_its_calls_when_the_pipe_breaks():
    """The server side of an inference-process pipe, against a real pipe: a reply reaches the call
    of its sequence number (a stray one is dropped); an unreadable frame or EOF fails the waiting
    calls with EOFError, and a broken channel refuses new requests."""
    import multiprocessing as mp

    async def main():
        ours, theirs = mp.Pipe()
        channel = Channel(ours)
        first = channel.request(1, (1, "x"))
        assert await asyncio.to_thread(theirs.recv) == (1, "x")
        theirs.send((99, "ok", "stray"))
        theirs.send((1, "ok", "answer"))
        assert await asyncio.wait_for(first, 5) == ("ok", "answer")
        second = channel.request(2, (2, "y"))
        await asyncio.to_thread(theirs.recv)
        theirs.send_bytes(b"not a pickle")
        with pytest.raises(EOFError):
            await asyncio.wait_for(second, 5)
        with pytest.raises(EOFError):
            channel.request(3, (3, "z"))
        channel.close()

        ours, theirs = mp.Pipe()
        channel = Channel(ours)
        third = channel.request(1, (1, "big" * 100_000))  # over the pipe's buffer: written as it drains
        assert await asyncio.to_thread(theirs.recv) == (1, "big" * 100_000)  # (read on a thread: the loop writes)
        theirs.close()
        with pytest.raises(EOFError):
            await asyncio.wait_for(third, 5)
        channel.close()

    asyncio.run(main())


def test_pack_and_unpack_keep_ragged_ensembles():
    counts = [1, 3, 2]
    preds = [
        SamplePrediction(
            torch.full((k, 10), float(i)),
            torch.full((10,), i + 0.5),
            torch.tensor(i + 0.25),
            torch.full((10,), i - 1.0),
        )
        for i, k in enumerate(counts)
    ]
    batched = BatchPrediction(
        torch.cat([p.members for p in preds]),
        *(torch.stack([getattr(p, f) for p in preds]) for f in ("mean", "uncertainty", "base")),
        counts,
    )
    arrays = pack(batched)
    assert [a.shape for a in arrays] == [(6, 10), (3, 10), (3,), (3, 10)]
    back = unpack(arrays, counts)
    assert len(back) == 3
    for p, q in zip(preds, back):
        for f in ("members", "mean", "uncertainty", "base"):
            assert torch.equal(getattr(p, f), getattr(q, f)), f


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_batched_summary_equals_each_sample_alone(task):
    """summarise summarises all samples with K members at once; every sample's mean and
    uncertainty must be bit-identical to summarising it alone (no dependence on the batch)."""
    model = Predictor.__new__(Predictor)  # only the task matters to the summary
    model.task = task
    g = torch.Generator().manual_seed(0)
    for counts in ([1] * 7, [3] * 5, [1, 3, 2, 3, 1, 5, 2]):
        out = torch.rand(sum(counts), 10, generator=g).softmax(-1)
        base = torch.rand(len(counts), 10, generator=g)
        pred = model.summarise(out, base, counts)
        assert pred.mean.shape == (len(counts), 10)
        assert pred.uncertainty.shape == ((len(counts),) if task == "classification" else (len(counts), 10))
        for i, (members, p) in enumerate(zip(out.split(counts), pred.split())):
            mean, unc = model._summary(members.unsqueeze(0), 1)
            assert torch.equal(p.members, members) and torch.equal(p.base, base[i])
            assert torch.equal(p.mean, mean[0]) and torch.equal(p.uncertainty, unc[0]), (counts, i)


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


def test_cost_fit_recovers_from_a_calibration_on_a_busy_host():
    """A calibration that read a busy machine (0 ms + k x 65.9 ms; idle it is 2.01 ms + k x 0.144 ms)
    is corrected by the live batches: varied sizes re-fit both parts, one size the fixed part."""
    true = lambda k: 0.00201 + 0.000144 * k
    job = lambda steps, ensemble=1: SimpleNamespace(steps=steps, ensemble=ensemble)
    busy = BatchCost(fixed=0.0, per_sample=0.0659, steps=5, base=BatchCost(0.0, 0.0659, steps=0))
    fit = CostFit(busy)
    for i in range(120):
        k = 1 + (i * 37) % 64
        cost = fit.observe([job(5)] * k, true(k))
    assert cost.fixed == pytest.approx(0.00201, rel=1e-3) and cost.per_sample == pytest.approx(0.000144, rel=1e-3)
    assert cost.base == busy.base  # base-mode batches fit the base cost, and none came
    for _ in range(120):
        cost = fit.observe([job(0)] * 10, 0.0011)
    assert cost.base.fixed + 10 * cost.base.per_sample == pytest.approx(0.0011, rel=1e-3)
    assert (cost.fixed, cost.per_sample) == (pytest.approx(0.00201, rel=1e-3), pytest.approx(0.000144, rel=1e-3))
    assert fit.observe([job(50)] * 4, 9.0) == cost  # other steps: not the calibration's; ignored

    one_size = CostFit(busy)
    for _ in range(120):
        cost = one_size.observe([job(5, ensemble=4)] * 8, true(32))  # 32 members every time
    assert cost.fixed + 32 * cost.per_sample == pytest.approx(true(32), rel=1e-3)
    assert 0 <= cost.per_sample <= true(32) / 32 and cost.fixed >= 0  # not the busy host's 65.9 ms per sample
