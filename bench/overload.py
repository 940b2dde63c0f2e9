"""Overload benchmark: goodput (200 answers per second) at 1x, 8x and 30x the concurrency at which
the server is saturated, against a real ``ocd serve`` that it starts.

1x is concurrency 64 (where ``bench/serve.py`` finds the batched server at its peak); 8x and 30x are
512 and 1920 connections. Every client re-sends the moment it has an answer, 503s included, and
ignores Retry-After: the worst case for a server, whose rejections must then cost it almost
nothing. Clients are asyncio (uvloop when installed) connections in 2 processes, each timing its
own requests, so that the latency of the 200s is known apart from that of the 503s (``wrk``
reports one latency for every answer). The client shares the 2 cores with the server.

Prints per level: goodput, the share of each status, p50/p99 of the 200s, connection errors;
then ``overload: goodput at 30x / peak = <ratio> (goal >= 0.8)``.
Usage: python bench/overload.py [--seconds 8] [--models models] [--model mnist] [--levels 64,512,1920]
                                [--setting name=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.launch import ROOT, Server
from bench.serve import bodies, fan_out


def _requests(port: int, reqs: list[dict]) -> list[bytes]:
    out = []
    for r in reqs:
        body = json.dumps(r).encode()
        head = f"POST /predict HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        out.append(head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body)
    return out


async def _connection(port: int, payloads: list[bytes], k: int, start: float, stop: float, seen: list, errors: Counter):
    """One keep-alive connection sending from now until ``stop`` (time.monotonic()); answers that
    come within [start, stop] are recorded as (status, seconds, sent in the window?)."""
    i = k
    reader = writer = None
    while time.monotonic() < stop:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t = time.monotonic()
            writer.write(payloads[i % len(payloads)])
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status, length, close = int(lines[0].split()[1]), 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            await reader.readexactly(length)
            done = time.monotonic()
            if start <= done <= stop:
                seen.append((status, done - t, t >= start))
            if close:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            if start <= time.monotonic() <= stop:
                errors[type(e).__name__] += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)
        i += 997
    if writer is not None:
        writer.close()


def _client(port: int, payloads: list[bytes], n: int, offset: int, start: float, stop: float, out) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    seen: list = []
    errors: Counter = Counter()

    async def main():
        await asyncio.gather(*(_connection(port, payloads, offset + k, start, stop, seen, errors) for k in range(n)))

    asyncio.run(main())
    out.put((seen, dict(errors)))


def level(port: int, payloads: list[bytes], concurrency: int, seconds: float, warmup: float = 2.0) -> dict:
    """``concurrency`` connections for ``warmup + seconds``; what is answered in the last ``seconds``."""
    procs = 2
    share = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    start = time.monotonic() + warmup
    results = fan_out(_client, port, payloads, share, start, start + seconds, spread=7)
    seen = [s for r in results for s in r[0]]
    errors = sum(sum(r[1].values()) for r in results)
    statuses = Counter(s for s, _, _ in seen)
    ok = sorted(t for s, t, sent_in in seen if s == 200 and sent_in)  # (not the first burst of connections)
    return {
        "concurrency": concurrency,
        "goodput": statuses[200] / seconds,
        "answers": len(seen),
        "statuses": dict(sorted(statuses.items())),
        "p50_ms": 1000 * statistics.median(ok) if ok else float("nan"),
        "p99_ms": 1000 * ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else float("nan"),
        "conn_errors": errors,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--models", default=str(ROOT / "models"))
    p.add_argument("--model", default="mnist")
    p.add_argument("--levels", default="64,512,1920", help="concurrency at 1x, 8x, 30x")
    p.add_argument("--setting", action="append", default=[], help="a server setting, name=value (OCD_<NAME>)")
    a = p.parse_args()
    settings = dict(s.split("=", 1) for s in a.setting)
    server = Server(Path(a.models), models=a.model, threads=1, **settings)
    try:
        payloads = _requests(server.port, bodies(a.model, mode="ocd"))
        levels = [int(c) for c in a.levels.split(",")]
        rows = []
        print(f"model {a.model}, one adapted sample per request; settings {settings or 'default'}")
        print(f"{'conc':>6} {'x':>4} {'goodput/s':>10} {'answers':>8} {'p50 200 ms':>11} {'p99 200 ms':>11}  statuses")
        for c in levels:
            r = level(server.port, payloads, c, a.seconds)
            rows.append(r)
            print(
                f"{c:>6} {c / levels[0]:>4.0f} {r['goodput']:>10.0f} {r['answers']:>8} {r['p50_ms']:>11.1f} "
                f"{r['p99_ms']:>11.1f}  {r['statuses']} conn errors {r['conn_errors']}",
                flush=True,
            )
        bad = {s for r in rows for s in r["statuses"] if s not in (200, 429, 503)}
        peak = max(r["goodput"] for r in rows)
        print(f"statuses other than 200/429/503: {sorted(bad) or 'none'}")
        ratio = rows[-1]["goodput"] / peak
        print(f"overload: goodput at {levels[-1] / levels[0]:.0f}x / peak = {ratio:.2f} (goal >= 0.8)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
