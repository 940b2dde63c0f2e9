"""Plain-ASGI middleware around the whole app (the FastAPI routes and the /predict hot path)."""

from __future__ import annotations

import time

from starlette.responses import JSONResponse

from . import metrics
from .batcher import InFlight
from .errors import BodyTooLarge


class BodyLimit:
    """413 for a body over ``limit`` bytes: declared (answered here) or streamed (``BodyTooLarge``
    from ``receive``, answered by the endpoint's error mapping)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                resp = JSONResponse({"error": f"body: {int(value)} bytes is over the limit of {self.limit} bytes"}, 413)
                return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(f"body: over the limit of {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


PROBES = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})


class Count:
    """Request count and latency by model, endpoint (route template) and status; and ``inflight``,
    the POSTs (inference requests) the app holds, which the batchers read. Endpoints name the
    model in ``scope["state"]["model"]``; ``scope["state"]["endpoint"]`` or the matched route
    names the endpoint.

    (Pure ASGI, not BaseHTTPMiddleware: that one hides client disconnects from the endpoint.)"""

    def __init__(self, app, inflight: InFlight):
        self.app, self.inflight = app, inflight
        self.series: dict[tuple[str, str, int], tuple] = {}  # (model, endpoint, status) -> (counter, histogram)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PROBES:  # probes and scrapes are not requests to count
            return await self.app(scope, receive, send)
        start = time.monotonic()
        state = scope.setdefault("state", {})
        state["start"], state["model"] = start, ""
        post = scope["method"] == "POST"
        if post:
            self.inflight.arrive()
        status = 500

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            if post:
                self.inflight.leave()
            key = (state["model"], state.get("endpoint") or getattr(scope.get("route"), "path", "other"), status)
            if (series := self.series.get(key)) is None:
                series = self.series[key] = (
                    metrics.REQUESTS.labels(key[0], key[1], str(status)),
                    metrics.REQUEST_DURATION.labels(key[0], key[1]),
                )
            series[0].inc()
            series[1].observe(time.monotonic() - start)
