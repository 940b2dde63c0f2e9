"""``ocd select-layer <recipe>``: rank the recipe's base-model layers by the paper's criterion
(ocd_core.layer_select) on samples of its val split, and write the ranking into its report."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ocd_core.bundle import list_versions, load_bundle
from ocd_core.io import atomic_write_text
from ocd_core.layer_select import rank_layers
from training.datasets import prepare
from training.recipes import Recipe


def layer_section(info: dict) -> str:
    """The report's "Layer selection" section from layer_selection.json."""
    lines = [
        "## Layer selection",
        "",
        f"The paper's criterion on the base model of `{info['bundle']}`: {info['draws']} kaiming-normal re-draws "
        f"of each layer's weight, per-sample losses on {info['samples']} val samples, Gaussian KDE (bandwidth 0.2, "
        "grid 0..100) entropy, maximum over draws, normalised by the best layer. "
        f"This bundle adapts `{info['used_layer']}`.",
        "",
        "| rank | layer | entropy | score |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['rank']} | {r['layer']} | {r['entropy']:.4f} | {r['score']:.3f} |" for r in info["ranking"]]
    return "\n".join(lines) + "\n"


def select_layer(
    recipe: Recipe,
    models_dir: Path,
    reports_dir: Path,
    runs_dir: Path,
    draws: int = 100,
    samples: int = 500,
    seed: int = 0,
) -> list[dict]:
    versions = list_versions(models_dir, recipe.name)
    if not versions:
        raise SystemExit(f"{models_dir / recipe.name}: no trained bundle; run `ocd train {recipe.name}` first")
    model, manifest = load_bundle(models_dir / recipe.name / versions[-1])
    for k in recipe.eval_arch:  # the base as trained: val targets are on its training grid (tinyNeRF)
        setattr(model.base, k, recipe.arch.kwargs[k])
    x, y = prepare(recipe, runs_dir / "cache").parts["val"]
    x, y = x[:samples], y[:samples]
    ranking = rank_layers(model.base, x, y, recipe.fit.targets.loss, draws=draws, seed=seed)
    rows = [{"rank": i + 1, "layer": s.layer, "entropy": s.entropy, "score": s.score} for i, s in enumerate(ranking)]
    out = reports_dir / recipe.name
    info = {
        "bundle": f"{recipe.name}/{versions[-1]}",
        "draws": draws,
        "samples": len(x),
        "used_layer": manifest.layer,
        "ranking": rows,
    }
    atomic_write_text(json.dumps(info, indent=2), out / "layer_selection.json")
    section = layer_section(info)
    report = out / "report.md"
    if report.exists():
        text = report.read_text()
        text = re.sub(r"## Layer selection\n.*?(?=\n## |\Z)", "", text, flags=re.S).rstrip() + "\n\n"
        atomic_write_text(text + section, report)
    return rows
