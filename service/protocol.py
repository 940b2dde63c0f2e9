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
    first byte arrives."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(read_timeout(), self._headers_too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a request in flight (its headers came): the app answers it
        body = json.dumps({"error": f"headers: not complete within {read_timeout():g} s"}).encode()
        head = (
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
        )
        self.transport.write(head + body)
        self.transport.close()
