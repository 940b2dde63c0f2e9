"""uvicorn's httptools protocol with a header-read timeout: a client that opens a connection, or starts a
request, and does not finish its headers within ``OCD_READ_TIMEOUT_S`` gets 408 and the connection is
closed (uvicorn waits for headers forever: a slow client held a connection for 45 s and more).

The body's own timeout is the ASGI middleware's (``middleware.BodyLimit``): there the app answers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@functools.cache
def read_timeout() -> float:
    """``OCD_READ_TIMEOUT_S`` (``ocd serve`` validates it in its settings; workers inherit the environment)."""
    return float(os.environ.get("OCD_READ_TIMEOUT_S", "10"))


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """Headers must be complete ``read_timeout()`` seconds after the connection opens or a request's
    first byte arrives. A request costs no timer of its own: it sets a deadline, and one sweep per
    process every 0.25 s (over uvicorn's set of open connections) answers the overdue ones."""

    _sweeping: set[asyncio.AbstractEventLoop] = set()
    _header_deadline: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline = self.loop.time() + read_timeout()
        if self.loop not in TimedHttpToolsProtocol._sweeping:
            TimedHttpToolsProtocol._sweeping.add(self.loop)
            self.loop.call_later(0.25, self._sweep, self.loop, self.connections)

    @staticmethod
    def _sweep(loop: asyncio.AbstractEventLoop, connections: set) -> None:
        now = loop.time()
        for proto in list(connections):
            deadline = getattr(proto, "_header_deadline", None)
            if deadline is not None and deadline < now:
                proto._headers_too_slow()
        loop.call_later(0.25, TimedHttpToolsProtocol._sweep, loop, connections)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_deadline = self.loop.time() + read_timeout()

    def on_headers_complete(self) -> None:
        self._header_deadline = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_deadline = None
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a request in flight (its headers came): the app answers it
        body = json.dumps({"error": f"headers: not complete within {read_timeout():g} s"}).encode()
        head = (
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
        )
        self.transport.write(head + body)
        self.transport.close()
