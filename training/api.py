"""Python API: the whole OCD pipeline on your own trained ``nn.Module``, layer and data.

from training.api import ocd_pipeline
result = ocd_pipeline(model, "fc1", (x_train, y_train), (x_test, y_test), val=(x_val, y_val), name="my-model",
                      modality="image", normalization=([0.13], [0.31]))
result.metrics["rows"]["ocd"], result.bundle, result.model.predict(x, ensemble=5)

The bundle names the model's class by import path (``mypkg.nets:MyNet``; pass ``arch=ArchSpec(arch=...,
kwargs={...})`` when its constructor needs arguments), so ``ocd serve --allow-module mypkg`` rebuilds
it. Every argument is checked before training (training/inputs.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ocd_core.audio import AudioSpec
from ocd_core.bundle import ArchSpec, Manifest, Normalization, save_bundle
from ocd_core.fit import FitConfig, TargetSet, build_target_set, fit_ocd
from ocd_core.nets.user import SelectOutput, env_allow_modules
from ocd_core.predictor import OCDModel, Task
from ocd_core.preprocess import TabularSpec
from training import inputs
from training.evaluate import evaluate
from training.modes import choose, curve_steps, measure_costs, modes_for
from training.recipes import EvalConfig
from training.report import write_report


@dataclass
class PipelineResult:
    model: OCDModel
    targets: TargetSet
    history: dict[str, list[float]]
    metrics: dict[str, Any]
    bundle: Path | None


def ocd_pipeline(
    base: nn.Module,
    layer: str,
    train: tuple[Any, Any],
    test: tuple[Any, Any] | None = None,
    *,
    val: tuple[Any, Any] | None = None,
    name: str,
    arch: ArchSpec | str | None = None,
    output: int | str | Callable[[Any], torch.Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    task: Task = "classification",
    modality: str = "tensor",
    normalization: Normalization | tuple[Sequence[float], Sequence[float]] | None = None,
    tabular: TabularSpec | None = None,
    audio: AudioSpec | None = None,
    labels: Sequence[str] | None = None,
    fit: FitConfig | None = None,
    eval: EvalConfig | None = None,
    models_dir: str | Path | None = "models",
    reports_dir: str | Path | None = None,
    version: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    allow_modules: Sequence[str] | None = None,
) -> PipelineResult:
    """Targets on ``train`` -> diffusion + scale training -> evaluation on ``test`` -> bundle.

    ``base`` must already be trained (it is not modified). ``train``/``test``/``val`` are (x, y):
    tensors, numpy arrays or lists; x (N, *input_shape) as the model takes it (normalised), y (N,)
    integer labels or (N, *out) regression targets (set ``fit.targets.loss="mse"``).
    ``output``: for a forward that returns a tuple or dict, which part is the prediction (an index,
    a key, or a module-level function). ``arch``: the class and its constructor's kwargs (default:
    the model's own class, no kwargs). ``modality`` (tensor, image, tabular, audio) and its
    preprocessing (``normalization``: (mean, std) per channel of raw [0, 1] pixels; ``tabular``;
    ``audio``) tell the service how to decode requests; ``labels`` names the classes.
    ``val`` chooses the default serving mode (training/modes.py): an adapted mode only where it beats
    the base model on val; without it the bundle serves the base model by default.
    ``reports_dir``: also write ``<reports_dir>/<name>/report.md`` (+ metrics.json, plots) on test.
    ``version``: default the next free one. ``progress``: default on when stderr is a terminal.
    Returns the OCDModel, its targets, training history, metrics and the bundle path (None when
    ``models_dir`` is None). Wrong arguments raise ``training.inputs.InputError`` before training.
    """
    progress = sys.stderr.isatty() if progress is None else progress
    allow = env_allow_modules() if allow_modules is None else list(allow_modules)
    fit = (fit or FitConfig()).model_copy(update={"seed": seed})
    ev_cfg = eval or EvalConfig()
    models_dir = Path(models_dir) if models_dir is not None else None
    version = inputs.publish_version(models_dir, name, version, overwrite)
    x_tr, y_tr = inputs.data_pair(train, "train")
    shape = list(input_shape) if input_shape is not None else list(x_tr.shape[1:])
    if list(x_tr.shape[1:]) != shape:
        raise inputs.InputError("input_shape", f"{shape} does not match train's samples, shape {list(x_tr.shape[1:])}")
    if isinstance(base, SelectOutput):
        raise inputs.InputError("base", "pass the model itself, and output= to pick its prediction")
    if output is None and isinstance(arch, ArchSpec) and arch.output is not None:
        output = arch.output  # (the spec's own selector)
    model, selector = inputs.with_output(base, output, allow)
    inputs.check_layer(model, layer)
    model.eval()
    out = inputs.dry_forward(model, x_tr, shape, output is not None)
    if task == "regression" and fit.targets.loss == "cross_entropy":
        raise inputs.InputError("fit", "task='regression' needs fit.targets.loss='mse'")
    y_tr = inputs.check_targets("train", y_tr, out, task)
    parts = {}
    for arg, pair in (("test", test), ("val", val)):
        if pair is not None:
            x, y = inputs.data_pair(pair, arg)
            if list(x.shape[1:]) != shape:
                raise inputs.InputError(arg, f"samples have shape {list(x.shape[1:])}; train's have {shape}")
            parts[arg] = (x, inputs.check_targets(arg, y, out, task))
    labels = inputs.check_labels(labels, out, task)
    spec = inputs.input_spec(modality, shape, normalization, tabular, audio)
    arch = inputs.arch_spec(base, arch, selector, allow)
    inputs.check_arch(arch, model, x_tr, out, allow)

    targets = build_target_set(
        model, layer, x_tr, y_tr, fit.targets, task=task, progress=progress, pool=fit.cond.latent_pool
    )
    ocd, hist = fit_ocd(model, layer, targets, fit, task, progress=progress)
    metrics: dict[str, Any] = {}
    if "test" in parts:
        metrics = evaluate(
            ocd, *parts["test"], targets, fit.targets, ev_cfg.ddim_steps, ev_cfg.default_steps, ev_cfg.ensemble, seed,
            progress=progress,
        )  # fmt: skip
    specs, rows = modes_for(ev_cfg)
    val_rows, costs = {}, None
    if "val" in parts:
        costs = measure_costs(ocd, parts["val"][0][:64], specs)
        val_rows[seed] = evaluate(
            ocd, *parts["val"], targets, fit.targets, curve_steps(rows), ev_cfg.default_steps, ev_cfg.ensemble, seed,
            progress=progress, only=set(rows.values()),
        )["rows"]  # fmt: skip
    serving = choose(specs, rows, val_rows, task, costs, ev_cfg.cost_budget)
    if metrics:
        metrics["served"] = rows[serving.mode]
    if reports_dir is not None and metrics:
        info = {"name": name, "variant": "ocd_pipeline", "n_test": len(parts["test"][0]), "layer": layer,
                "arch": arch.arch, "n_train": len(x_tr), "default_steps": ev_cfg.default_steps}  # fmt: skip
        notes = [
            f"One seed ({seed}); the served default is chosen on "
            f"{len(parts['val'][0]) if 'val' in parts else 0} val samples."
        ]
        write_report(Path(reports_dir) / name, info, {seed: metrics}, {seed: hist}, notes, serving=(serving, rows))
    bundle = None
    if models_dir is not None:
        lat = ocd.latents(x_tr[:1])
        manifest = Manifest(
            name=name,
            version=version,
            task=task,
            modality=modality,
            input=spec,
            labels=labels,
            base=arch,
            layer=layer,
            latent_dims=tuple(t.shape[1] for t in lat.flat()),
            mean_scale=float(ocd.mean_scale),
            targets=fit.targets,
            schedule=fit.schedule,
            denoiser=fit.denoiser,
            cond=fit.cond,
            scale=fit.scale,
            serving=serving,
            metrics={k: v for k, v in metrics.get("rows", {}).items()},
            provenance={"api": "training.api.ocd_pipeline", "n_train": len(x_tr), "seed": seed},
        )
        bundle = save_bundle(ocd, manifest, models_dir, overwrite=overwrite)
    return PipelineResult(ocd, targets, hist, metrics, bundle)


def tabular_data(frame: Any, target: str, task: Task = "classification", train_rows: Sequence[int] | None = None):
    """A pandas DataFrame with a ``target`` column -> (x (N, width), y, spec, labels) for ocd_pipeline's
    ``modality="tabular"``: numbers standardised and categories one-hot, fitted on ``train_rows``
    (default: every row; pass the training split's rows so val and test stay unseen). The service
    applies ``spec`` to requests of named fields."""
    from training.data.tabular import encode_frame, fit_spec

    if target not in frame.columns:
        raise inputs.InputError("target", f"{target!r} is not a column; columns: {list(frame.columns)}")
    frame = frame.reset_index(drop=True)
    spec = fit_spec(
        frame, target, task, "none", list(train_rows) if train_rows is not None else list(range(len(frame)))
    )
    labels = sorted(str(v) for v in frame[target].dropna().unique()) if task == "classification" else None
    x, y = encode_frame(frame, spec, task, labels)
    return x, y, spec, labels
