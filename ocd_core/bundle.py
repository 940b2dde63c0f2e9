"""Model bundle: ``manifest.json`` (pydantic) + safetensors weights, saved atomically, loaded safely.

Layout: ``<root>/<name>/<version>/{manifest.json, base.safetensors, diffusion.safetensors,
scale.safetensors}``. Loading never executes code: weights are safetensors only, and a pickle
or ``torch.save`` file in their place is refused with an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError, model_serializer, model_validator
from safetensors.torch import load_file
from torch import nn

from .conditioning import CondConfig, CondEncoder
from .denoisers import CompactConfig, DenoiserConfig, build_denoiser
from .io import atomic_save_file, atomic_write_text
from .nets import OutputSelector, build_net
from .nets.user import env_allow_modules
from .predictor import OCDModel
from .scale import ScaleConfig, ScaleNet
from .schedule import ScheduleConfig
from .tap import get_layer
from .targets import TargetConfig

FORMAT_VERSION = 1
FILES = {"base": "base.safetensors", "diffusion": "diffusion.safetensors", "scale": "scale.safetensors"}


class BundleError(Exception):
    """A bundle that cannot be loaded; the message says what is wrong and where."""


class Normalization(BaseModel):
    """x_model = (x − mean) / std, per channel (image) or per feature (tabular)."""

    mean: list[float]
    std: list[float]


class InputSpec(BaseModel):
    shape: list[int] = Field(description="one sample's shape as the base model takes it, e.g. [1, 28, 28]")
    dtype: Literal["float32"] = "float32"
    normalization: Normalization | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="modality-specific decoding settings")


class ArchSpec(BaseModel):
    """The base model's class: a built-in name ("lenet5") or an import path ("mypkg.nets:LeNet",
    imported only from allowed modules), its constructor's keyword arguments, and, for a forward
    that returns a tuple or dict, which part is the prediction."""

    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    output: OutputSelector | None = None

    def build(self, allow_modules: Sequence[str] = ()) -> nn.Module:
        return build_net(self.arch, allow_modules, self.output, **self.kwargs)

    @model_serializer(mode="wrap")
    def _omit_no_output(self, handler):  # a plain model's spec serialises as before outputs existed
        data = handler(self)  # (manifests and the ONNX graphs' weights digest unchanged)
        if isinstance(data, dict) and data.get("output") is None:
            data.pop("output", None)
        return data


class ServingMode(BaseModel):
    """How a request is answered: ``ddim_steps`` 0 is the base model alone (no adaptation);
    otherwise ``ensemble`` adapted members sampled with that many DDIM steps. ``val`` holds the
    evidence it was chosen on: the paired gain over the base model on the val split per metric,
    {metric: {"mean", "sd", "per_seed": [...]}} (empty when never measured), and its cost."""

    ddim_steps: int = Field(ge=0)
    ensemble: int = Field(1, ge=1)
    val: dict[str, dict[str, Any]] = Field(default_factory=dict)
    cost: float | None = Field(None, description="time per batch over the base model's, where measured")


BASE_MODE = "base"


class ServingDefaults(BaseModel):
    """The model's serving modes and its default. ``ocd`` (``ddim_steps``, ``ensemble``) and ``base``
    always exist; training adds the rest with their val evidence (``ocd_ensemble``, ``ddim_<n>``) and
    names the default it chose (``mode``) and why (``chosen``)."""

    ddim_steps: int = 10
    ensemble: int = 1
    mode: str = "ocd"
    modes: dict[str, ServingMode] = Field(default_factory=dict)
    chosen: str = Field("", description="how the default mode was chosen")
    max_ensemble: int | None = Field(None, ge=1, description="this model's limit on ensemble, under the server's")
    max_ddim_steps: int | None = Field(None, ge=1, description="this model's limit on ddim_steps, under the server's")

    def all_modes(self) -> dict[str, ServingMode]:
        """Every mode by name: base, ocd, then the recorded ones (a recorded base or ocd wins)."""
        builtin = {
            BASE_MODE: ServingMode(ddim_steps=0),
            "ocd": ServingMode(ddim_steps=self.ddim_steps, ensemble=self.ensemble),
        }
        return {**builtin, **self.modes}

    def name_of(self, ddim_steps: int, ensemble: int) -> str:
        """The name of the mode that runs these parameters ("custom" when none does)."""
        for name, m in self.all_modes().items():
            if m.ddim_steps == ddim_steps and (m.ensemble == ensemble or ddim_steps == 0):
                return name
        return "custom"

    @model_validator(mode="after")
    def _known_default(self) -> ServingDefaults:
        if self.mode not in self.all_modes():
            raise ValueError(f"serving.mode {self.mode!r} is not one of {sorted(self.all_modes())}")
        return self


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    name: str
    version: str = "1"
    created: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    task: Literal["classification", "regression"]
    modality: str = Field(description="how requests are decoded: image, tabular, audio, ...")
    input: InputSpec
    labels: list[str] | None = None
    base: ArchSpec
    layer: str
    latent_dims: tuple[int, int, int] = Field(description="flattened (layer input, layer output, network output)")
    mean_scale: float
    targets: TargetConfig
    schedule: ScheduleConfig
    denoiser: DenoiserConfig = CompactConfig()
    cond: CondConfig
    scale: ScaleConfig
    serving: ServingDefaults = ServingDefaults()
    metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict, description="data, split, recipe and seeds")
    files: dict[str, str] = Field(default_factory=lambda: dict(FILES))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def save_bundle(model: OCDModel, manifest: Manifest, root: str | Path, overwrite: bool = False) -> Path:
    """Write ``<root>/<name>/<version>/`` atomically (a temp directory renamed into place)."""
    final = Path(root) / manifest.name / manifest.version
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pick a new version or pass overwrite=True")
    tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.tmp", dir=final.parent))
    try:
        atomic_save_file(_state(model.base), tmp / manifest.files["base"])
        diff = {f"cond.{k}": v for k, v in _state(model.cond).items()}
        diff.update({f"denoiser.{k}": v for k, v in _state(model.denoiser).items()})
        atomic_save_file(diff, tmp / manifest.files["diffusion"])
        atomic_save_file(_state(model.scale_net), tmp / manifest.files["scale"])
        atomic_write_text(manifest.model_dump_json(indent=2), tmp / "manifest.json")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; readers (the service) may be another user
        old = None
        if final.exists():  # swap: the old version stays readable until the new one is in place
            old = final.with_name(f".{final.name}.old{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _check_safetensors(path: Path) -> None:
    if not path.is_file():
        raise BundleError(f"{path}: missing (the manifest lists it)")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header (checked first: a
    # header of 0x80 + 256·k bytes starts with the byte that also opens a pickle)
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= path.stat().st_size:
        return
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise BundleError(
            f"{path}: is a pickle / torch.save file, refusing to load it "
            "(bundles hold safetensors only, which load without executing code)"
        )
    raise BundleError(f"{path}: not a safetensors file")


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and check ``manifest.json`` (version first, so old readers fail with a clear reason)."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{path}: missing; not a bundle directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: invalid JSON ({e})") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: unknown format_version {version!r}; this reader supports {FORMAT_VERSION}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise BundleError(f"{path}: invalid manifest: {e}") from None


def load_bundle(
    directory: str | Path, device: torch.device | str = "cpu", allow_modules: Sequence[str] | None = None
) -> tuple[OCDModel, Manifest]:
    """Load a bundle directory into an OCDModel in eval mode on ``device``. A base model named by
    import path is imported only from ``allow_modules`` (package names; None: ``OCD_ALLOW_MODULES``)."""
    directory = Path(directory)
    m = read_manifest(directory)
    for key in FILES:
        name = m.files.get(key)
        if name is None:
            raise BundleError(f"{directory / 'manifest.json'}: files has no {key!r} entry")
        if Path(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"{directory / 'manifest.json'}: files.{key} must be a plain file name, got {name!r}")
        _check_safetensors(directory / name)
    try:
        base = m.base.build(env_allow_modules() if allow_modules is None else allow_modules)
        delta_shape = tuple(get_layer(base, m.layer).weight.shape)
    except Exception as e:  # noqa: BLE001  ArchImportError, or anything your model's constructor raises
        raise BundleError(f"{directory / 'manifest.json'}: cannot build the base model: {e}") from None
    cond = CondEncoder(*m.latent_dims, m.cond, weight_shape=delta_shape)
    den = build_denoiser(m.denoiser, delta_shape, m.cond.dim)
    scale = ScaleNet(*m.latent_dims, m.scale)
    weights = {}
    for key in FILES:
        try:
            weights[key] = load_file(str(directory / m.files[key]))
        except Exception as e:  # noqa: BLE001  safetensors' own error types: truncated or corrupt file
            raise BundleError(f"{directory / m.files[key]}: unreadable safetensors file: {e}") from None
    diff = weights["diffusion"]
    try:
        base.load_state_dict(weights["base"])
        cond.load_state_dict({k[5:]: v for k, v in diff.items() if k.startswith("cond.")})
        den.load_state_dict({k[9:]: v for k, v in diff.items() if k.startswith("denoiser.")})
        scale.load_state_dict(weights["scale"])
    except RuntimeError as e:
        raise BundleError(f"{directory}: weights do not match the manifest's architecture: {e}") from None
    model = OCDModel(base, m.layer, cond, den, scale, m.schedule, m.task, m.mean_scale)
    return model.to(device).eval(), m


def weights_digest(directory: str | Path) -> str:
    """SHA-256 over what derived files (ONNX) are made from: each safetensors file by role (role,
    length, bytes) and the manifest's architecture sections."""
    directory = Path(directory)
    m = read_manifest(directory)
    h = hashlib.sha256(
        m.model_dump_json(
            include={"base", "layer", "latent_dims", "task", "schedule", "denoiser", "cond", "scale", "input"}
        ).encode()
    )
    for key in sorted(m.files):
        data = (directory / m.files[key]).read_bytes()
        h.update(f"{key}:{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()


def list_versions(root: str | Path, name: str) -> list[str]:
    """Versions of ``name`` under ``root`` that hold a manifest, oldest first (numeric when possible)."""
    d = Path(root) / name
    vs = (
        [p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").exists()]
        if d.is_dir()
        else []
    )
    return sorted(vs, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))
