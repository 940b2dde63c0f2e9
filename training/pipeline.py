"""``ocd train <recipe>``: base -> targets -> diffusion + scale -> evaluation -> bundle -> report.

Every stage writes its result under ``runs/<name>-<variant>/seed<k>/`` atomically and is skipped
when that result exists, so an interrupted run resumes where it stopped (the diffusion stage
also resumes mid-training from its checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

import ocd_core
from ocd_core.bundle import (
    Manifest,
    ServingDefaults,
    list_versions,
    load_bundle,
    read_manifest,
    save_bundle,
)
from ocd_core.conditioning import CondConfig
from ocd_core.fit import FitConfig, TargetSet, build_target_set, fit_ocd
from ocd_core.io import atomic_save_file, atomic_write_text
from ocd_core.nets import build_net
from training.datasets import Prepared, prepare
from training.evaluate import evaluate
from training.export_onnx import export_onnx
from training.modes import choose, curve_steps, measure_costs, modes_for
from training.recipes import Recipe
from training.report import render_strip, write_report
from training.train_base import train_base


def run_id(recipe: Recipe) -> str:
    """Names a run's stage directory: the recipe and the code version that ran it."""
    # unset optional settings (None) are not hashed: a new optional field does not rename every run,
    # while a changed default does (ocd_core.__version__ changes with what training does)
    # eval.max_cost, the serving budget, does not change what is trained or measured
    spec = recipe.model_dump_json(exclude_none=True, exclude={"eval": {"max_cost"}})
    return hashlib.sha256((spec + ocd_core.__version__).encode()).hexdigest()[:12]


