"""Bounded work per request: memory measured at load and batches/ensembles cut to fit it, work stopped
at its deadline, and a hung inference process replaced (real servers on loopback; the work is
controlled with SIGSTOP, not timed)."""

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch
from serving import ROOT, Server, inference_pids, make_bundle, peak_rss, until

from ocd_core.bundle import load_bundle
from ocd_core.predictor import Expired
from service.batch_policy import BatchCost, BatchPolicy
from service.worker import Engine

DIGIT = [[[((r * 28 + c) % 256) / 255 for c in range(28)] for r in range(28)]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo") / "models"
    make_bundle(root, version="1", seed=0)
    return root


def test_ensembles_run_in_chunks_with_the_same_results_and_stop_at_the_deadline(models):
    model, _ = load_bundle(models / "mnist" / "1", "cpu")
    p = model.predictor()
    x = torch.rand(3, 1, 28, 28)
    whole = p.predict(x, 5, [4, 1, 3], seeds=[1, 2, 3])
    p.max_rows = 3  # 8 members in chunks of 3, 3 and 2, the middle one across two samples
    try:
        chunked = p.predict(x, 5, [4, 1, 3], seeds=[1, 2, 3])
        with pytest.raises(Expired, match="^the deadline passed; the prediction was stopped$"):
            p.predict(x, 5, [4, 1, 3], seeds=[1, 2, 3], deadline=time.monotonic() - 1)
    finally:
        p.max_rows = None
    assert chunked.counts == [4, 1, 3] and chunked.members.shape == (8, 10)
    torch.testing.assert_close(chunked.members, whole.members, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked.uncertainty, whole.uncertainty, rtol=0, atol=1e-6)


def test_memory_is_measured_at_load_and_caps_batches(models):
    model, _ = load_bundle(models / "mnist" / "1", "cpu")
    engine = Engine(model.predictor())
    engine.cost = BatchCost(0.001, 0.0001, steps=5)
    assert engine.fit_memory([1, 28, 28], 5, 1) == 1  # a 1-byte budget: one sample, one member at a time
    assert engine.cost.row_bytes > 0 and engine.predictor.max_rows == 1 and engine.cost.max_rows == 1
    rows = engine.fit_memory([1, 28, 28], 5, 40 * engine.cost.row_bytes)
    assert 20 <= rows <= 80 and engine.predictor.max_rows == rows == engine.cost.max_rows  # (measured twice)
    policy = BatchPolicy(max_batch_size=64, max_wait_s=0.0)
    assert policy.cap(0, None, BatchCost(0.001, 0.0001, steps=5, max_rows=3)) == 3
    assert policy.cap(0, None, BatchCost(0.001, 0.0001, steps=5, max_rows=None)) == 64
    job = SimpleNamespace(steps=5, ensemble=1)
    assert BatchCost(0.001, 0.0001, 5, max_rows=3).predict([job]) == pytest.approx(0.0011)


def test_a_large_nerf_ensemble_stays_within_the_memory_budget():
    """tinyNeRF renders a 100x100 image per member (~0.7 GB each on the CPU): an ensemble used to
    take the inference process to 14.5 GB. With OCD_BATCH_MEMORY_MB=1024 members render one at a
    time, so an ensemble of 4 adds less than a member's memory to the peak the load reached."""
    s = Server(ROOT / "models", models="nerf:2", device="cpu", batch_memory_mb=1024, timeout_s=120)
    try:
        found = r"one sample and member takes ([\d.]+) MiB, at most (\d+) at once"
        line = until(lambda: re.search(found, s.logs()), "log")
        per_row, rows = float(line.group(1)) * 2**20, int(line.group(2))
        assert per_row > 200 * 2**20 and rows == 1
        (pid,) = inference_pids(s.proc.pid)
        loaded = peak_rss(pid)
        url = f"{s.url}/predict"
        abusive = {"model": "nerf", "input": [30.0, 20.0, 4.0], "ensemble": 32, "ddim_steps": 100}
        r = httpx.post(url, json=abusive, timeout=30)  # over the model's own limit (its manifest): no work at all
        assert (r.status_code, r.json()) == (422, {"error": "ensemble: must be between 1 and 8, got 32"})
        bodies = [{**abusive, "ensemble": 4, "ddim_steps": 2, "seed": 1}] + [
            {"model": "nerf", "input": [30.0 + 10 * i, 20.0, 4.0]}
            for i in range(2)  # default requests
        ]
        with ThreadPoolExecutor(3) as pool:  # would batch together, but one sample fits the budget
            answers = list(pool.map(lambda b: httpx.post(url, json=b, timeout=120), bodies))
        assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
        assert peak_rss(pid) - loaded < 0.5 * per_row  # unchunked: 3 more members' worth, and 2 samples more
        assert s.metric("ocd_batch_size_sum", model="nerf") == s.metric("ocd_batch_size_count", model="nerf") == 3
    finally:
        s.stop()


def test_work_past_its_deadline_is_stopped_not_finished(models):
    """The batch reaches the inference process only after its deadline (the process is stopped):
    it is abandoned before it runs, counted, and the next request is served."""
    s = Server(models, device="cpu", timeout_s=1, max_wait_ms=0)
    try:
        (pid,) = inference_pids(s.proc.pid)
        body = {"model": "mnist", "input": DIGIT, "ensemble": 32, "ddim_steps": 100, "seed": 1}
        os.kill(pid, signal.SIGSTOP)
        try:
            r = httpx.post(f"{s.url}/predict", json=body, timeout=30)
            assert r.status_code == 504 and r.json() == {"error": "deadline of 1 s exceeded (no result in time)"}
        finally:
            os.kill(pid, signal.SIGCONT)
        until(lambda: s.metric("ocd_batches_abandoned_total", model="mnist") == 1, "abandoned")
        assert s.metric("ocd_inference_duration_seconds_count", model="mnist", stage="adapt") == 0
        ok = httpx.post(f"{s.url}/predict", json={**body, "ensemble": 1, "ddim_steps": 2}, timeout=30)
        assert ok.status_code == 200 and inference_pids(s.proc.pid) == [pid]
    finally:
        s.stop()


def test_a_hung_inference_process_is_replaced(models):
    """No answer OCD_WATCHDOG_S after a batch's deadline: the process hangs; it is killed and a new
    one serves the next requests."""
    s = Server(models, device="cpu", timeout_s=1, watchdog_s=1, max_wait_ms=0)
    try:
        (pid,) = inference_pids(s.proc.pid)
        body = {"model": "mnist", "input": DIGIT, "seed": 1}
        os.kill(pid, signal.SIGSTOP)
        r = httpx.post(f"{s.url}/predict", json=body, timeout=30)
        assert r.status_code == 504
        until(lambda: "it hangs; killing it" in s.logs(), "watchdog")
        assert f"(pid {pid}) gave no answer 1 s after a batch's deadline (OCD_WATCHDOG_S)" in s.logs()
        ok = until(lambda: (r := httpx.post(f"{s.url}/predict", json=body, timeout=30)).status_code == 200 and r, "200")
        assert ok.json()["seed"] == 1
        (new,) = inference_pids(s.proc.pid)
        assert new != pid
    finally:
        s.stop()
