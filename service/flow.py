"""One request flow for every inference endpoint (/predict, /render, v2 infer):

    model lookup -> parameter checks -> decode -> infer -> encode

An endpoint only parses its own body into a ``Target`` (model, version) and ``Params`` (ddim_steps,
ensemble, seed; schemas.py: the same strict types everywhere), picks its modality's decoder, and
encodes the predictions its own way. Everything between is here, written once.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from .batcher import Job, disconnected, infer
from .errors import InputError
from .registry import Registry, Served
from .schemas import MAX_SEED, Params
from .settings import Settings


@dataclass
class Call:
    """A request's checked parameters: DDIM steps (0: the base model alone), ensemble size, seed
    (sample i uses seed + i) and the name of the mode they make."""

    served: Served
    steps: int
    ensemble: int
    seed: int
    mode: str


@dataclass
class Result:
    """A request's predictions, one per sample, with their batches' stage timings and jobs."""

    call: Call
    preds: list[Any]
    timings: list[dict[str, float]]
    jobs: list[Job]
    start: float


class Flow:
    def __init__(self, registry: Registry, settings: Settings):
        self.registry, self.settings = registry, settings

    def lookup(self, model: str, version: str | None, state: Any) -> Served:
        """The served model version (UnknownModel: 404); records the model for the request metrics and
        holds the version until the answer (``Served.active``)."""
        served = self.registry.get(model, version)
        if not isinstance(state, dict):
            state = state._state  # (starlette's State: the scope's state dict)
        state["model"] = served.name
        if "served" not in state:  # held until the answer (middleware.Count): an unload waits for it
            served.active += 1
            state["served"] = served
        return served

    def limits(self, served: Served) -> tuple[int, int]:
        """The most ddim_steps and ensemble members a request may ask of this model: the server's
        limits, the schedule's training steps, and the model's own (its manifest's ``serving``)."""
        s, serving = self.settings, served.manifest.serving
        steps = min(s.max_ddim_steps, served.manifest.schedule.num_train_timesteps, serving.max_ddim_steps or 10**9)
        return steps, min(s.max_ensemble, serving.max_ensemble or 10**9)

    def check(self, served: Served, params: Params, prefix: str = "") -> Call:
        """Parameters against the model and the server's limits (one message style, every endpoint).

        The mode: the one named, else the model's default (chosen on its val split); ddim_steps and
        ensemble override an adapted mode's own (given with a base-model default, they ask for an
        adapted prediction: the ``ocd`` mode's)."""
        serving, modes = served.manifest.serving, served.modes
        explicit = params.ddim_steps is not None or params.ensemble is not None
        name = serving.mode if params.mode is None else params.mode
        if params.mode is None and explicit and modes[name].ddim_steps == 0:
            name = "ocd"  # parameters of an adapted prediction, and the default is the base model
        if name not in modes:
            raise InputError(f"{prefix}mode", f"unknown mode {name!r}; {served.name} has {sorted(modes)}")
        mode = modes[name]
        if mode.ddim_steps == 0 and explicit:
            raise InputError(f"{prefix}mode", f"{name!r} is the base model alone: it takes no ddim_steps or ensemble")
        steps = mode.ddim_steps if params.ddim_steps is None else params.ddim_steps
        ensemble = mode.ensemble if params.ensemble is None else params.ensemble
        steps_limit, ensemble_limit = self.limits(served)
        for field, value, top, given in (
            ("ddim_steps", steps, steps_limit, params.ddim_steps is not None),
            ("ensemble", ensemble, ensemble_limit, params.ensemble is not None),
        ):
            if mode.ddim_steps and not 1 <= value <= top:
                if not given:  # the mode's own value: name the mode and the server's limit, not a field never sent
                    raise InputError(
                        f"{prefix}mode",
                        f"{name!r} runs {field} {value}, over this server's limit of {top}; name another mode",
                    )
                raise InputError(f"{prefix}{field}", f"must be between 1 and {top}, got {value}")
        if params.seed is not None and not 0 <= params.seed < MAX_SEED:
            raise InputError(f"{prefix}seed", f"must be between 0 and {MAX_SEED - 1}, got {params.seed}")
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED)
        return Call(served, steps, ensemble, seed, served.mode_name(steps, ensemble))

    async def decode(self, fn: Callable[..., Any], *args: Any, inline: Any = None) -> Any:
        """``fn(*args)`` off the event loop (PIL, FFT resampling, ...), unless the caller decoded
        ``inline`` already (a small input: the hop to a thread costs more than the work)."""
        return inline if inline is not None else await run_in_threadpool(fn, *args)

    async def infer(
        self, call: Call, xs: list[torch.Tensor], start: float, receive: Callable[[], Awaitable[dict]]
    ) -> Result:
        """Queue the samples on the model's batcher and wait for their predictions (deadline:
        ``start + timeout_s``; a client that hangs up is dropped before its batch runs)."""
        if not xs:
            raise InputError("inputs", "holds no samples")
        if len(xs) > self.settings.max_queue:
            raise InputError("inputs", f"{len(xs)} samples in one request; the limit is {self.settings.max_queue}", 413)
        seeds = [call.seed + i for i in range(len(xs))]
        out = await infer(
            call.served.batcher,
            xs,
            call.steps,
            call.ensemble,
            seeds,
            start + self.settings.timeout_s,
            lambda: disconnected(receive),
        )
        preds, timings, jobs = (list(t) for t in zip(*out))
        return Result(call, preds, timings, jobs, start)

    @staticmethod
    def timings(result: Result) -> dict[str, Any]:
        """A one-sample request's timings, as /predict reports them."""
        job, stages = result.jobs[0], result.timings[0]
        return {
            "queue_ms": job.queue_s * 1000,
            "inference_ms": sum(stages.values()) * 1000,
            "total_ms": (time.monotonic() - result.start) * 1000,
            "batch_size": job.batch_size,
            "stages_ms": {k: v * 1000 for k, v in stages.items()},
        }
