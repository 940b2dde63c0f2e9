"""The model repository at run time: every served (name, version), its engine and batcher."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    mode_name: Callable[[int, int], str] = field(init=False)  # ServingDefaults.name_of, cached

    def __post_init__(self) -> None:
        serving = self.manifest.serving
        self.modes = serving.all_modes()
        self.mode_name = functools.lru_cache(maxsize=256)(serving.name_of)


def version_key(v: str) -> tuple[int, int, str]:
    """Numeric versions in numeric order ("latest" is the highest), then named ones."""
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


class Registry:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.inflight = InFlight()  # shared by the app (counting) and every batcher (reading)
        self.models: dict[str, dict[str, Served]] = {}
        self.process: InferenceProcess | None = None
        self.local: list[LocalEngine] = []  # engines on threads of this process (no inference process)
        self.ready = False

    def _wanted(self) -> list[tuple[str, str]]:
        """(name, version) pairs to load: OCD_MODELS entries (a bare name: all its versions) or everything."""
        root = Path(self.settings.models_dir)
        if self.settings.models.strip():
            pairs = [m.strip().split(":", 1) for m in self.settings.models.split(",") if m.strip()]
        else:
            pairs = [[d.name] for d in sorted(root.iterdir()) if d.is_dir()] if root.is_dir() else []
        wanted = []
        for p in pairs:
            versions = list_versions(root, p[0])
            if not versions:
                raise BundleError(f"{root / p[0]}: no versions with a manifest.json")
            if len(p) > 1 and p[1] not in versions:
                raise BundleError(f"{root / p[0] / p[1]}: no such version (have {versions})")
            wanted += [(p[0], v) for v in ([p[1]] if len(p) > 1 else versions)]
        if not wanted:  # a server with nothing to serve would report ready: refuse, and say why
            where = "does not exist" if not root.is_dir() else "holds no <name>/<version>/manifest.json"
            raise BundleError(
                f"model repository {root.resolve()} {where}; mount or train models there (OCD_MODELS_DIR, --models)"
            )
        return wanted

    def load(self) -> None:
        """Load every wanted model version and start its batcher (requests default to the latest)."""
        s, root, device = self.settings, Path(self.settings.models_dir), self.settings.resolved_device()
        if s.threads:
            torch.set_num_threads(s.threads)
        wanted = [(name, version, f"{name}:{version}", root / name / version) for name, version in self._wanted()]
        manifests = {label: read_manifest(path) for _, _, label, path in wanted}
        if s.inference_process:
            self.process = InferenceProcess([(label, path) for _, _, label, path in wanted], s)
            engines = {label: self.process.engine(label) for label in manifests}
        else:
            engines = {label: LocalEngine(build_engine(path, s), label) for _, _, label, path in wanted}
            self.local = list(engines.values())
        for name, version, label, _ in wanted:
            manifest = manifests[label]
            batcher = Batcher(
                name,
                label,
                engines[label],
                s.max_batch_size,
                s.max_wait_ms,
                s.max_queue,
                self.inflight,
                engines[label].cost,
            )
            batcher.start()
            self.models.setdefault(name, {})[version] = Served(name, version, manifest, modality_for(manifest), batcher)
            metrics.MODEL_INFO.labels(
                name, version, manifest.modality, manifest.task, manifest.denoiser.kind, device, s.backend
            ).set(1)
            cost = engines[label].cost
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
                label,
                device,
                s.backend,
                manifest.modality,
                manifest.layer,
                " in the inference process" if s.inference_process else "",
                manifest.serving.mode,
                1000 * cost.fixed,
                1000 * cost.per_sample,
                cost.steps,
                1000 * base.fixed,
                1000 * base.per_sample,
                memory,
            )
        self.ready = True

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
        if self.process is not None:
            self.process.stop()
        for engine in self.local:
            engine.close()
