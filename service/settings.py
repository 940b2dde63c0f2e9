"""Service settings, all from ``OCD_*`` environment variables (the table in docs/serving.md)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, ValidationError


class Settings(BaseModel):
    models_dir: str = Field("models", description="model repository: <dir>/<name>/<version>/manifest.json")
    models: str = Field(
        "",
        description="comma list of name or name:version to serve (empty: every model; "
        "a bare name: all its versions; requests default to the latest)",
    )
    version_policy: str = Field(
        "all",
        pattern=r"^(all|latest:[1-9][0-9]*|specific:[^,\s]+(,[^,\s]+)*)$",
        description="versions of each model to serve: all, latest:N (the N highest) or specific:a,b "
        "(Triton's version_policy; an OCD_MODELS entry name:version pins one)",
    )
    repository_key: str = Field(
        "",
        description="key for the repository control endpoints (load, unload); they answer 403 while it "
        "is empty and need 'Authorization: Bearer <key>' once set",
    )
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes")
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:N")
    backend: Literal["torch", "onnx"] = Field(
        "torch",
        description="torch, or onnx: ONNX Runtime on the bundle's "
        "exported graphs (`ocd export-onnx <bundle dir>` writes them)",
    )
    allow_modules: str = Field(
        "",
        description="comma list of packages whose classes bundles may name as their architecture "
        "(`package.module:Class`); nothing else is imported",
    )
    max_batch_size: int = Field(64, ge=1, description="requests per batch (1 turns batching off)")
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="how long a batch waits for more requests after its first "
        "(not at all once the batch holds every inference request the server holds)",
    )
    max_queue: int = Field(1024, ge=1, description="queued requests per model; beyond it: 503 + Retry-After")
    max_inflight: int = Field(
        256,
        ge=1,
        description="inference requests (POSTs) the server works on at once, from reading the body to "
        "the answer; more wait their turn unread (load shedding at the edge)",
    )
    max_waiting: int = Field(4096, ge=0, description="requests waiting for a turn; beyond it: 503 + Retry-After")
    admission_wait_s: float = Field(
        1.0, ge=0, description="how long a request waits for a turn; beyond it: 503 + Retry-After"
    )
    timeout_s: float = Field(30.0, gt=0, description="deadline per request, queue time included; beyond it: 504")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request body limit; beyond it: 413")
    read_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers, and then its body, must arrive within this; beyond it 408"
    )
    batch_memory_mb: int = Field(
        1024,
        ge=1,
        description="memory a batch may take in inference, from one sample's measured at load: "
        "batches hold at most the samples that fit, and larger ensembles run in chunks that fit",
    )
    max_ensemble: int = Field(32, ge=1)
    max_ddim_steps: int = Field(100, ge=1)
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    inference_process: bool = Field(
        True,
        description="run the models in a separate inference process, so that "
        "inference and the event loop do not share a GIL (false: on a "
        "thread of each server process)",
    )
    watchdog_s: float = Field(
        30.0,
        gt=0,
        description="an inference process that has not answered a batch this long after the batch's "
        "deadline hangs: it is killed and a new one started",
    )
    tune_malloc: bool = Field(
        True,
        description="glibc malloc keeps batch-sized blocks instead of returning them "
        "to the OS (service/malloc.py; up to 64 MiB stays with a heap)",
    )
    access_log: bool = Field(
        False,
        description="uvicorn's access log, a line per request (off: /metrics counts "
        "requests by model, endpoint and status; the log costs ~5 % of "
        "the event loop's time per request)",
    )
    otel: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry through the global providers (off: "
        "Prometheus /metrics only, and no provider lookup per request)",
    )

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        """Read ``OCD_<FIELD>`` for every field; explicit overrides win."""
        values = {
            name: os.environ[f"OCD_{name.upper()}"] for name in cls.model_fields if f"OCD_{name.upper()}" in os.environ
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as e:
            raise SystemExit(f"invalid OCD_* setting: {e}") from None

    def allowed_modules(self) -> list[str]:
        from ocd_core.nets.user import parse_allow

        return parse_allow(self.allow_modules)

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
