"""The model repository at run time: every served (name, version), its engine and batcher."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ocd_core.bundle import BundleError, Manifest, ServingMode, list_versions, read_manifest

from . import metrics
from .batcher import Batcher, InFlight
from .errors import UnknownModel
from .modalities import Modality, modality_for
from .settings import Settings
from .worker import InferenceProcess, LocalEngine, build_engine

log = logging.getLogger("ocd.service")


@dataclass
class Served:
    name: str
    version: str
    manifest: Manifest
    modality: Modality
    batcher: Batcher
    modes: dict[str, ServingMode] = field(init=False)  # the manifest's, built once: Flow.check reads them per request
    active: int = field(default=0, init=False)  # requests that looked it up and are not answered (unload waits)
    mode_name: Callable[[int, int], str] = field(init=False)  # ServingDefaults.name_of, cached

    def __post_init__(self) -> None:
        serving = self.manifest.serving
        self.modes = serving.all_modes()
        self.mode_name = functools.lru_cache(maxsize=256)(serving.name_of)


def version_key(v: str) -> tuple[int, int, str]:
    """Numeric versions in numeric order ("latest" is the highest), then named ones."""
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def apply_policy(versions: list[str], policy: str) -> list[str]:
    """The versions a version policy serves (Triton's ``version_policy``): ``all``, ``latest:N`` (the
    N highest) or ``specific:a,b`` (those of them that exist)."""
    ordered = sorted(versions, key=version_key)
    if policy == "all":
        return ordered
    kind, _, arg = policy.partition(":")
    if kind == "latest":
        return ordered[-int(arg) :]
    wanted = {v.strip() for v in arg.split(",")}
    return [v for v in ordered if v in wanted]


class Registry:
    """Every served (name, version) and its engine. Models load at start; ``load_model`` /
    ``unload_model`` (the repository endpoints) and ``rescan`` (SIGHUP) change the set while traffic
    flows: a new version serves before an old one leaves, and one leaves only once no request holds
    it (``Served.active``) and its queue is empty; a load that fails leaves what serves as it was."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.inflight = InFlight()  # shared by the app (counting) and every batcher (reading)
        self.models: dict[str, dict[str, Served]] = {}
        self.hosts: dict[str, InferenceProcess | LocalEngine] = {}  # label -> what runs its engine
        self.processes: list[InferenceProcess] = []
        self.ready = False
        self._lock: asyncio.Lock | None = None  # one repository change at a time (made on the event loop)

    def _pinned_names(self) -> list[str]:
        return [m.strip().split(":", 1)[0] for m in self.settings.models.split(",") if m.strip()]

    def _versions(self, name: str) -> list[str]:
        """Versions of ``name`` to serve: those on disk under the version policy (and OCD_MODELS)."""
        root = Path(self.settings.models_dir)
        versions = list_versions(root, name)
        pinned = [m.strip().split(":", 1) for m in self.settings.models.split(",") if m.strip()]
        named = [p for p in pinned if p[0] == name]
        if pinned and not named:
            raise UnknownModel(f"model {name!r} is not among OCD_MODELS ({self.settings.models})")
        if any(len(p) > 1 for p in named):
            missing = [p[1] for p in named if len(p) > 1 and p[1] not in versions]
            if missing:
                raise BundleError(f"{root / name / missing[0]}: no such version (have {versions})")
            return sorted({p[1] for p in named if len(p) > 1}, key=version_key)
        if not versions:
            raise BundleError(f"{root / name}: no versions with a manifest.json")
        chosen = apply_policy(versions, self.settings.version_policy)
        if not chosen:
            raise BundleError(
                f"{root / name}: version policy {self.settings.version_policy!r} leaves none of {versions}"
            )
        return chosen

    def _wanted(self) -> list[tuple[str, str]]:
        """(name, version) pairs to load at start: OCD_MODELS entries, or every model in the repository."""
        root = Path(self.settings.models_dir)
        if self.settings.models.strip():
            names = list(dict.fromkeys(self._pinned_names()))
        else:
            names = [d.name for d in sorted(root.iterdir()) if d.is_dir()] if root.is_dir() else []
        wanted = [(name, v) for name in names for v in self._versions(name)]
        if not wanted:  # a server with nothing to serve would report ready: refuse, and say why
            where = "does not exist" if not root.is_dir() else "holds no <name>/<version>/manifest.json"
            raise BundleError(
                f"model repository {root.resolve()} {where}; mount or train models there (OCD_MODELS_DIR, --models)"
            )
        return wanted

    def _engines(self, wanted: list[tuple[str, str, str, Path]]) -> dict[str, Any]:
        """Start the engines for (name, version, label, path) entries (blocking: loads and calibrates;
        a load error is a BundleError and starts nothing)."""
        s = self.settings
        if s.inference_process:
            process = InferenceProcess([(label, path) for _, _, label, path in wanted], s)
            self.processes.append(process)
            engines: dict[str, Any] = {label: process.engine(label) for _, _, label, _ in wanted}
            self.hosts.update({label: process for label in engines})
            return engines
        engines = {label: LocalEngine(build_engine(path, s), label) for _, _, label, path in wanted}
        self.hosts.update(engines)
        return engines

    def _serve(self, name: str, version: str, label: str, manifest: Manifest, engine: Any) -> None:
        """Start a version's batcher and make it servable (the latest version answers unversioned requests)."""
        s, device = self.settings, self.settings.resolved_device()
        batcher = Batcher(
            name, label, engine, s.max_batch_size, s.max_wait_ms, s.max_queue, self.inflight, engine.cost
        )  # fmt: skip
        batcher.start()
        self.models.setdefault(name, {})[version] = Served(name, version, manifest, modality_for(manifest), batcher)
        metrics.MODEL_INFO.labels(*self._info(manifest, name, version)).set(1)
        cost = engine.cost
        base = cost.base or cost
        memory = (
            "not measurable here"
            if cost.row_bytes is None
            else f"{cost.row_bytes / 2**20:.1f} MiB, at most {cost.max_rows} at once within "
            f"OCD_BATCH_MEMORY_MB={s.batch_memory_mb}"
        )
        log.info(
            "serving %s on %s with %s (%s, layer %s)%s; default mode %s; a batch of k costs %.2f ms + k x %.3f ms "
            "at %d DDIM steps, %.2f ms + k x %.3f ms in the base mode; one sample and member takes %s",
            label, device, s.backend, manifest.modality, manifest.layer,
            " in the inference process" if s.inference_process else "", manifest.serving.mode,
            1000 * cost.fixed, 1000 * cost.per_sample, cost.steps, 1000 * base.fixed, 1000 * base.per_sample, memory,
        )  # fmt: skip

    def _info(self, manifest: Manifest, name: str, version: str) -> tuple[str, ...]:
        s = self.settings
        return (name, version, manifest.modality, manifest.task, manifest.denoiser.kind, s.resolved_device(), s.backend)

    def load(self) -> None:
        """Load every wanted model version and start its batcher (at start, on the event loop)."""
        s, root = self.settings, Path(self.settings.models_dir)
        if s.threads:
            torch.set_num_threads(s.threads)
        wanted = [(name, version, f"{name}:{version}", root / name / version) for name, version in self._wanted()]
        manifests = {label: read_manifest(path) for _, _, label, path in wanted}
        engines = self._engines(wanted)
        for name, version, label, _ in wanted:
            self._serve(name, version, label, manifests[label], engines[label])
        self.ready = True

    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def load_model(self, name: str) -> list[str]:
        """Load (or reload) ``name`` from the repository under the version policy: new versions start
        serving, then versions no longer wanted leave -> the versions served. A failed load (BundleError,
        UnknownModel) changes nothing."""
        if not name or "/" in name or name.startswith("."):
            raise UnknownModel(f"no model {name!r} in the repository")
        async with self.lock():
            versions = self._versions(name)
            root = Path(self.settings.models_dir)
            have = self.models.get(name, {})
            new = [(name, v, f"{name}:{v}", root / name / v) for v in versions if v not in have]
            if new:
                manifests = {label: read_manifest(path) for _, _, label, path in new}
                engines = await asyncio.get_running_loop().run_in_executor(None, self._engines, new)
                for _, v, label, _ in new:
                    self._serve(name, v, label, manifests[label], engines[label])
            for v in [v for v in list(have) if v not in versions]:
                await self._unload(name, v)
            return sorted(self.models.get(name, {}), key=version_key)

    async def unload_model(self, name: str) -> None:
        """Stop serving every version of ``name`` (requests in flight finish first)."""
        async with self.lock():
            if name not in self.models:
                raise UnknownModel(f"model {name!r} is not loaded; serving {sorted(self.models)}")
            for v in list(self.models[name]):
                await self._unload(name, v)

    async def rescan(self) -> None:
        """SIGHUP: load what the repository holds now (new versions, under the policy) and unload
        models that left it; a model that fails to load is logged and keeps what it served."""
        root = Path(self.settings.models_dir)
        dirs = [d.name for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
        on_disk = {name for name in dirs if list_versions(root, name)}
        if self.settings.models.strip():
            on_disk &= set(self._pinned_names())
        for name in sorted(on_disk | set(self.models)):
            try:
                if name in on_disk:
                    log.info("repository rescan: %s serves versions %s", name, await self.load_model(name))
                else:
                    await self.unload_model(name)
                    log.info("repository rescan: %s left the repository; unloaded", name)
            except (BundleError, UnknownModel) as e:
                log.error("repository rescan: %s: %s", name, e)

    async def _unload(self, name: str, version: str) -> None:
        """Take a version out of service: no new request finds it; once none holds it and its queue is
        empty its batcher stops, and its engine (its inference process, when no other version shares it)."""
        versions = self.models[name]
        served = versions.pop(version)
        if not versions:
            del self.models[name]
        while served.active:  # requests that looked it up before it left, still on their way to its queue
            await asyncio.sleep(0.01)
        await served.batcher.drain()
        metrics.MODEL_INFO.remove(*self._info(served.manifest, name, version))
        label = f"{name}:{version}"
        host = self.hosts.pop(label)
        if isinstance(host, InferenceProcess):
            if not any(h is host for h in self.hosts.values()):
                host.detach()
                self.processes.remove(host)
                await asyncio.get_running_loop().run_in_executor(None, host.join)
        else:
            host.close()
        log.info("unloaded %s", label)

    def get(self, name: str, version: str | None = None) -> Served:
        versions = self.models.get(name)
        if not versions:
            raise UnknownModel(f"unknown model {name!r}; serving {sorted(self.models)}")
        if version is None:
            return versions[max(versions, key=version_key)]
        if version not in versions:
            raise UnknownModel(f"model {name!r} has no version {version!r}; serving {sorted(versions)}")
        return versions[version]

    async def drain(self) -> None:
        self.ready = False
        for versions in self.models.values():
            for served in versions.values():
                await served.batcher.drain()
        for process in self.processes:
            process.stop()
        for host in self.hosts.values():
            if isinstance(host, LocalEngine):
                host.close()
