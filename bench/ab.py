"""A/B timing of the prediction path of two checkouts, run alternately (the machine drifts).

  python bench/ab.py OLD_CHECKOUT NEW_CHECKOUT [--pairs 3] [--bundle mnist/2]

Each run imports the checkout's own ``ocd_core`` (PYTHONPATH) in a fresh process, 1 thread, the
service's malloc settings, and prints median ms per call: the base model at batch 64, adapted
predictions at batch 64 with 5 and 10 DDIM steps, engine batches of 1/8/16 at 5 steps, and an
ensemble of 5 vs 1 at batch 16. Works with checkouts before and after the one-predictor refactor.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

SNIPPET = r"""
import statistics, sys, time, torch
torch.set_num_threads(1)
from service.malloc import tune_malloc; tune_malloc()
from ocd_core.bundle import load_bundle
m, _ = load_bundle(sys.argv[1])
from ocd_core.bundle import read_manifest
x = torch.randn(64, *read_manifest(sys.argv[1]).input.shape)
def run(b, steps, k=1):
    if hasattr(m, "predict_batched"):  # before the refactor
        return m.predict_batched(x[:b], steps, [k] * b, list(range(b)))
    return m.predictor().predict(x[:b], steps, [k] * b, seeds=list(range(b)))
def t(fn, reps=30):
    for _ in range(3): fn()
    times = []
    for _ in range(reps):
        a = time.perf_counter(); fn(); times.append(time.perf_counter() - a)
    return statistics.median(times) * 1e3
with torch.no_grad():
    r = {"base64": t(lambda: m.base(x))}
r.update({f"b64s{s}": t(lambda: run(64, s)) for s in (5, 10)})
r.update({f"b{b}s5": t(lambda: run(b, 5)) for b in (1, 8, 16)})
r["ens5/1"] = t(lambda: run(16, 10, 5)) / t(lambda: run(16, 10, 1))
print(" ".join(f"{k}={v:.2f}" for k, v in r.items()))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--bundle", default="mnist/2")
    a = p.parse_args()
    for _ in range(a.pairs):
        for label, root in (("old", a.old), ("new", a.new)):
            env = {**os.environ, "PYTHONPATH": os.path.abspath(root)}
            bundle = os.path.join(os.path.abspath(root), "models", a.bundle)
            out = subprocess.run([sys.executable, "-c", SNIPPET, bundle], env=env, cwd=root, capture_output=True,
                                 text=True, check=True).stdout  # fmt: skip
            print(f"{label}: {out.strip()}", flush=True)


if __name__ == "__main__":
    main()
