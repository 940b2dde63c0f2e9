"""The model repository while traffic flows (a real server on loopback): load, unload and SIGHUP,
the version policy, operators only, and not one failed request while a new version replaces the old."""

import os
import shutil
import signal
import threading
from collections import Counter

import httpx
import pytest
from serving import Server, make_bundle, until

from service.registry import apply_policy

DIGIT = [[[((r * 28 + c) % 256) / 255 for c in range(28)] for r in range(28)]]
KEY = {"Authorization": "Bearer s3cret"}


def test_version_policy():
    versions = ["1", "10", "2", "9", "beta"]
    assert apply_policy(versions, "all") == ["1", "2", "9", "10", "beta"]
    assert apply_policy(["1", "10", "2", "9"], "latest:2") == ["9", "10"]
    assert apply_policy(versions, "specific:2,9,7") == ["2", "9"]


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "models"
    make_bundle(root, version="1", seed=1)
    return root


def test_control_needs_the_operators_key_and_is_off_without_one(repo):
    s = Server(repo, version_policy="latest:1")
    try:
        r = httpx.post(f"{s.url}/v2/repository/models/mnist/unload")
        assert (r.status_code, r.json()) == (
            403,
            {"error": "authorization: repository control is off on this server (set OCD_REPOSITORY_KEY)"},
        )
    finally:
        s.stop()
    s = Server(repo, repository_key="s3cret")
    try:
        url = f"{s.url}/v2/repository/models/mnist/unload"
        r = httpx.post(url)
        assert (r.status_code, r.json()) == (401, {"error": "authorization: expected 'Authorization: Bearer <key>'"})
        r = httpx.post(url, headers={"Authorization": "Bearer wrong"})
        assert (r.status_code, r.json()) == (403, {"error": "authorization: wrong key"})
        assert httpx.post(f"{s.url}/predict", json={"model": "mnist", "input": DIGIT}).status_code == 200  # unchanged
        r = httpx.post(f"{s.url}/v2/repository/models/nope/load", headers=KEY)
        assert r.status_code == 400 and r.json()["error"].startswith("model: nope did not load, and what served")
        assert httpx.post(url, headers=KEY).json() == {"name": "mnist", "versions": []}
        r = httpx.post(f"{s.url}/predict", json={"model": "mnist", "input": DIGIT})
        assert (r.status_code, r.json()) == (404, {"error": "unknown model 'mnist'; serving []"})
        r = httpx.post(f"{s.url}/v2/repository/models/mnist/load", headers=KEY, timeout=60)
        assert r.json() == {"name": "mnist", "versions": ["1"]}
        assert httpx.post(f"{s.url}/predict", json={"model": "mnist", "input": DIGIT}).status_code == 200
    finally:
        s.stop()


def test_a_new_version_replaces_the_old_without_a_failed_request(repo):
    """Clients send all along; version 2 is published and loaded, version 1 (latest:1) drains and
    leaves; a broken version 3 fails to load and 2 keeps serving; SIGHUP picks up version 4."""
    s = Server(repo, version_policy="latest:1", repository_key="s3cret", max_wait_ms=2)
    stop, seen, failures = threading.Event(), Counter(), []

    def client(k: int) -> None:
        with httpx.Client(timeout=60) as c:
            i = 0
            while not stop.is_set():
                r = c.post(f"{s.url}/predict", json={"model": "mnist", "input": DIGIT, "seed": k * 10_000 + i})
                if r.status_code == 200:
                    seen[r.json()["version"]] += 1
                else:
                    failures.append((r.status_code, r.text))
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        until(lambda: seen["1"] >= 20, "traffic on version 1")
        make_bundle(repo, version="2", seed=2)
        r = httpx.post(f"{s.url}/v2/repository/models/mnist/load", headers=KEY, timeout=60)
        assert r.json() == {"name": "mnist", "versions": ["2"]}  # 1 left, after its requests were answered
        until(lambda: seen["2"] >= 20, "traffic on version 2")
        assert httpx.get(f"{s.url}/v2/models/mnist").json()["versions"] == ["2"]

        broken = repo / "mnist" / "3"
        shutil.copytree(repo / "mnist" / "2", broken)
        for f in broken.glob("*.safetensors"):
            f.write_bytes(b"not a tensor file")
        r = httpx.post(f"{s.url}/v2/repository/models/mnist/load", headers=KEY, timeout=60)
        assert r.status_code == 400 and r.json()["error"].startswith("model: mnist did not load, and what served")
        before = seen["2"]
        until(lambda: seen["2"] >= before + 20, "version 2 still serving")
        shutil.rmtree(broken)

        make_bundle(repo, version="4", seed=4)
        os.kill(s.proc.pid, signal.SIGHUP)
        until(lambda: seen["4"] >= 20, "version 4 after SIGHUP")
        assert "repository rescan: mnist serves versions ['4']" in s.logs()
    finally:
        stop.set()
        for t in threads:
            t.join()
        s.stop()
    assert failures == []
    assert set(seen) == {"1", "2", "4"} and min(seen.values()) >= 20
