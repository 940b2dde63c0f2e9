"""Aggregate per-seed evaluations into ``report.md``, ``metrics.json`` and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ocd_core.bundle import ServingDefaults
from ocd_core.io import atomic_write_text

ROW_TITLES = {
    "base": "base model",
    "oracle": "oracle (overfit on the test sample, with its label)",
    "ocd": "OCD (1 sample)",
    "ocd_ensemble": "OCD ensemble",
    "no_scale": "ablation: no scale net (global mean scale)",
    "nearest_neighbour": "ablation: nearest-neighbour delta",
    "knn_average": "baseline: mean delta of the 5 nearest training samples",
    "noise_delta": "baseline: noise delta (random direction, the scale net's magnitude)",
    "tent_1": "peer: TENT, entropy minimisation of the layer on the request (1 step, no label)",
    "tent_3": "peer: TENT, entropy minimisation of the layer on the request (3 steps, no label)",
    "ocd_heldout": "OCD, targets on the val split (held out from base training)",
    "ocd_heldout_ensemble": "OCD ensemble, targets on the val split",
}


def _ms(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """{row: {metric: {mean, sd, per_seed, gain_mean, gain_sd, gain_per_seed}}} (gain = row − base, paired)."""
    seeds = sorted(per_seed)
    rows = per_seed[seeds[0]]["rows"]
    out: dict[str, Any] = {}
    for row in rows:
        out[row] = {}
        for metric in rows[row]:
            vals = [per_seed[s]["rows"][row][metric] for s in seeds]
            gains = [per_seed[s]["rows"][row][metric] - per_seed[s]["rows"]["base"][metric] for s in seeds]
            m, sd = _ms(vals)
            gm, gsd = _ms(gains)
            out[row][metric] = {
                "mean": m,
                "sd": sd,
                "per_seed": vals,
                "gain_mean": gm,
                "gain_sd": gsd,
                "gain_per_seed": gains,
            }
    return out


def _fmt(metric: str, v: float) -> str:
    return f"{100 * v:.2f}" if metric == "acc" else f"{v:.2f}" if metric == "psnr" else f"{v:.4f}"


def write_report(
    out_dir: Path,
    recipe: dict[str, Any],
    per_seed: dict[int, dict[str, Any]],
    histories: dict[int, dict[str, list[float]]],
    notes: list[str],
    serving: tuple[ServingDefaults, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Write report.md + metrics.json + plots into ``out_dir``; returns the aggregated metrics.
    ``serving``: the serving modes chosen on val and each mode's row; the served default's test row
    heads the report and ``metrics.json`` names it (``served``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = aggregate(per_seed)
    seeds = sorted(per_seed)
    cost = {k: _ms([per_seed[s]["cost"][k] for s in seeds])[0] for k in per_seed[seeds[0]]["cost"]}
    metrics_json: dict[str, Any] = {
        "recipe": recipe,
        "seeds": seeds,
        "served": serving[1][serving[0].mode] if serving else "ocd",
        "rows": agg,
        "cost": cost,
        "per_seed": {str(s): per_seed[s] for s in seeds},
    }
    if serving:
        metrics_json["serving"] = serving[0].model_dump(mode="json")
    atomic_write_text(json.dumps(metrics_json, indent=2), out_dir / "metrics.json")
    metric_names = list(next(iter(agg.values())).keys())
    lower_better = {"ce", "mse"}

    lines = [f"# {recipe['name']} — OCD evaluation ({recipe.get('variant', '')} recipe)", ""]
    if serving:
        lines += served_section(serving[0], serving[1], agg, metric_names)
    lines += [
        f"Test split: {recipe.get('n_test')} samples never seen by the base or the diffusion model. "
        f"Seeds: {seeds} (each seed trains its own base model, targets, diffusion and scale nets). "
        "Mean ± sd over seeds; the gain columns are paired: row − base on the same base model and "
        "the same test samples, per seed, then mean ± sd.",
        "",
    ]
    head = "| row | " + " | ".join(f"{m} | gain {m}" for m in metric_names) + " |"
    lines += [head, "|" + "---|" * (1 + 2 * len(metric_names))]
    for row, ms in agg.items():
        title = ROW_TITLES.get(row, f"DDIM {row.split('_')[1]} steps (1 sample)" if row.startswith("ddim_") else row)
        if row == "alt_layer":
            title = (
                f"ablation: alternative layer `{recipe.get('alt_layer')}` instead of `{recipe.get('layer')}` (1 sample)"
            )
        cells = []
        for m in metric_names:
            v = ms[m]
            cells.append(f"{_fmt(m, v['mean'])} ± {_fmt(m, v['sd'])}")
            cells.append("—" if row == "base" else f"{_fmt(m, v['gain_mean'])} ± {_fmt(m, v['gain_sd'])}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy in %, gains in percentage points; "
        + ", ".join(f"{m}: {'lower' if m in lower_better else 'higher'} is better" for m in metric_names)
        + ".",
        "",
    ]
    lines += [
        "## Per-seed paired gain of OCD over the base model",
        "",
        "| seed | "
        + " | ".join(f"base {m} | OCD {m} | OCD−base {m} | ens {m} | ens−base {m}" for m in metric_names)
        + " |",
        "|" + "---|" * (1 + 5 * len(metric_names)),
    ]
    for i, s in enumerate(seeds):
        cells = []
        for m in metric_names:
            b, o, e = agg["base"][m]["per_seed"][i], agg["ocd"][m]["per_seed"][i], agg["ocd_ensemble"][m]["per_seed"][i]
            cells += [_fmt(m, b), _fmt(m, o), _fmt(m, o - b), _fmt(m, e), _fmt(m, e - b)]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost per prediction (batch 1, this machine)",
        "",
        f"- base: {cost['base_ms']:.3f} ms, {cost['base_flops'] / 1e6:.2f} MFLOP",
        f"- OCD ({recipe.get('default_steps')} DDIM steps, 1 sample): {cost['ocd_ms']:.3f} ms, "
        f"{cost['ocd_flops'] / 1e6:.2f} MFLOP ({cost['ocd_flops'] / max(cost['base_flops'], 1):.1f}x the base FLOPs)",
        *([f"- TENT peer (3 steps, backward passes): {cost['tent_3_ms']:.3f} ms"] if "tent_3_ms" in cost else []),
        "",
    ]
    lines += ["## Plots", "", "![training curves](training_curves.png)", "", "![DDIM steps](ddim_steps.png)", ""]
    if (out_dir / "renders.png").exists():  # image outputs: written by render_strip
        lines += [
            "Test views of the first seed; rows: ground truth, base model, OCD (1 sample), |OCD − base| x 10:",
            "",
            "![renders](renders.png)",
            "",
        ]
    if "reliability" in per_seed[seeds[0]]:
        lines += ["![reliability](reliability.png)", ""]
        ece = {k: _ms([per_seed[s]["reliability"][k]["ece"] for s in seeds]) for k in ("base", "ocd_ensemble")}
        lines += [
            f"Expected calibration error: base {ece['base'][0]:.4f} ± {ece['base'][1]:.4f}, "
            f"OCD ensemble {ece['ocd_ensemble'][0]:.4f} ± {ece['ocd_ensemble'][1]:.4f}.",
            "",
        ]
        aurocs = {
            k: [per_seed[s]["reliability"][k].get("error_auroc") for s in seeds] for k in ("base", "ocd_ensemble")
        }
        if all(v is not None for vals in aurocs.values() for v in vals):
            au = {k: _ms(v) for k, v in aurocs.items()}
            lines += [
                "Error detection by the served uncertainty (AUROC of the predictive entropy for telling wrong "
                f"answers from right ones; 0.5 is chance): base {au['base'][0]:.4f} ± {au['base'][1]:.4f}, "
                f"OCD ensemble {au['ocd_ensemble'][0]:.4f} ± {au['ocd_ensemble'][1]:.4f}.",
                "",
            ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2), "```", ""]
    if (out_dir / "layer_selection.json").exists():  # written by `ocd select-layer`; kept across retraining
        from training.select_layer import layer_section

        lines += [layer_section(json.loads((out_dir / "layer_selection.json").read_text()))]
    atomic_write_text("\n".join(lines), out_dir / "report.md")
    _plots(out_dir, agg, per_seed, histories, metric_names)
    return metrics_json


def served_section(
    serving: ServingDefaults, rows: dict[str, str], agg: dict[str, Any], metric_names: list[str]
) -> list[str]:
    """The headline: the served default mode's test row, and every mode's val evidence beside its test gain."""
    mode = serving.mode
    row = agg[rows[mode]]
    worse = [
        f"{m} on seed {i}"
        for m in metric_names
        for i, g in enumerate(row[m]["gain_per_seed"])
        if (g < 0 if m in ("acc", "psnr") else g > 0)
    ]
    spec = serving.all_modes()[mode]
    members = "1 sample" if spec.ensemble == 1 else f"ensemble of {spec.ensemble}"
    how = "the base model alone" if spec.ddim_steps == 0 else f"{members}, {spec.ddim_steps} DDIM steps"
    lines = [
        f"**Served default: `{mode}`** ({how}), chosen on the val split: {serving.chosen}.",
        "",
        "On test (paired gain over the base model, mean ± sd over seeds): "
        + ", ".join(f"{m} {_fmt(m, row[m]['gain_mean'])} ± {_fmt(m, row[m]['gain_sd'])}" for m in metric_names)
        + ("; not worse than the base on any seed." if not worse else f"; worse than the base on: {', '.join(worse)}."),
        "",
        "| mode | DDIM steps | members | time / base's | "
        + " | ".join(f"val gain {m} | test gain {m}" for m in metric_names)
        + " |",
        "|" + "---|" * (4 + 2 * len(metric_names)),
    ]
    for name, spec in serving.all_modes().items():
        if name not in rows or rows[name] not in agg:
            continue
        cells = []
        for m in metric_names:
            v = spec.val.get(m)
            t = agg[rows[name]][m]
            cells.append(f"{_fmt(m, v['mean'])} ± {_fmt(m, v['sd'])}" if v else "—")
            cells.append(f"{_fmt(m, t['gain_mean'])} ± {_fmt(m, t['gain_sd'])}")
        mark = " **(served)**" if name == mode else ""
        cost = "—" if spec.cost is None else f"{spec.cost:.1f}x"
        lines.append(f"| `{name}`{mark} | {spec.ddim_steps} | {spec.ensemble} | {cost} | " + " | ".join(cells) + " |")
    unit = "Accuracy gains in percentage points. " if "acc" in metric_names else ""
    lines += [
        "",
        f"{unit}The val gains chose the default; the test gains report it. Time: a batch of up to 64 "
        "inputs in that mode over the base model alone, on the machine that published the bundle "
        "(the default may cost at most the recipe's `eval.max_cost`, 5x unless set).",
        "",
    ]
    return lines


@torch.no_grad()
def render_strip(model, x: torch.Tensor, y: torch.Tensor, steps: int, path: Path) -> None:
    """A PNG grid for image outputs: ground truth, base, OCD and 10x their difference, per view."""
    from PIL import Image

    ocd = model.predict(x, steps, 1, seeds=list(range(x.shape[0])))
    rows = [y, ocd.base, ocd.mean, ((ocd.mean - ocd.base).abs() * 10)]
    grid = torch.cat([torch.cat(list(r.clamp(0, 1).cpu()), -1) for r in rows], -2)  # (3, 4H, N·W)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)


def _plots(out_dir: Path, agg, per_seed, histories, metric_names) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for s, h in histories.items():
        axes[0].plot(h.get("base_train_loss", []), label=f"seed {s} train")
        if h.get("base_val_loss"):
            axes[0].plot(h["base_val_loss"], "--", label=f"seed {s} val")
        k = max(1, len(h["denoise_mse"]) // 200)

        def smooth(v: list[float], k: int = k) -> list[float]:
            return [sum(v[i : i + k]) / len(v[i : i + k]) for i in range(0, len(v), k)]

        axes[1].plot([i * k for i in range(len(smooth(h["denoise_mse"])))], smooth(h["denoise_mse"]), label=f"seed {s}")
        axes[2].plot([i * k for i in range(len(smooth(h["scale_db"])))], smooth(h["scale_db"]), label=f"seed {s}")
    axes[0].set(title="base model loss", xlabel="epoch")
    axes[1].set(title="denoiser MSE (ε or x0 target)", xlabel="step", yscale="log")
    axes[2].set(title="scale loss (dB)", xlabel="step")
    for a in axes:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "training_curves.png", dpi=100)
    plt.close(fig)

    steps = sorted(int(r.split("_")[1]) for r in agg if r.startswith("ddim_"))
    fig, axes = plt.subplots(1, len(metric_names), figsize=(6 * len(metric_names), 4), squeeze=False)
    for a, m in zip(axes[0], metric_names):
        mean = [agg[f"ddim_{s}"][m]["mean"] for s in steps]
        sd = [agg[f"ddim_{s}"][m]["sd"] for s in steps]
        a.errorbar(steps, mean, yerr=sd, marker="o", label="OCD (1 sample)")
        a.axhline(agg["base"][m]["mean"], color="k", ls="--", label="base")
        a.axhline(agg["oracle"][m]["mean"], color="g", ls=":", label="oracle")
        a.set(xscale="log", xlabel="DDIM steps", ylabel=m, title=f"{m} vs DDIM steps")
        a.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "ddim_steps.png", dpi=100)
    plt.close(fig)

    seeds = sorted(per_seed)
    if "reliability" in per_seed[seeds[0]]:
        fig, a = plt.subplots(figsize=(5, 5))
        for key, style in (("base", "o--"), ("ocd_ensemble", "s-")):
            bins = per_seed[seeds[0]]["reliability"][key]["bins"]
            a.plot([b["conf"] for b in bins], [b["acc"] for b in bins], style, label=f"{key} (seed {seeds[0]})")
        a.plot([0, 1], [0, 1], "k:", lw=1)
        a.set(xlabel="confidence", ylabel="accuracy", title="reliability diagram")
        a.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "reliability.png", dpi=100)
        plt.close(fig)
