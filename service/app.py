"""The served app: /predict (plain ASGI, ``service.predict``), and in FastAPI /render, the Open
Inference Protocol v2, health, /metrics and the docs.

A request's way: body -> schema validation -> modality decode -> batcher queue -> engine batch
-> modality encode -> response. Client mistakes are 4xx with ``{"error": "<field>: <reason>"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import struct
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

import ocd_core
from ocd_core.bundle import BundleError

from . import metrics
from .errors import HANDLED, InputError, reply_for
from .flow import Flow
from .gcfreeze import freeze_heap
from .malloc import tune_malloc
from .middleware import Admission, BodyLimit, Count
from .predict import PREDICT_OPENAPI, Front, PredictEndpoint
from .registry import Registry, Served, version_key
from .schemas import (
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    RenderRequest,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2Parameters,
)
from .settings import Settings

log = logging.getLogger("ocd.service")
ERRORS = {c: {"model": ErrorResponse} for c in (400, 404, 413, 422, 503, 504)}


V2_DTYPES = {
    "FP32": "<f4",
    "FP64": "<f8",
    "FP16": "<f2",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "BOOL": "?",
}


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
            raise InputError(
                f"inputs[{name}].parameters.binary_data_size", f"{size!r} does not fit the {len(blob)} bytes sent"
            )
        chunk, offset = blob[offset : offset + size], offset + size
        dtype = t.get("datatype")
        if not isinstance(dtype, str):
            raise InputError(f"inputs[{name}].datatype", "must be a string")
        if dtype == "BYTES":  # 4-byte little-endian length, then the bytes, per element
            data, i = [], 0
            while i < len(chunk):
                if i + 4 > len(chunk) or i + 4 + struct.unpack_from("<I", chunk, i)[0] > len(chunk):
                    raise InputError(f"inputs[{name}].data", "BYTES element runs past binary_data_size")
                (k,) = struct.unpack_from("<I", chunk, i)
                data.append(chunk[i + 4 : i + 4 + k].decode("utf-8", errors="replace"))
                i += 4 + k
        elif dtype in V2_DTYPES:
            if size % np.dtype(V2_DTYPES[dtype]).itemsize:
                raise InputError(
                    f"inputs[{name}].parameters.binary_data_size", f"{size} is not a whole number of {dtype}"
                )
            data = np.frombuffer(chunk, dtype=V2_DTYPES[dtype]).tolist()
        else:
            raise InputError(f"inputs[{name}].datatype", f"unknown datatype {dtype!r}")
        out.append({**t, "data": data})
    return out


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(settings: Settings | None = None) -> Count:
    """The ASGI app uvicorn serves: Count(Admission(BodyLimit(Front(/predict | FastAPI)))); ``.api`` is
    the FastAPI app."""
    settings = settings or Settings.from_env()
    if settings.tune_malloc:  # per worker process: batch tensors reuse heap pages instead of faulting in fresh ones
        tune_malloc()
    registry = Registry(settings)
    flow = Flow(registry, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry.load()
        freeze_heap()
        loop = asyncio.get_running_loop()
        rescans: set[asyncio.Task] = set()

        def rescan() -> None:  # SIGHUP: load what the repository holds now
            task = loop.create_task(registry.rescan())
            rescans.add(task)
            task.add_done_callback(rescans.discard)

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # (not on Windows / a thread)
            loop.add_signal_handler(signal.SIGHUP, rescan)
        yield
        await registry.drain()  # SIGTERM: uvicorn stops accepting, in-flight requests finish, then this

    telemetry = None if settings.otel else {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(
        title="OCD Serve",
        version=ocd_core.__version__,
        lifespan=lifespan,
        telemetry=telemetry,
        description="Per-sample adapted predictions: OCD (Lutati & Wolf) with dynamic batching.",
    )
    app.state.registry, app.state.settings = registry, settings

    async def _handled(_r, e: Exception):
        status, message, headers = reply_for(e, settings.timeout_s)
        return _error(status, message, headers)

    for exc in HANDLED:  # (not pydantic's ValidationError: here only our own responses raise it, a 500)
        if exc is not ValidationError:
            app.add_exception_handler(exc, _handled)

    def validated(schema: type[BaseModel], data: Any):
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None

    def parse_json(body: bytes) -> Any:
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise InputError("body", "not valid JSON", 400) from None

    render_body = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RenderRequest"}}},
        }
    }

    @app.post(
        "/render",
        responses={200: {"content": {"image/png": {}}, "description": "the rendered PNG"}, **ERRORS},
        response_class=Response,
        openapi_extra=render_body,
        summary="Render a camera pose with a rendering model (tinyNeRF): an adapted prediction as a PNG",
    )
    async def render(request: Request) -> Response:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("application/json"):
            raise InputError("content-type", f"expected application/json, got {ctype or 'none'}", 415)
        req = validated(RenderRequest, parse_json(await request.body()))
        served = flow.lookup(req.model, req.version, request.state)
        if not served.modality.renders:
            raise InputError(
                "model",
                f"{served.name!r} is a {served.manifest.modality} model; /render serves "
                "rendering models (pose in, image out): use /predict",
                400,
            )
        call = flow.check(served, req)
        x = served.modality.decode_json(req.pose, "pose")
        result = await flow.infer(call, [x], request.state.start, request.receive)
        pred = result.preds[0]
        data = await run_in_threadpool(served.modality.output.png, pred)
        return Response(
            data,
            media_type="image/png",
            headers={
                "X-OCD-Model": served.name,
                "X-OCD-Version": served.version,
                "X-OCD-Seed": str(call.seed),
                "X-OCD-Mode": call.mode,
                "X-OCD-DDIM-Steps": str(call.steps),
                "X-OCD-Ensemble": str(call.ensemble),
                "X-OCD-Uncertainty": f"{float(pred.uncertainty.mean()):.6g}",
            },
        )

    # ---- Open Inference Protocol v2 -------------------------------------------------------
    @app.get("/v2", summary="Server metadata")
    async def v2_server():
        return {"name": "ocd-serve", "version": ocd_core.__version__, "extensions": ["binary_tensor_data"]}

    @app.post("/v2/repository/index", summary="The served models (Triton's repository index)")
    async def repository_index(request: Request):
        body = parse_json(await request.body()) if await request.body() else {}
        if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
            raise InputError("ready", "expected a boolean")
        state = "READY" if registry.ready else "UNAVAILABLE"
        if body.get("ready") and state != "READY":
            return []
        return [
            {"name": name, "version": v, "state": state, "reason": "" if registry.ready else "loading or draining"}
            for name in sorted(registry.models)
            for v in sorted(registry.models[name], key=version_key)
        ]

    def operator(request: Request) -> None:
        """The repository control endpoints: off (403) without OCD_REPOSITORY_KEY, else its bearer key."""
        if not settings.repository_key:
            raise InputError("authorization", "repository control is off on this server (set OCD_REPOSITORY_KEY)", 403)
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            raise InputError("authorization", "expected 'Authorization: Bearer <key>'", 401)
        if not hmac.compare_digest(given[7:].encode(), settings.repository_key.encode()):
            raise InputError("authorization", "wrong key", 403)

    @app.post(
        "/v2/repository/models/{name}/load",
        summary="Load or reload a model from the repository (its versions under OCD_VERSION_POLICY); operators only",
        responses={**ERRORS, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
    )
    async def repository_load(name: str, request: Request):
        operator(request)
        try:
            versions = await registry.load_model(name)
        except BundleError as e:
            raise InputError("model", f"{name} did not load, and what served before still does: {e}", 400) from None
        return {"name": name, "versions": versions}

    @app.post(
        "/v2/repository/models/{name}/unload",
        summary="Stop serving a model (requests in flight finish first); operators only",
        responses={**ERRORS, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
    )
    async def repository_unload(name: str, request: Request):
        operator(request)
        await registry.unload_model(name)
        return {"name": name, "versions": []}

    @app.get("/v2/health/live", summary="Liveness")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", summary="Readiness: every model loaded", responses={503: {"model": ErrorResponse}})
    async def ready():
        if not registry.ready:
            return _error(503, "models are loading or the server is draining")
        return {"ready": True}

    def metadata(served: Served) -> V2ModelMetadata:
        max_steps, max_ensemble = flow.limits(served)
        return V2ModelMetadata(
            name=served.name,
            versions=sorted(registry.models[served.name], key=version_key),
            platform=f"ocd-{served.manifest.denoiser.kind}",
            inputs=served.modality.v2_inputs(),
            outputs=served.modality.v2_outputs(),
            parameters={
                "modality": served.manifest.modality,
                "task": served.manifest.task,
                "layer": served.manifest.layer,
                "labels": served.manifest.labels,
                "default_ddim_steps": served.manifest.serving.ddim_steps,
                "default_mode": served.manifest.serving.mode,
                "default_mode_chosen": served.manifest.serving.chosen,
                "modes": {k: m.model_dump() for k, m in served.manifest.serving.all_modes().items()},
                "max_ddim_steps": max_steps,
                "max_ensemble": max_ensemble,
            },
        )

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
        Triton's clients send by default (with no content type, or application/octet-stream).
        Answers are always JSON tensors."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype not in ("", "application/json", "application/octet-stream"):
            raise InputError(
                "content-type", f"expected application/json (or application/octet-stream), got {ctype}", 415
            )
        raw = await request.body()
        header_len = request.headers.get("inference-header-content-length")
        try:
            n = int(header_len) if header_len is not None else len(raw)
            if not 0 <= n <= len(raw):
                raise ValueError
        except ValueError:
            raise InputError("Inference-Header-Content-Length", f"must be an integer in [0, {len(raw)}]") from None
        body = parse_json(raw[:n])
        return validated(
            V2InferRequest,
            body if not isinstance(body, dict) else {**body, "inputs": _binary_inputs(body.get("inputs"), raw[n:])},
        )

    async def infer_v2(request: Request, name: str, version: str | None, body: V2InferRequest) -> V2InferResponse:
        served = flow.lookup(name, version, request.state)
        inputs = [t.model_dump() for t in body.inputs]
        call = flow.check(served, body.parameters or V2Parameters(), "parameters.")
        xs = await flow.decode(served.modality.decode_v2, inputs)
        result = await flow.infer(call, xs, request.state.start, request.receive)
        outputs = served.modality.encode_v2(result.preds)
        if body.outputs:
            wanted = {o.name for o in body.outputs}
            outputs = [o for o in outputs if o["name"] in wanted]
        return V2InferResponse(
            model_name=served.name,
            model_version=served.version,
            id=body.id,
            outputs=outputs,
            parameters={"mode": call.mode, "ddim_steps": call.steps, "ensemble": call.ensemble, "seed": call.seed},
        )

    v2_body = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}}},
        }
    }

    @app.post(
        "/v2/models/{name}/infer",
        response_model=V2InferResponse,
        responses=ERRORS,
        summary="Inference (v2)",
        openapi_extra=v2_body,
    )
    async def v2_infer(name: str, request: Request):
        return await infer_v2(request, name, None, await parse_v2(request))

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        response_model=V2InferResponse,
        responses=ERRORS,
        openapi_extra=v2_body,
    )
    async def v2_infer_version(name: str, version: str, request: Request):
        return await infer_v2(request, name, version, await parse_v2(request))

    def openapi() -> dict[str, Any]:
        """The generated spec, plus /predict (served ahead of FastAPI) and the request bodies that
        the v2 infer routes (JSON or the binary tensor extension) parse themselves."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            spec["paths"] = {"/predict": PREDICT_OPENAPI, **spec["paths"]}
            for model in (PredictRequest, PredictResponse, ErrorResponse, RenderRequest, V2InferRequest):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                spec["components"]["schemas"].update(schema.pop("$defs", {}))
                spec["components"]["schemas"][model.__name__] = schema
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {}}, "description": "the exposition format"}},
        response_class=Response,
    )
    async def prometheus():
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    front = Front(app, PredictEndpoint(flow))
    limited = BodyLimit(front, settings.max_body_bytes, settings.read_timeout_s)
    s = settings
    served = Count(Admission(limited, registry.inflight, s.max_inflight, s.max_waiting, s.admission_wait_s))
    served.api = app
    return served
