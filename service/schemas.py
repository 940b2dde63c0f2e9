"""Typed request and response bodies (they make the OpenAPI docs at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 2**20  # sample i of a request uses seed + i: room for a v2 request's samples


class Params(BaseModel):
    """How to predict, the same fields with the same rules on every endpoint: strict integers (no
    "5", no true), ranges checked by ``Flow.check`` against the model and the server's limits."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    mode: str | None = Field(
        None,
        description='serving mode: "base" (the base model alone), "ocd" (one adapted sample), "ocd_ensemble", ... '
        "(GET /v2/models/{name} lists a model's modes with their val gains); the model's default, chosen on "
        "its val split, when null",
    )
    ddim_steps: int | None = Field(
        None,
        strict=True,
        json_schema_extra={"minimum": 1},
        description="DDIM steps of an adapted prediction; the mode's when null",
    )
    ensemble: int | None = Field(
        None,
        strict=True,
        json_schema_extra={"minimum": 1},
        description="adapted models sampled with different noise, their mean the answer; the mode's (or 1) when null",
    )
    seed: int | None = Field(
        None,
        strict=True,
        json_schema_extra={"minimum": 0, "exclusiveMaximum": MAX_SEED},
        description="noise seed; random when null (the response says which); sample i of a batch uses seed + i",
    )


class Target(Params):
    model: str = Field(description="model name, e.g. mnist")
    version: str | None = Field(None, description="model version; latest when null")


class PredictRequest(Target):
    input: Any = Field(
        description="image: base64 PNG/JPEG or a nested array of the model's input shape "
        "(pixel values in [0, 1]); tabular: an object of named fields, "
        'e.g. {"carat": 0.3, "cut": "Ideal", ...}; audio: a base64 WAV'
    )
    return_uncertainty: bool = True


class RenderRequest(Target):
    pose: Any = Field(
        description='{"azimuth": degrees, "elevation": degrees, "radius": r} or [azimuth, elevation, radius]'
    )


class V2Parameters(Params):
    binary_data_output: bool | None = Field(None, description="Triton clients send it; answers are JSON tensors")


class Timings(BaseModel):
    queue_ms: float = Field(description="time waiting for a batch")
    inference_ms: float = Field(description="the batch's inference time (base + DDIM + adapt)")
    total_ms: float
    batch_size: int = Field(description="requests that shared the batch")
    stages_ms: dict[str, float] = Field(description="the batch's time per stage: base, ddim, adapt")


class PredictResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    version: str
    label: str | None = Field(None, description="classification: the ensemble's most probable label")
    probabilities: dict[str, float] | None = Field(None, description="classification: ensemble mean per label")
    value: list[float] | float | None = Field(None, description="regression: ensemble mean")
    image: str | None = Field(None, description="rendering models (pose in): the ensemble mean as a base64 PNG")
    uncertainty: float | list[float] | None = Field(
        None, description="classification: predictive entropy of the ensemble mean (nats); regression: ensemble std"
    )
    mode: str = Field(description='the mode that answered: "base", "ocd", "ocd_ensemble", ... or "custom"')
    ddim_steps: int = Field(description="0: the base model alone")
    ensemble: int
    seed: int
    timings: Timings


class ErrorResponse(BaseModel):
    error: str


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: V2Parameters | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Tensor]


class V2TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMeta]
    outputs: list[V2TensorMeta]
    parameters: dict[str, Any] | None = None