def default_device() -> torch.device:
    """The one device setting: CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _manifest(recipe: Recipe, prep: Prepared, model, seed: int, version: str = "1") -> Manifest:
    fit = recipe.fit
    lat = model.latents(prep.parts["train"][0][:1].to(model.device))  # latent sizes
    split = prep.split
    return Manifest(
        name=recipe.name,
        version=version,
        task=prep.task,
        modality=prep.modality,
        input=prep.input,
        labels=prep.labels,
        layer=recipe.layer,
        base=prep.arch.model_copy(update={"kwargs": {**prep.arch.kwargs, **recipe.eval_arch}}),  # as served
        latent_dims=tuple(t.shape[1] for t in lat.flat()),
        mean_scale=float(model.mean_scale),
        targets=fit.targets,
        schedule=fit.schedule,
        denoiser=fit.denoiser,
        cond=fit.cond,
        scale=fit.scale,
        provenance={
            "dataset": recipe.dataset,
            **prep.provenance,
            "limit": recipe.limit,
            "split_seed": split.seed,
            "split_sizes": [len(split.train), len(split.val), len(split.test)],
            "split_digest": split.digest(),
            "target_source": recipe.target_source,
            "recipe": recipe.variant,
            "run_id": run_id(recipe),
            "seed": seed,
        },
    )


def _target_kw(recipe: Recipe, fit: FitConfig | None = None) -> dict[str, Any]:
    return {"pool": (fit or recipe.fit).cond.latent_pool, **({"chunk": recipe.chunk} if recipe.chunk else {})}


def _eval_kw(recipe: Recipe) -> dict[str, Any]:
    return {"chunk": recipe.chunk} if recipe.chunk else {}


@contextlib.contextmanager
def eval_arch(base: torch.nn.Module, recipe: Recipe):
    """The base model as evaluated and served (``recipe.eval_arch``, e.g. tinyNeRF at every pixel),
    restored afterwards (training and targets use the recipe's arch)."""
    old = {k: getattr(base, k) for k in recipe.eval_arch}
    for k, v in recipe.eval_arch.items():
        setattr(base, k, v)
    try:
        yield base
    finally:
        for k, v in old.items():
            setattr(base, k, v)


def _seed_stage(
    recipe: Recipe, prep: Prepared, seed: int, d: Path, progress: bool, device: torch.device
) -> dict[str, Any]:
    """Run (or resume) one seed; returns {"eval": ..., "hist": ...}."""
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    (xtr, ytr), (xva, yva), (xte, yte) = (
        (x.to(device), y.to(device)) for x, y in (prep.parts["train"], prep.parts["val"], prep.parts["test"])
    )
    task = prep.task
    base = build_net(prep.arch.arch, **prep.arch.kwargs).to(device)
    hist_path = d / "hist.json"
    hist: dict[str, list[float]] = json.loads(hist_path.read_text()) if hist_path.exists() else {}
    if (d / "base.safetensors").exists():
        base.load_state_dict(load_file(str(d / "base.safetensors"), device=str(device)))
    else:
        h = train_base(
            base,
            xtr,
            ytr,
            loss=recipe.fit.targets.loss,
            epochs=recipe.base.epochs,
            lr=recipe.base.lr,
            batch_size=recipe.base.batch_size,
            weight_decay=recipe.base.weight_decay,
            seed=seed,
            x_val=xva,
            y_val=yva,
            progress=progress,
        )
        hist.update(base_train_loss=h["train_loss"], base_val_loss=h["val_loss"])
        atomic_write_text(json.dumps(hist), hist_path)
        atomic_save_file(base.state_dict(), d / "base.safetensors")
    base.eval()
    src = {"train": [(xtr, ytr)], "val": [(xva, yva)], "train+val": [(xtr, ytr), (xva, yva)]}[recipe.target_source]
    tpath = d / "targets.safetensors"
    if tpath.exists():
        targets = TargetSet.load(tpath, device)
    else:
        xs, ys = torch.cat([p[0] for p in src]), torch.cat([p[1] for p in src])
        targets = build_target_set(
            base, recipe.layer, xs, ys, recipe.fit.targets, task=task, progress=progress, **_target_kw(recipe)
        )
        targets.save(tpath)
    bdir = d / "bundle"
    if (bdir / recipe.name / "1" / "manifest.json").exists():
        model, _ = load_bundle(bdir / recipe.name / "1", device)
    else:
        fit = recipe.fit.model_copy(update={"seed": seed})
        model, h = fit_ocd(base, recipe.layer, targets, fit, task, checkpoint=d / "fit.ckpt", progress=progress)
        hist.update(denoise_mse=h["denoise_mse"], scale_db=h["scale_db"])
        atomic_write_text(json.dumps(hist), hist_path)
        save_bundle(model, _manifest(recipe, prep, model, seed), bdir, overwrite=True)
        (d / "fit.ckpt").unlink(missing_ok=True)
    epath = d / "eval.json"
    if epath.exists():
        ev = json.loads(epath.read_text())
    else:
        with eval_arch(model.base, recipe):
            ev = evaluate(
                model,
                xte,
                yte,
                targets,
                recipe.fit.targets,
                recipe.eval.ddim_steps,
                recipe.eval.default_steps,
                recipe.eval.ensemble,
                seed,
                progress=progress,
                **_eval_kw(recipe),
            )
        atomic_write_text(json.dumps(ev), epath)
    xvs, yvs = (t.to(device) for t in prep.parts.get("val_served", (xva, yva)))  # val as served (nerf: whole)
    val = _val_rows(recipe, model, targets, xvs, yvs, seed, d, progress)
    if recipe.heldout_rows and recipe.target_source != "val":  # targets on samples the base never trained on
        ev["rows"].update(
            _variant_rows(
                recipe,
                task,
                base,
                recipe.layer,
                xva,
                yva,
                xte,
                yte,
                seed,
                d,
                progress,
                "heldout",
                {"ocd": "ocd_heldout", "ocd_ensemble": "ocd_heldout_ensemble"},
            )
        )
    if recipe.alt_layer:  # the alternative-layer ablation
        xs, ys = torch.cat([p[0] for p in src]), torch.cat([p[1] for p in src])
        ev["rows"].update(
            _variant_rows(
                recipe,
                task,
                base,
                recipe.alt_layer,
                xs,
                ys,
                xte,
                yte,
                seed,
                d,
                progress,
                "alt_layer",
                {"ocd": "alt_layer"},
                recipe.alt_cond,
            )
        )
    return {"eval": ev, "hist": hist, "val": val}


def serve_steps(recipe: Recipe) -> int:
    return recipe.eval.serve_steps or recipe.eval.default_steps


def _cost_batch(prep: Prepared, recipe: Recipe, device: torch.device) -> torch.Tensor:
    """The inputs the serving modes are timed on: up to 64 val / test inputs (fewer for a recipe
    that evaluates in smaller chunks, e.g. whole NeRF renders)."""
    return torch.cat([prep.parts[k][0] for k in ("val", "test")])[: min(64, recipe.chunk or 64)].to(device)


def _val_rows(
    recipe: Recipe, model, targets: TargetSet, xva, yva, seed: int, d: Path, progress: bool
) -> dict[str, Any] | None:
    """The serving modes' rows on the val split (what the default mode is chosen on), cached in
    ``eval_val.json``; None when the recipe has no val split."""
    if recipe.target_source != "train" or xva.shape[0] == 0:  # val targets trained the denoiser: not a fair choice
        return None
    path = d / "eval_val.json"
    val = json.loads(path.read_text()) if path.exists() else {}
    mode_to_row = modes_for(recipe.eval)[1]
    missing = set(mode_to_row.values()) - set(val)
    if missing:  # (a cache from before a mode was added: only the new rows)
        with eval_arch(model.base, recipe):
            e = recipe.eval
            val |= evaluate(
                model, xva, yva, targets, recipe.fit.targets, curve_steps(mode_to_row), e.default_steps, e.ensemble,
                seed, progress=progress, only=missing, **_eval_kw(recipe),
            )["rows"]  # fmt: skip
        atomic_write_text(json.dumps(val), path)
    return val


def _variant_rows(
    recipe: Recipe,
    task: str,
    base,
    layer: str,
    xs,
    ys,
    xte,
    yte,
    seed: int,
    d: Path,
    progress: bool,
    tag: str,
    rows: dict[str, str],
    cond: CondConfig | None = None,
) -> dict[str, Any]:
    """OCD trained again on other targets (held-out samples, or another layer; ``cond`` replaces the
    recipe's conditioning) and evaluated on the test split: ``rows`` maps the evaluated rows to their
    report names. Cached in ``eval_<tag>.json``."""
    path = d / f"eval_{tag}.json"
    if path.exists():
        return json.loads(path.read_text())
    fit = recipe.fit.model_copy(update={"seed": seed, **({"cond": cond} if cond else {})})
    targets = build_target_set(
        base, layer, xs, ys, recipe.fit.targets, task=task, progress=progress, **_target_kw(recipe, fit)
    )
    model, _ = fit_ocd(base, layer, targets, fit, task, checkpoint=d / f"fit_{tag}.ckpt", progress=progress)
    with eval_arch(model.base, recipe):
        ev = evaluate(
            model,
            xte,
            yte,
            targets,
            recipe.fit.targets,
            [],
            recipe.eval.default_steps,
            recipe.eval.ensemble,
            seed,
            progress=progress,
            only=set(rows),
            **_eval_kw(recipe),
        )["rows"]
    out = {name: ev[row] for row, name in rows.items()}
    atomic_write_text(json.dumps(out), path)
    (d / f"fit_{tag}.ckpt").unlink(missing_ok=True)
    return out


def publish(bundle_dir: Path, models_dir: Path, name: str, metrics: dict[str, Any], serving: ServingDefaults) -> Path:
    """Copy a trained bundle into the model repository as the next version, with its serving modes
    and metrics. The same run again -> the same version, its manifest's metrics and modes updated."""
    src = bundle_dir / name / "1"
    manifest = json.loads((src / "manifest.json").read_text())
    existing = list_versions(models_dir, name)
    for v in existing:
        path = models_dir / name / v
        old = read_manifest(path)
        if old.provenance.get("run_id") == manifest["provenance"]["run_id"]:
            new = old.model_copy(update={"metrics": metrics, "serving": serving})
            if new != old:  # weights and derived graphs stay; only what was measured changes
                atomic_write_text(new.model_dump_json(indent=2), path / "manifest.json")
            if not (path / "onnx.json").exists():
                _export_graphs(path)
            return path
    versions = [int(v) for v in existing if v.isdigit()]
    model, m = load_bundle(src)
    m = m.model_copy(update={"version": str(max(versions, default=0) + 1), "metrics": metrics, "serving": serving})
    path = save_bundle(model, m, models_dir)
    _export_graphs(path)
    return path


def _export_graphs(path: Path) -> None:
    """The graphs OCD_BACKEND=onnx serves. Optional (the torch backend needs none): a model that does
    not export is reported, not fatal; `ocd export-onnx` retries."""
    try:
        export_onnx(path)
    except Exception as e:  # noqa: BLE001 - any tracing or export failure of a user's model
        print(f"no ONNX graphs for {path}: {type(e).__name__}: {e}")


def choose_bundle_modes(
    path: Path, runs_dir: Path = Path("runs"), device: torch.device | str | None = None, progress: bool = True
) -> ServingDefaults:
    """Serving modes for a published bundle that has no val evidence (published before serving
    modes existed): its recipe's val split (the split must be the bundle's: same digest), evaluated
    with this one trained model under the recipe's seeds as noise seeds, and timed; the chosen
    default is written into its manifest (atomically). Returns the serving defaults."""
    from training.recipes import RECIPES

    device = torch.device(device) if device else default_device()
    model, m = load_bundle(path, device)
    variant = m.provenance.get("recipe")
    if m.name not in RECIPES or variant is None:
        raise ValueError(f"{path}: made by no recipe of `ocd train` (provenance {m.provenance}); nothing to measure on")
    recipe = RECIPES[m.name](variant)
    prep = prepare(recipe, runs_dir / "cache")
    if prep.split.digest() != m.provenance.get("split_digest"):
        raise ValueError(f"{path}: the {m.name}/{variant} recipe's split is not the one this bundle was trained on")
    e = recipe.eval
    specs, rows = modes_for(e, m.serving.ddim_steps)
    xv, yv = (t.to(device) for t in prep.parts.get("val_served", prep.parts["val"]))
    val = {}
    with eval_arch(model.base, recipe):
        for seed in tqdm(recipe.seeds, desc="val", disable=not progress):
            val[seed] = evaluate(
                model, xv, yv, None, recipe.fit.targets, curve_steps(rows), e.default_steps, e.ensemble, seed,
                progress=False, only=set(rows.values()), **_eval_kw(recipe),
            )["rows"]  # fmt: skip
        costs = measure_costs(model, _cost_batch(prep, recipe, device), specs)
    serving = choose(specs, rows, val, m.task, costs, e.cost_budget)
    serving = serving.model_copy(update={"chosen": serving.chosen + " (one trained model: noise seeds)"})
    atomic_write_text(m.model_copy(update={"serving": serving}).model_dump_json(indent=2), Path(path) / "manifest.json")
    return serving


def run_recipe(
    recipe: Recipe,
    runs_dir: Path = Path("runs"),
    models_dir: Path = Path("models"),
    reports_dir: Path = Path("reports"),
    progress: bool = True,
    device: torch.device | str | None = None,
) -> tuple[Path, Path]:
    """The whole pipeline for every seed of ``recipe``; returns (bundle directory, report directory)."""
    device = torch.device(device) if device else default_device()
    prep = prepare(recipe, runs_dir / "cache")
    split = prep.split
    root = runs_dir / f"{recipe.name}-{recipe.variant}-{run_id(recipe)}"
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(recipe.model_dump_json(indent=2), root / "recipe.json")
    per_seed, hists, val = {}, {}, {}
    for seed in tqdm(recipe.seeds, desc=f"{recipe.name} seeds", disable=not progress):
        r = _seed_stage(recipe, prep, seed, root / f"seed{seed}", progress, device)
        per_seed[seed], hists[seed] = r["eval"], r["hist"]
        if r["val"] is not None:
            val[seed] = r["val"]
    specs, rows = modes_for(recipe.eval)
    first, _ = load_bundle(root / f"seed{recipe.seeds[0]}" / "bundle" / recipe.name / "1", device)  # published
    with eval_arch(first.base, recipe):
        costs = measure_costs(first, _cost_batch(prep, recipe, device), specs)
    val = val if len(val) == len(recipe.seeds) else {}
    serving = choose(specs, rows, val, prep.task, costs, recipe.eval.cost_budget)
    info = recipe.model_dump(mode="json") | {
        "split_digest": split.digest(),
        "run_id": run_id(recipe),
        "n_test": len(split.test),
        "default_steps": recipe.eval.default_steps,
    }
    notes = [
        f"Targets computed on the `{recipe.target_source}` split "
        f"({'held out from' if recipe.target_source == 'val' else 'seen in'} base training)."
    ]
    extra = Path(__file__).parent / "notes" / f"{recipe.name}.md"  # measured investigations, kept with the recipe
    if extra.exists():
        notes.append(extra.read_text().strip())
    report_dir = reports_dir / (recipe.report or recipe.name)
    ranking = reports_dir / recipe.name / "layer_selection.json"  # the same base model: same layer ranking
    if report_dir.name != recipe.name and ranking.exists() and not (report_dir / ranking.name).exists():
        report_dir.mkdir(parents=True, exist_ok=True)  # the variant's own adapted layer in the copy
        atomic_write_text(
            json.dumps({**json.loads(ranking.read_text()), "used_layer": recipe.layer}, indent=2),
            report_dir / ranking.name,
        )
    xte, yte = prep.parts["test"]
    if yte.ndim == 4:  # image outputs: a strip of test renders from the first seed's bundle
        model, _ = load_bundle(root / f"seed{recipe.seeds[0]}" / "bundle" / recipe.name / "1", device)
        render_strip(
            model,
            xte[:4].to(device),
            yte[:4].to(device),
            serve_steps(recipe),
            report_dir / "renders.png",
        )
    metrics = write_report(report_dir, info, per_seed, hists, notes, serving=(serving, rows))
    summary = {row: {k: v["mean"] for k, v in ms.items()} for row, ms in metrics["rows"].items()}
    bundle = publish(root / f"seed{recipe.seeds[0]}" / "bundle", models_dir, recipe.name, summary, serving)
    return bundle, report_dir
