"""FastAPI app: /predict, the Open Inference Protocol v2, health, /metrics.

A request's way: body -> schema validation -> modality decode -> batcher queue -> engine batch
-> modality encode -> response. Client mistakes are 4xx with ``{"error": "<field>: <reason>"}``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import struct
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

import ocd_core

from . import metrics
from .batcher import DeadlineExceeded, InFlight, Job, QueueFull
from .malloc import tune_malloc
from .modalities import InputError
from .registry import Registry, Served, UnknownModel
from .schemas import (ErrorResponse, PredictRequest, PredictResponse, RenderRequest, Timings, V2InferRequest,
                      V2InferResponse, V2ModelMetadata)
from .settings import Settings

log = logging.getLogger("ocd.service")
ERRORS = {c: {"model": ErrorResponse} for c in (400, 404, 413, 422, 503, 504)}


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            resp = JSONResponse({"error": f"body: {int(declared)} bytes is over the limit of {self.limit} bytes"}, 413)
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


class Count:
    """ASGI middleware: request count and latency by model, route template and status; and
    ``inflight``, the POSTs (inference requests) the app holds, which the batchers read.

    (Pure ASGI, not BaseHTTPMiddleware: that one hides client disconnects from the endpoint.)"""

    def __init__(self, app, inflight: InFlight):
        self.app, self.inflight = app, inflight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
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
            endpoint = getattr(scope.get("route"), "path", "other")
            metrics.REQUESTS.labels(state["model"], endpoint, str(status)).inc()
            metrics.REQUEST_DURATION.labels(state["model"], endpoint).observe(time.monotonic() - start)


V2_DTYPES = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4",
             "INT64": "<i8", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "BOOL": "?"}


def _binary_inputs(inputs: Any, blob: bytes) -> Any:
    """Inputs whose parameters give ``binary_data_size`` take their data from ``blob``, in order."""
    import numpy as np

    if not isinstance(inputs, list):
        return inputs
    out, offset = [], 0
    for t in inputs:
        params = t.get("parameters") if isinstance(t, dict) else None
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            out.append(t)
            continue
        name = t.get("name")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(blob):
            raise InputError(f"inputs[{name}].parameters.binary_data_size", f"{size!r} does not fit the {len(blob)} bytes sent")
        chunk, offset = blob[offset:offset + size], offset + size
        dtype = t.get("datatype")
        if not isinstance(dtype, str):
            raise InputError(f"inputs[{name}].datatype", "must be a string")
        if dtype == "BYTES":  # 4-byte little-endian length, then the bytes, per element
            data, i = [], 0
            while i < len(chunk):
                if i + 4 > len(chunk) or i + 4 + struct.unpack_from("<I", chunk, i)[0] > len(chunk):
                    raise InputError(f"inputs[{name}].data", "BYTES element runs past binary_data_size")
                (k,) = struct.unpack_from("<I", chunk, i)
                data.append(chunk[i + 4:i + 4 + k].decode("utf-8", errors="replace"))
                i += 4 + k
        elif dtype in V2_DTYPES:
            if size % np.dtype(V2_DTYPES[dtype]).itemsize:
                raise InputError(f"inputs[{name}].parameters.binary_data_size", f"{size} is not a whole number of {dtype}")
            data = np.frombuffer(chunk, dtype=V2_DTYPES[dtype]).tolist()
        else:
            raise InputError(f"inputs[{name}].datatype", f"unknown datatype {dtype!r}")
        out.append({**t, "data": data})
    return out


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body",)]
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    if settings.tune_malloc:  # per worker process: batch tensors reuse heap pages instead of faulting in fresh ones
        tune_malloc()
    registry = Registry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry.load()
        yield
        await registry.drain()  # SIGTERM: uvicorn stops accepting, in-flight requests finish, then this

    telemetry = None if settings.otel else {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="OCD Serve", version=ocd_core.__version__, lifespan=lifespan, telemetry=telemetry,
                  description="Per-sample adapted predictions: OCD (Lutati & Wolf) with dynamic batching.")
    app.state.registry, app.state.settings = registry, settings
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    app.add_middleware(Count, inflight=registry.inflight)

    @app.exception_handler(InputError)
    async def _input(_r, e: InputError):
        return _error(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r, e: RequestValidationError):
        return _error(422, _validation_message(e.errors()))

    @app.exception_handler(UnknownModel)
    async def _unknown(_r, e: UnknownModel):
        return _error(404, str(e))

    @app.exception_handler(QueueFull)
    async def _full(_r, e: QueueFull):
        return _error(503, str(e), {"Retry-After": "1"})

    @app.exception_handler(DeadlineExceeded)
    async def _late(_r, e: DeadlineExceeded):
        return _error(504, f"deadline of {settings.timeout_s:g} s exceeded ({e})")

    @app.exception_handler(BodyTooLarge)
    async def _large(_r, e: BodyTooLarge):
        return _error(413, str(e))

    @app.exception_handler(ClientGone)
    async def _gone(_r, e: ClientGone):
        return _error(499, "client closed the request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    async def run(request: Request, served: Served, xs: list, steps: int, ensemble: int, seeds: list[int]):
        """Queue one job per sample and wait for all, the client and the deadline."""
        deadline = request.state.start + settings.timeout_s
        jobs = [Job(x, steps, ensemble, s, deadline, gone=request.is_disconnected, share=1 / len(xs))
                for x, s in zip(xs, seeds)]
        try:
            for j in jobs:
                served.batcher.submit(j)
        except QueueFull:
            for j in jobs:
                j.future.cancel()
            raise
        futures = [j.future for j in jobs]
        _, pending = await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        if pending:
            for f in futures:  # nobody will read these: drop them before they cost inference
                f.cancel()
            raise DeadlineExceeded("no result in time")
        if any(f.cancelled() for f in futures):
            raise ClientGone()  # the batcher saw the client hang up
        return [(*f.result(), j) for f, j in zip(futures, jobs)]

    def check_params(served: Served, steps: int | None, ensemble: int, field_prefix: str = "") -> int:
        steps = served.manifest.serving.ddim_steps if steps is None else steps
        limit = min(settings.max_ddim_steps, served.manifest.schedule.num_train_timesteps)
        if not 1 <= steps <= limit:
            raise InputError(f"{field_prefix}ddim_steps", f"must be between 1 and {limit}, got {steps}")
        if not 1 <= ensemble <= settings.max_ensemble:
            raise InputError(f"{field_prefix}ensemble", f"must be between 1 and {settings.max_ensemble}, got {ensemble}")
        return steps

    def validated(schema: type[PredictRequest] | type[RenderRequest], data: Any):
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None

    def parse_json(body: bytes) -> Any:
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise InputError("body", "not valid JSON", 400) from None

    async def parse_predict(request: Request) -> tuple[PredictRequest, Any]:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InputError("file", "a multipart request needs the file (image or WAV) in the field 'file'")
            fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
            fields["input"] = None
            if "return_uncertainty" in fields:
                fields["return_uncertainty"] = fields["return_uncertainty"].lower() in ("1", "true", "yes")
            req = validated(PredictRequest, fields)
            return req, ("upload", await upload.read(), upload.filename, upload.content_type)
        if not ctype.startswith("application/json"):
            raise InputError("content-type", f"expected application/json or multipart/form-data, got {ctype or 'none'}", 415)
        body = await request.body()
        req = validated(PredictRequest, parse_json(body))
        return req, ("json", req.input, len(body))

    predict_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file", "model"], "properties": {
            "file": {"type": "string", "format": "binary"}, "model": {"type": "string"},
            "version": {"type": "string"}, "ddim_steps": {"type": "integer"}, "ensemble": {"type": "integer"},
            "seed": {"type": "integer"}, "return_uncertainty": {"type": "boolean"}}}}}}}

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=predict_body,
              summary="Adapted prediction for one input (JSON or multipart image upload)")
    async def predict(request: Request) -> PredictResponse:
        req, payload = await parse_predict(request)
        served = registry.get(req.model, req.version)
        request.state.model = served.name
        steps = check_params(served, req.ddim_steps, req.ensemble)
        # decoding (PIL, FFT resampling, ...) runs off the event loop unless the input is small
        if payload[0] == "upload":
            x = await run_in_threadpool(served.modality.decode_upload, payload[1], payload[2], payload[3])
        elif (x := served.modality.decode_json_inline(payload[1], payload[2])) is None:
            x = await run_in_threadpool(served.modality.decode_json, payload[1], "input")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**63)
        ((pred, timings, job),) = await run(request, served, [x], steps, req.ensemble, [seed])
        fields = served.modality.encode(pred, req.return_uncertainty)
        total = time.monotonic() - request.state.start
        return PredictResponse(model=served.name, version=served.version, ddim_steps=steps, ensemble=req.ensemble,
                               seed=seed, **fields, timings=Timings(
                                   queue_ms=job.queue_s * 1000, inference_ms=sum(timings.values()) * 1000,
                                   total_ms=total * 1000, batch_size=job.batch_size,
                                   stages_ms={k: v * 1000 for k, v in timings.items()}))

    render_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/RenderRequest"}}}}}

    @app.post("/render", responses={200: {"content": {"image/png": {}}, "description": "the rendered PNG"}, **ERRORS},
              response_class=Response, openapi_extra=render_body,
              summary="Render a camera pose with a rendering model (tinyNeRF): an adapted prediction as a PNG")
    async def render(request: Request) -> Response:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("application/json"):
            raise InputError("content-type", f"expected application/json, got {ctype or 'none'}", 415)
        req = validated(RenderRequest, parse_json(await request.body()))
        served = registry.get(req.model, req.version)
        request.state.model = served.name
        png = getattr(served.modality, "png", None)
        if png is None:
            raise InputError("model", f"{served.name!r} is a {served.manifest.modality} model; /render serves "
                             "rendering models (pose in, image out): use /predict", 400)
        steps = check_params(served, req.ddim_steps, req.ensemble)
        x = served.modality.decode_json(req.pose, "pose")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**63)
        ((pred, _timings, _job),) = await run(request, served, [x], steps, req.ensemble, [seed])
        data = await run_in_threadpool(png, pred)
        return Response(data, media_type="image/png", headers={
            "X-OCD-Model": served.name, "X-OCD-Version": served.version, "X-OCD-Seed": str(seed),
            "X-OCD-DDIM-Steps": str(steps), "X-OCD-Uncertainty": f"{float(pred.uncertainty.mean()):.6g}"})

    # ---- Open Inference Protocol v2 -------------------------------------------------------
    @app.get("/v2", summary="Server metadata")
    async def v2_server():
        return {"name": "ocd-serve", "version": ocd_core.__version__, "extensions": []}

    @app.get("/v2/health/live", summary="Liveness")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", summary="Readiness: every model loaded", responses={503: {"model": ErrorResponse}})
    async def ready():
        if not registry.ready:
            return _error(503, "models are loading or the server is draining")
        return {"ready": True}

    def metadata(served: Served) -> V2ModelMetadata:
        return V2ModelMetadata(
            name=served.name, versions=sorted(registry.models[served.name]), platform=f"ocd-{served.manifest.denoiser.kind}",
            inputs=served.modality.v2_inputs(), outputs=served.modality.v2_outputs(),
            parameters={"modality": served.manifest.modality, "task": served.manifest.task,
                        "layer": served.manifest.layer, "labels": served.manifest.labels,
                        "default_ddim_steps": served.manifest.serving.ddim_steps})

    @app.get("/v2/models/{name}", response_model=V2ModelMetadata, responses=ERRORS, summary="Model metadata")
    async def model_meta(name: str):
        return metadata(registry.get(name))

    @app.get("/v2/models/{name}/versions/{version}", response_model=V2ModelMetadata, responses=ERRORS)
    async def model_version_meta(name: str, version: str):
        return metadata(registry.get(name, version))

    @app.get("/v2/models/{name}/ready", responses=ERRORS, summary="Model readiness")
    async def model_ready(name: str):
        served = registry.get(name)
        return {"name": served.name, "version": served.version, "ready": registry.ready}

    @app.get("/v2/models/{name}/versions/{version}/ready", responses=ERRORS)
    async def model_version_ready(name: str, version: str):
        served = registry.get(name, version)
        return {"name": served.name, "version": served.version, "ready": registry.ready}

    async def parse_v2(request: Request) -> V2InferRequest:
        """JSON body, or the binary tensor extension (JSON header + raw tensor bytes) that
        Triton's clients send by default. Answers are always JSON tensors."""
        raw = await request.body()
        header_len = request.headers.get("inference-header-content-length")
        try:
            n = int(header_len) if header_len is not None else len(raw)
            if not 0 <= n <= len(raw):
                raise ValueError
        except ValueError:
            raise InputError("Inference-Header-Content-Length", f"must be an integer in [0, {len(raw)}]") from None
        try:
            body = json.loads(raw[:n])
        except (ValueError, RecursionError):
            raise InputError("body", "not valid JSON", 400) from None
        try:
            req = V2InferRequest.model_validate(body if not isinstance(body, dict) else
                                                {**body, "inputs": _binary_inputs(body.get("inputs"), raw[n:])})
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        return req

    async def infer(request: Request, name: str, version: str | None, body: V2InferRequest) -> V2InferResponse:
        served = registry.get(name, version)
        request.state.model = served.name
        params = body.parameters or {}
        for key in params:  # binary_data_output: Triton clients ask for it; answers are always JSON tensors
            if key not in ("ddim_steps", "ensemble", "seed", "binary_data_output"):
                raise InputError(f"parameters.{key}", "unknown parameter; use ddim_steps, ensemble, seed")
        for key in ("ddim_steps", "ensemble", "seed"):
            if key in params and (not isinstance(params[key], int) or isinstance(params[key], bool)):
                raise InputError(f"parameters.{key}", f"must be an integer, got {params[key]!r}")
        steps = check_params(served, params.get("ddim_steps"), params.get("ensemble", 1), "parameters.")
        seed = params.get("seed")
        if seed is not None and not 0 <= seed < 2**63 - 2**20:
            raise InputError("parameters.seed", "must be between 0 and 2**63 - 2**20")
        xs = await run_in_threadpool(served.modality.decode_v2, [t.model_dump() for t in body.inputs])
        if not xs:
            raise InputError("inputs", "holds no samples")
        if len(xs) > settings.max_queue:
            raise InputError("inputs", f"{len(xs)} samples in one request; the limit is {settings.max_queue}", 413)
        base_seed = seed if seed is not None else secrets.randbelow(2**62)
        results = await run(request, served, xs, steps, params.get("ensemble", 1),
                            [base_seed + i for i in range(len(xs))])
        outputs = served.modality.encode_v2([r[0] for r in results])
        if body.outputs:
            wanted = {o.name for o in body.outputs}
            outputs = [o for o in outputs if o["name"] in wanted]
        return V2InferResponse(model_name=served.name, model_version=served.version, id=body.id, outputs=outputs,
                               parameters={"ddim_steps": steps, "seed": base_seed})

    v2_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}}}}}

    @app.post("/v2/models/{name}/infer", response_model=V2InferResponse, responses=ERRORS, summary="Inference (v2)",
              openapi_extra=v2_body)
    async def v2_infer(name: str, request: Request):
        return await infer(request, name, None, await parse_v2(request))

    @app.post("/v2/models/{name}/versions/{version}/infer", response_model=V2InferResponse, responses=ERRORS,
              openapi_extra=v2_body)
    async def v2_infer_version(name: str, version: str, request: Request):
        return await infer(request, name, version, await parse_v2(request))

    def openapi() -> dict[str, Any]:
        """The generated spec plus the request bodies that /predict (JSON or multipart) and the v2
        infer routes (JSON or the binary tensor extension) parse themselves."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for model in (PredictRequest, RenderRequest, V2InferRequest):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                spec["components"]["schemas"].update(schema.pop("$defs", {}))
                spec["components"]["schemas"][model.__name__] = schema
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    return app
