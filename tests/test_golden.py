"""Served answers against stored values: the committed bundles answer fixed requests as they did when
tests/golden/served.json was written. An independent reference for the whole served path (decode,
DDIM, scale, adapt, summary, encode): a test that compares the server with the predictor it calls
passes when both change (a swapped scale mode did). After a deliberate change to the numbers:
``OCD_WRITE_GOLDEN=1 pytest tests/test_golden.py`` rewrites the file; review its diff."""

import base64
import json
import os

import httpx
import pytest
from serving import DIAMOND_ROW, ROOT, Server

GOLDEN = ROOT / "tests" / "golden" / "served.json"
SEVEN = base64.b64encode((ROOT / "examples" / "digits" / "7" / "00.png").read_bytes()).decode()
CASES = {
    "mnist default mode": {"model": "mnist", "version": "3", "input": SEVEN, "seed": 7},
    "mnist base": {"model": "mnist", "version": "3", "input": SEVEN, "mode": "base", "seed": 1},
    "mnist 5 steps, ensemble 3": {
        "model": "mnist",
        "version": "3",
        "input": SEVEN,
        "seed": 11,
        "ddim_steps": 5,
        "ensemble": 3,
    },
    "diamonds 5 steps, ensemble 4": {
        "model": "diamonds",
        "version": "2",
        "input": DIAMOND_ROW,
        "seed": 2,
        "ddim_steps": 5,
        "ensemble": 4,
    },
}
KEEP = ("label", "probabilities", "value", "uncertainty", "mode", "ddim_steps", "ensemble", "seed")


@pytest.fixture(scope="module")
def answers():
    s = Server(ROOT / "models", models="mnist:3,diamonds:2", device="cpu")
    try:
        out = {}
        for name, body in CASES.items():
            r = httpx.post(f"{s.url}/predict", json=body, timeout=60)
            assert r.status_code == 200, r.text
            out[name] = {k: r.json()[k] for k in KEEP}
        return out
    finally:
        s.stop()


def test_served_answers_match_the_stored_ones(answers):
    if os.environ.get("OCD_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(answers, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(CASES)
    for name, want in golden.items():
        got = answers[name]
        for key in ("label", "mode", "ddim_steps", "ensemble", "seed"):
            assert got[key] == want[key], (name, key)
        if want["probabilities"] is not None:  # (1e-5: float differences between CPU kernels, not bugs)
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5), name
        else:
            assert got["value"] == pytest.approx(want["value"], rel=1e-5), name
        assert got["uncertainty"] == pytest.approx(want["uncertainty"], rel=1e-3, abs=1e-6), name
