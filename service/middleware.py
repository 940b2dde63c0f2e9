"""Plain-ASGI middleware around the whole app (the FastAPI routes and the /predict hot path)."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from starlette.responses import JSONResponse

from . import metrics
from .batcher import InFlight
from .errors import BodyTimeout, BodyTooLarge


class BodyLimit:
    """413 for a body over ``limit`` bytes: declared (answered here) or streamed (``BodyTooLarge``
    from ``receive``, answered by the endpoint's error mapping); 408 (``BodyTimeout``) when a part of
    the body does not arrive within ``timeout`` seconds (a body shorter than its Content-Length).

    The timeout costs a request no timer of its own: a read registers its task and deadline, and one
    sweep every ``timeout / 8`` (at most 0.25 s) cancels the overdue ones. (``asyncio.timeout`` around
    each read cost 11-14 us per request on this event loop, ``call_later`` 5 us.) Once the body is
    complete, ``receive`` waits without a limit (for a disconnect)."""

    def __init__(self, app, limit: int, timeout: float = 10.0):
        self.app, self.limit, self.timeout = app, limit, timeout
        self.reading: dict[asyncio.Task, float] = {}  # tasks waiting for body bytes -> deadline
        self.overdue: set[asyncio.Task] = set()
        self.sweeping = False

    def _sweep(self) -> None:
        now = time.monotonic()
        for task, deadline in list(self.reading.items()):
            if deadline < now and task not in self.overdue:
                self.overdue.add(task)
                task.cancel()
        asyncio.get_running_loop().call_later(min(0.25, self.timeout / 8), self._sweep)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                resp = JSONResponse({"error": f"body: {int(value)} bytes is over the limit of {self.limit} bytes"}, 413)
                return await resp(scope, receive, send)
        if not self.sweeping:
            self.sweeping = True
            asyncio.get_running_loop().call_later(min(0.25, self.timeout / 8), self._sweep)
        seen, complete = 0, False

        async def limited():
            nonlocal seen, complete
            if complete:
                return await receive()
            task = asyncio.current_task()
            self.reading[task] = time.monotonic() + self.timeout
            try:
                message = await receive()
            except asyncio.CancelledError:
                if task not in self.overdue:
                    raise
                self.overdue.discard(task)
                task.uncancel()
                raise BodyTimeout(f"body: not complete within {self.timeout:g} s") from None
            finally:
                self.reading.pop(task, None)
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(f"body: over the limit of {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


class Admission:
    """Load shedding at the edge: at most ``limit`` inference requests (POSTs) inside the app at once,
    from admission to answer (``inflight``, which the batchers read). More wait their turn in arrival
    order, their bodies unread and undecoded, for up to ``wait_s``; a request that finds ``waiting``
    others already in line, or whose wait runs out, gets 503 + Retry-After without the app reading a
    byte of its body (the cost of a rejection: uvicorn's header parse and this answer).

    Why a line and not an immediate 503: a client that re-sends at once would be rejected again and
    again, and at 30x the server's capacity those rejections take the event loop from the admitted
    requests (goodput fell to 0.53 of peak with 503s answered after the decode; bench/overload.py).
    A waiting request costs no CPU; one that waited ``wait_s`` and is rejected comes back at most
    once per ``wait_s``. Its wait counts toward its deadline (``timeout_s``)."""

    def __init__(self, app, inflight: InFlight, limit: int, waiting: int, wait_s: float):
        self.app, self.inflight, self.limit, self.waiting, self.wait_s = app, inflight, limit, waiting, wait_s
        self.line: deque[tuple[asyncio.Future, float]] = deque()  # (admitted?, deadline), oldest first
        self.sweeping = False
        self.period = min(0.05, max(0.005, wait_s / 4))  # between sweeps of the line

    def _sweep(self) -> None:
        """Turn away the requests whose wait ran out (a prefix of the line: all wait the same time)."""
        now = time.monotonic()
        while self.line and self.line[0][1] <= now:
            future, _ = self.line.popleft()
            if not future.done():
                future.set_result(False)
        metrics.WAITING.set(len(self.line))
        if self.line:
            asyncio.get_running_loop().call_later(self.period, self._sweep)
        else:
            self.sweeping = False

    def _leave(self) -> None:
        """A request left the app (the batchers learn it): its slot goes to the oldest waiting request."""
        self.inflight.leave()
        while self.line:
            future, _ = self.line.popleft()
            if not future.done():  # (done: turned away, or its task cancelled)
                self.inflight.arrive()  # (here, not when its task resumes: no newcomer takes the slot meanwhile)
                future.set_result(True)
                break
        metrics.IN_PROGRESS.set(self.inflight.n)
        metrics.WAITING.set(len(self.line))

    async def _turn(self) -> str | None:
        """Wait for a slot -> None once admitted, else why not."""
        if len(self.line) >= self.waiting or not self.wait_s:
            return f"{self.inflight.n} requests in progress and {len(self.line)} waiting, the limit"
        future = asyncio.get_running_loop().create_future()
        self.line.append((future, time.monotonic() + self.wait_s))
        metrics.WAITING.set(len(self.line))
        if not self.sweeping:
            self.sweeping = True
            asyncio.get_running_loop().call_later(self.period, self._sweep)
        try:
            if await future:
                return None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result():
                self._leave()  # admitted as the task was cancelled: pass the slot on
            raise
        return f"{self.inflight.n} requests in progress; none could start within {self.wait_s:g} s"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.inflight.n < self.limit:  # (then nobody live waits: freed slots go to the line first)
            self.inflight.arrive()
            metrics.IN_PROGRESS.set(self.inflight.n)
        elif (why := await self._turn()) is not None:
            if scope["path"] in ("/predict", "/render"):  # (else the route is unknown: the body is unread)
                scope.setdefault("state", {})["endpoint"] = scope["path"]
            resp = JSONResponse({"error": f"server: busy, {why}"}, 503, headers={"Retry-After": "1"})
            return await resp(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self._leave()


PROBES = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})


class Count:
    """Request count and latency by model, endpoint (route template) and status. Endpoints name the
    model in ``scope["state"]["model"]``; ``scope["state"]["endpoint"]`` or the matched route
    names the endpoint. At the answer it also releases the model version the request held
    (``scope["state"]["served"]``, set by ``Flow.lookup``: an unload waits for it).

    (Pure ASGI, not BaseHTTPMiddleware: that one hides client disconnects from the endpoint.)"""

    def __init__(self, app):
        self.app = app
        self.series: dict[tuple[str, str, int], tuple] = {}  # (model, endpoint, status) -> (counter, histogram)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PROBES:  # probes and scrapes are not requests to count
            return await self.app(scope, receive, send)
        start = time.monotonic()
        state = scope.setdefault("state", {})
        state["start"], state["model"] = start, ""
        status = 500

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            if (served := state.get("served")) is not None:
                served.active -= 1
            key = (state["model"], state.get("endpoint") or getattr(scope.get("route"), "path", "other"), status)
            if (series := self.series.get(key)) is None:
                series = self.series[key] = (
                    metrics.REQUESTS.labels(key[0], key[1], str(status)),
                    metrics.REQUEST_DURATION.labels(key[0], key[1]),
                )
            series[0].inc()
            series[1].observe(time.monotonic() - start)
