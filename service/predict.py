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
import secrets
import time
from typing import Any

import pydantic_core
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request

from .batcher import ClientGone, disconnected, infer
from .errors import reply_for
from .modalities import InputError
from .registry import Registry
from .schemas import PredictRequest
from .settings import Settings

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
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "model": {"type": "string"},
                            "version": {"type": "string"},
                            "ddim_steps": {"type": "integer"},
                            "ensemble": {"type": "integer"},
                            "seed": {"type": "integer"},
                            "return_uncertainty": {"type": "boolean"},
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

    def __init__(self, registry: Registry, settings: Settings):
        self.registry, self.settings = registry, settings

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
        served = self.registry.get(req.model, req.version)
        state["model"] = served.name
        steps = served.check_params(req.ddim_steps, req.ensemble, self.settings)
        # decoding (PIL, FFT resampling, ...) runs off the event loop unless the input is small
        modality = served.modality
        if payload[0] == "upload":
            x = await run_in_threadpool(modality.decode_upload, *payload[1:])
        elif (x := modality.decode_json_inline(payload[1], payload[2])) is None:
            x = await run_in_threadpool(modality.decode_json, payload[1], "input")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**63)
        ((pred, timings, job),) = await infer(
            served.batcher,
            [x],
            steps,
            req.ensemble,
            [seed],
            start + self.settings.timeout_s,
            lambda: disconnected(receive),
        )
        out: dict[str, Any] = {"model": served.name, "version": served.version, **dict.fromkeys(PREDICTION_FIELDS)}
        out.update(modality.encode(pred, req.return_uncertainty))
        out.update(
            ddim_steps=steps,
            ensemble=req.ensemble,
            seed=seed,
            timings={
                "queue_ms": job.queue_s * 1000,
                "inference_ms": sum(timings.values()) * 1000,
                "total_ms": (time.monotonic() - start) * 1000,
                "batch_size": job.batch_size,
                "stages_ms": {k: v * 1000 for k, v in timings.items()},
            },
        )
        return out

    async def parse(self, scope, receive) -> tuple[PredictRequest, tuple]:
        """-> the request, and ("json", input value, body bytes) or ("upload", data, filename, content type)."""
        ctype = ""
        for key, value in scope["headers"]:
            if key == b"content-type":
                ctype = value.decode("latin-1")
        if ctype.startswith("multipart/form-data"):
            form = await Request(scope, receive).form()
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InputError("file", "a multipart request needs the file (image or WAV) in the field 'file'")
            fields: dict[str, Any] = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
            fields["input"] = None
            if "return_uncertainty" in fields:
                fields["return_uncertainty"] = fields["return_uncertainty"].lower() in ("1", "true", "yes")
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
