"""Python API: the whole OCD pipeline on your own trained ``nn.Module``, layer and data.

from ocd_core.nets import register_architecture
from training.api import ocd_pipeline

register_architecture("my_mlp", MyMLP)             # so the bundle can rebuild the model
result = ocd_pipeline(model, "fc1", (x_train, y_train), (x_test, y_test), val=(x_val, y_val), name="my-model",
                      arch=ArchSpec(arch="my_mlp", kwargs={...}), input_shape=[64])
result.metrics["rows"]["ocd"], result.bundle, result.model.predict(x, ensemble=5)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ocd_core.bundle import ArchSpec, InputSpec, Manifest, save_bundle
from ocd_core.fit import FitConfig, TargetSet, build_target_set, fit_ocd
from ocd_core.predictor import OCDModel, Task
from training.evaluate import evaluate
from training.modes import choose, curve_steps, measure_costs, modes_for
from training.recipes import EvalConfig


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
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    name: str,
    arch: ArchSpec,
    input_shape: list[int],
    task: Task = "classification",
    modality: str = "tensor",
    labels: list[str] | None = None,
    fit: FitConfig | None = None,
    eval: EvalConfig | None = None,
    models_dir: str | Path | None = "models",
    version: str = "1",
    seed: int = 0,
    progress: bool = True,
) -> PipelineResult:
    """Targets on ``train`` -> diffusion + scale training -> evaluation on ``test`` -> bundle.

    ``val`` (held out from ``train`` and ``test``) chooses the bundle's default serving mode
    (training/modes.py): an adapted mode only where it beats the base model on val; without
    ``val`` the bundle serves the base model by default (OCD on request, ``mode="ocd"``).

    ``base`` must already be trained (it is not modified). ``train``/``test`` are (x (N, *input),
    y (N,) labels or (N, *out) regression targets). Set ``fit.targets.loss="mse"`` for regression.
    Returns the OCDModel, its targets, training history, metrics and the bundle path (None when
    ``models_dir`` is None).
    """
    fit = (fit or FitConfig()).model_copy(update={"seed": seed})
    ev_cfg = eval or EvalConfig()
    base.eval()
    targets = build_target_set(base, layer, *train, fit.targets, task=task, progress=progress)
    model, hist = fit_ocd(base, layer, targets, fit, task, progress=progress)
    metrics: dict[str, Any] = {}
    if test is not None:
        metrics = evaluate(
            model,
            *test,
            targets,
            fit.targets,
            ev_cfg.ddim_steps,
            ev_cfg.default_steps,
            ev_cfg.ensemble,
            seed,
            progress=progress,
        )
    specs, rows = modes_for(ev_cfg)
    val_rows, costs = {}, None
    if val is not None:
        costs = measure_costs(model, val[0][:64], specs)
        val_rows[seed] = evaluate(
            model, *val, targets, fit.targets, curve_steps(rows), ev_cfg.default_steps, ev_cfg.ensemble, seed,
            progress=progress, only=set(rows.values()),
        )["rows"]  # fmt: skip
    serving = choose(specs, rows, val_rows, task, costs, ev_cfg.cost_budget)
    if metrics:
        metrics["served"] = rows[serving.mode]
    bundle = None
    if models_dir is not None:
        lat = model.latents(train[0][:1])
        manifest = Manifest(
            name=name,
            version=version,
            task=task,
            modality=modality,
            input=InputSpec(shape=input_shape),
            labels=labels,
            base=arch,
            layer=layer,
            latent_dims=tuple(t.shape[1] for t in lat.flat()),
            mean_scale=float(model.mean_scale),
            targets=fit.targets,
            schedule=fit.schedule,
            denoiser=fit.denoiser,
            cond=fit.cond,
            scale=fit.scale,
            serving=serving,
            metrics={k: v for k, v in metrics.get("rows", {}).items()},
            provenance={"api": "training.api.ocd_pipeline", "n_train": len(train[0]), "seed": seed},
        )
        bundle = save_bundle(model, manifest, models_dir)
    return PipelineResult(model, targets, hist, metrics, bundle)
