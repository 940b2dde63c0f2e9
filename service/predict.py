"""``POST /predict``, the hot path, in plain ASGI ahead of FastAPI.

FastAPI's layers (its middleware stack, router, dependency solving, response validation) cost
more event-loop time per request than everything else a request needs here, and the event loop
bounds batched throughput. So ``Front`` sends ``POST /predict`` to ``PredictEndpoint`` and every
other request to the FastAPI app. The endpoint keeps FastAPI's contract: the request is validated
by the ``PredictRequest`` model, the answer has the ``PredictResponse`` fields, errors use the
shared mapping (``errors.reply_for``), and /docs describes it (``app.openapi``).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import pydantic_core
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from .errors import ClientGone, InputError, reply_for
from .flow import Flow
from .schemas import PredictRequest

log = logging.getLogger("ocd.service")
PREDICTION_FIELDS = ("label", "probabilities", "value", "image", "uncertainty")  # PredictResponse's order


def _ref(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


PREDICT_OPENAPI = {
    "post": {  # /predict in /openapi.json and /docs
        "summary": "Adapted prediction for one input (JSON or multipart image upload)",
        "operationId": "predict",
        "requestBody": {
            "required": True,
            "content": {
                **_ref("PredictRequest"),
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "model"],
                        "properties": {  # the JSON body's fields and bounds, the file instead of input
                            "file": {"type": "string", "format": "binary"},
                            **{
                                k: v
                                for k, v in PredictRequest.model_json_schema()["properties"].items()
                                if k != "input"
                            },
                        },
                    }
                },
            },
        },
        "responses": {
            "200": {"description": "the adapted prediction", "content": _ref("PredictResponse")},
            **{
                str(code): {"description": why, "content": _ref("ErrorResponse")}
                for code, why in (
                    (400, "unreadable body or input"),
                    (404, "unknown model or version"),
                    (413, "body too large"),
                    (415, "unsupported content type"),
                    (422, "invalid field"),
                    (503, "queue full (Retry-After)"),
                    (504, "deadline exceeded"),
                )
            },
        },
    }
}


def json_reply(status: int, content: Any, headers: dict[str, str] | None = None) -> tuple[int, bytes, list]:
    body = pydantic_core.to_json(content, inf_nan_mode="null")  # as pydantic writes PredictResponse
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, body, head


async def send_reply(send, status: int, body: bytes, head: list) -> None:
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class PredictEndpoint:
    """``POST /predict``: a JSON ``PredictRequest``, or a multipart upload (the file in ``file``,
    the other fields as form fields) -> a ``PredictResponse`` or ``{"error": ...}``."""

    def __init__(self, flow: Flow):
        self.flow, self.settings = flow, flow.settings

    async def __call__(self, scope, receive, send) -> None:
        state = scope.setdefault("state", {})
        state["endpoint"] = "/predict"
        start = state.get("start") or time.monotonic()
        try:
            status, body, head = json_reply(200, await self.predict(scope, receive, state, start))
        except Exception as e:
            reply = reply_for(e, self.settings.timeout_s)
            if reply is None:
                log.exception("POST /predict failed")
                reply = (500, "internal server error", None)
            status, body, head = json_reply(reply[0], {"error": reply[1]}, reply[2])
        await send_reply(send, status, body, head)

    async def predict(self, scope, receive, state: dict, start: float) -> dict[str, Any]:
        req, payload = await self.parse(scope, receive)
        flow = self.flow
        served = flow.lookup(req.model, req.version, state)
        call = flow.check(served, req)
        modality = served.modality
        if payload[0] == "upload":
            x = await flow.decode(modality.decode_upload, *payload[1:])
        else:
            x = await flow.decode(modality.decode_json, payload[1], "input",
                                  inline=modality.decode_json_inline(payload[1], payload[2]))  # fmt: skip
        result = await flow.infer(call, [x], start, receive)
        out: dict[str, Any] = {"model": served.name, "version": served.version, **dict.fromkeys(PREDICTION_FIELDS)}
        out.update(modality.encode(result.preds[0], req.return_uncertainty))
        out.update(mode=call.mode, ddim_steps=call.steps, ensemble=call.ensemble, seed=call.seed)
        out["timings"] = flow.timings(result)
        return out

    async def parse(self, scope, receive) -> tuple[PredictRequest, tuple]:
        """-> the request, and ("json", input value, body bytes) or ("upload", data, filename, content type)."""
        ctype = ""
        for key, value in scope["headers"]:
            if key == b"content-type":
                ctype = value.decode("latin-1")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await Request(scope, receive).form()
            except ClientDisconnect:
                raise ClientGone() from None
            except (KeyError, ValueError, MultiPartException) as e:  # no boundary (KeyError), a malformed part
                reason = (
                    "the content-type names no boundary"
                    if isinstance(e, KeyError)
                    else e.message
                    if isinstance(e, MultiPartException)
                    else str(e) or type(e).__name__
                )
                raise InputError("body", f"not a readable multipart/form-data body ({reason})", 400) from None
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InputError("file", "a multipart request needs the file (image or WAV) in the field 'file'")
            fields = {k: form_value(k, v) for k, v in form.items() if k != "file" and isinstance(v, str)}
            fields["input"] = None
            req = PredictRequest.model_validate(fields)
            return req, ("upload", await upload.read(), upload.filename, upload.content_type)
        if not ctype.startswith("application/json"):
            raise InputError(
                "content-type", f"expected application/json or multipart/form-data, got {ctype or 'none'}", 415
            )
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        req = PredictRequest.model_validate_json(body)
        return req, ("json", req.input, len(body))


INT_FIELDS = {"ddim_steps", "ensemble", "seed"}
BOOL_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def form_value(key: str, value: str) -> Any:
    """A multipart form field (always text) -> the JSON value it stands for: integers for the
    integer fields, true/false for return_uncertainty; anything else stays text (and fails the
    schema's strict types with the same message as in JSON)."""
    if key in INT_FIELDS and re.fullmatch(r"-?[0-9]{1,20}", value.strip()):
        return int(value)
    if key == "return_uncertainty" and value.strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[value.strip().lower()]
    return value


class Front:
    """The served ASGI app: ``POST /predict`` -> ``predict``, everything else (lifespan included) -> ``app``."""

    def __init__(self, app, predict: PredictEndpoint):
        self.app, self.predict = app, predict

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/predict":
            if scope["method"] == "POST":
                return await self.predict(scope, receive, send)
            return await send_reply(
                send,
                *json_reply(405, {"error": f"method: {scope['method']} is not allowed; use POST"}, {"Allow": "POST"}),
            )
        return await self.app(scope, receive, send)
