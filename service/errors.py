"""Every exception the service answers for, and its HTTP mapping: ``(status, "<field>: <reason>",
headers)``, one mapping for the FastAPI routes and the plain-ASGI /predict. The bottom of
``service/``: it imports nothing else of the package."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException


class InputError(Exception):
    """A client's mistake: becomes a 4xx answer naming the field and the reason."""

    def __init__(self, field: str, reason: str, status: int = 422):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.status = field, reason, status


class UnknownModel(Exception):
    """404: no such model or version."""


class QueueFull(Exception):
    """The model's queue is at its limit: answer 503 with Retry-After."""


class DeadlineExceeded(Exception):
    """The request's deadline passed while it waited: answer 504."""


class ClientGone(Exception):
    """The client hung up before its batch ran: nobody reads the answer (logged as 499)."""


class BodyTimeout(Exception):
    """The request body did not arrive in time (a 408)."""


class BodyTooLarge(Exception):
    """413: the body streamed past ``max_body_bytes``."""


HANDLED = (InputError, UnknownModel, QueueFull, DeadlineExceeded, ClientGone, BodyTooLarge, BodyTimeout,
           ValidationError, RequestValidationError, HTTPException)  # fmt: skip


def validation_message(errors: list[dict[str, Any]], prefix: str = "") -> str:
    """pydantic errors -> ``"<prefix><field.path>: <reason>; ..."`` (a body-level error: ``body: ...``)."""
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body",)]
        parts.append(f"{prefix}{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def reply_for(e: Exception, timeout_s: float) -> tuple[int, str, dict[str, str] | None] | None:
    """The answer to ``e``: (status, error message, extra headers); None for a server fault (500)."""
    if isinstance(e, InputError):
        return e.status, str(e), None
    if isinstance(e, ValidationError):
        if any(err["type"] == "json_invalid" for err in e.errors()):
            return 400, "body: not valid JSON", None
        return 422, validation_message(e.errors()), None
    if isinstance(e, RequestValidationError):
        return 422, validation_message(e.errors()), None
    if isinstance(e, UnknownModel):
        return 404, str(e), None
    if isinstance(e, QueueFull):
        return 503, str(e), {"Retry-After": "1"}
    if isinstance(e, DeadlineExceeded):
        return 504, f"deadline of {timeout_s:g} s exceeded ({e})", None
    if isinstance(e, BodyTooLarge):
        return 413, str(e), None
    if isinstance(e, BodyTimeout):
        return 408, str(e), {"Connection": "close"}
    if isinstance(e, ClientGone):
        return 499, "client closed the request", None
    if isinstance(e, HTTPException):  # (FastAPI's 405 carries Allow)
        return e.status_code, str(e.detail), dict(e.headers) if e.headers else None
    return None
