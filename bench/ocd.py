"""What an adapted prediction costs, measured in one run (ratios; absolute numbers move with load).

  1. adapted vs base-only prediction at batch 1, 16, 64 with 10 DDIM steps (goal: <= 5x at 64);
  2. ensemble of 5 vs 1 member per request at batch 16 (goal: <= 2.5x);
  3. per DDIM step count (1, 2, 5, 10, 20): ms per prediction at batch 64 next to the accuracy
     gain the bundle's report measured (the served default is chosen from this curve);
  4. torch vs ONNX Runtime per stage (base, ddim, adapt) at batch 1 and 64;
  5. paper UNet vs compact denoisers: FLOPs and ms per step per sample.

Usage: python bench/ocd.py [--models models] [--bundle mnist/1 ...] [--threads 1] [--skip-paper]
                           [--default-malloc]
glibc malloc is tuned as the service tunes it (service/malloc.py) unless --default-malloc.
The last line is ``adapted/base at batch 64: <ratio>x`` for the first bundle.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from ocd_core.bundle import load_bundle
from ocd_core.conditioning import CondConfig, CondEncoder
from ocd_core.denoisers import CompactConfig, PaperConfig, build_denoiser
from service.malloc import tune_malloc


def timeit(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def inputs(manifest, n: int) -> torch.Tensor:
    return torch.randn(n, *manifest.input.shape, generator=torch.Generator().manual_seed(0))


def adapted_vs_base(model, manifest, reps: int) -> float:
    print("\n| batch | base ms | adapted ms (10 steps) | ratio | ms/sample |")
    print("|---|---|---|---|---|")
    ratio = 0.0
    with torch.no_grad():
        for b in (1, 16, 64):
            x = inputs(manifest, b)
            tb = timeit(lambda: model.base(x), reps)
            ta = timeit(lambda: model.predict(x, steps=10, seeds=list(range(b))), reps)
            ratio = ta / tb
            print(f"| {b} | {tb * 1e3:.2f} | {ta * 1e3:.2f} | {ratio:.1f}x | {ta / b * 1e3:.2f} |")
    return ratio


def ensemble(model, manifest, reps: int) -> None:
    x = inputs(manifest, 16)
    t1 = timeit(lambda: model.predict(x, steps=10, ensemble=1, seeds=list(range(16))), reps)
    t5 = timeit(lambda: model.predict(x, steps=10, ensemble=5, seeds=list(range(16))), reps)
    print(f"\nensemble 5 vs 1 at batch 16: {t5 * 1e3:.1f} vs {t1 * 1e3:.1f} ms = {t5 / t1:.2f}x (goal <= 2.5x)")


def steps_curve(model, manifest, reports: Path, reps: int) -> None:
    variant = manifest.provenance.get("recipe", "cpu")  # the report of the recipe that trained this bundle
    rows = {}
    for path in sorted(reports.glob("*/metrics.json")):
        rep = json.loads(path.read_text())
        if rep["recipe"].get("name") == manifest.name and rep["recipe"].get("variant") == variant:
            rows = rep["rows"]
    key = "acc" if manifest.task == "classification" else "mse"
    x = inputs(manifest, 64)
    tb = timeit(lambda: model.base(x), reps)
    print(f"\n| DDIM steps | ms / batch of 64 | x base | {key} gain (report, mean ± sd over seeds) |")
    print("|---|---|---|---|")
    for s in (1, 2, 5, 10, 20):
        t = timeit(lambda: model.predict(x, steps=s, seeds=list(range(64))), reps)
        r = rows.get(f"ddim_{s}", {}).get(key)
        gain = f"{r['gain_mean']:+.4f} ± {r['gain_sd']:.4f}" if r else "not in report"
        print(f"| {s} | {t * 1e3:.1f} | {t / tb:.1f}x | {gain} |")


def torch_vs_onnx(model, manifest, bundle: Path, threads: int, reps: int) -> None:
    try:
        from ocd_core.onnx_runtime import OnnxRuntime
        from training.export_onnx import export_onnx
    except ImportError as e:
        print(f"\nONNX Runtime: not installed ({e})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "b"
        shutil.copytree(bundle, d)
        if not (d / "onnx.json").exists():
            export_onnx(d)
        ort = model.predictor(OnnxRuntime(d, "cpu", threads))
        print("\n| batch | backend | base ms | ddim ms | adapt ms | total ms |")
        print("|---|---|---|---|---|---|")
        for b in (1, 64):
            x = inputs(manifest, b)
            for name, fn in (
                ("torch", lambda: model.predict(x, 10, seeds=range(b)).timings),
                ("onnxruntime", lambda: ort.predict(x, 10, seeds=range(b)).timings),
            ):
                for _ in range(2):
                    fn()
                runs = [fn() for _ in range(reps)]
                med = {k: statistics.median(r[k] for r in runs) * 1e3 for k in runs[0]}
                print(
                    f"| {b} | {name} | {med['base']:.2f} | {med['ddim']:.2f} | {med['adapt']:.2f} | "
                    f"{sum(med.values()):.2f} |"
                )


def denoisers(skip_paper: bool) -> None:
    shape, dim = (84, 120), 128
    enc = CondEncoder(120, 84, 10, CondConfig(), weight_shape=shape)
    cond = enc(torch.randn(1, 120), torch.randn(1, 84), torch.randn(1, 10))
    configs = {
        "compact (served MNIST v1)": CompactConfig(),
        "compact fast (static probes, 1x16)": CompactConfig(static_probes=True, depth=1, hidden=16, probes=4),
    }
    if not skip_paper:
        configs["paper UNet (128 ch, 128x128)"] = PaperConfig()
    print("\n| denoiser | params | MFLOP / step / sample (as served) | ms / dense step (batch 1) |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for name, cfg in configs.items():
            den = build_denoiser(cfg, shape, dim).eval()
            x, t = torch.randn(1, *shape), torch.tensor([500])
            with FlopCounterMode(display=False) as fc:
                den.prediction = cfg.prediction
                if den.factor_space(0.0, 10) is not None:
                    ctx = den.prepare(cond)  # served in factor space: one step = factors + reads of the new term
                    s_, u, v = den.factors(den.read(x, ctx), t, ctx)
                    den.read_lowrank(u, v, ctx)
                else:
                    den(x, t, cond)
            ms = timeit(lambda: den(x, t, cond), 3 if cfg.kind == "paper" else 50, 1) * 1e3
            params = sum(p.numel() for p in den.parameters())
            print(f"| {name} | {params:,} | {fc.get_total_flops() / 1e6:,.2f} | {ms:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="models")
    p.add_argument("--reports", default="reports")
    p.add_argument("--bundle", action="append", help="name/version under --models (default: mnist/1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc malloc as it is (the service tunes it)")
    a = p.parse_args()
    tuned = False if a.default_malloc else tune_malloc()
    torch.set_num_threads(a.threads)
    print(
        f"torch {torch.__version__}, {a.threads} thread(s), {time.strftime('%Y-%m-%d')}, "
        f"glibc malloc {'tuned as in the service (service/malloc.py)' if tuned else 'default'}"
    )
    denoisers(a.skip_paper)
    first = None
    for rel in a.bundle or ["mnist/1"]:
        path = Path(a.models) / rel
        model, manifest = load_bundle(path)
        print(f"\n## {rel}: {manifest.denoiser.model_dump_json()}")
        ratio = adapted_vs_base(model, manifest, a.reps)
        first = ratio if first is None else first
        ensemble(model, manifest, a.reps)
        steps_curve(model, manifest, Path(a.reports), max(3, a.reps // 3))
        torch_vs_onnx(model, manifest, path, a.threads, a.reps)
    print(f"\nadapted/base at batch 64: {first:.1f}x")


if __name__ == "__main__":
    main()
