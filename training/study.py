"""Where does OCD's gap to retrieval come from? Variants of the diffusion stage on a finished run,
measured on the val split only (the test split never picks anything).

    python -m training.study runs/mnist-fast-<id> --out reports/mnist-fast-study

For every seed of the run (its base model and targets are reused), each variant trains the
conditioning + denoiser + scale nets again with its own ``FitConfig`` changes (or reuses the run's
bundle, ``{}``) and is evaluated on val: one sample, the ensemble, and the retrieval baselines. The
retrieval-initialised rows start DDIM from the k-NN average delta noised to ``t0`` instead of pure
noise (SDEdit): the denoiser refines what retrieval found. Results: ``study.json``, ``study.md``,
``study.png`` (paired val gain per variant).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch
from tqdm.auto import tqdm

from ocd_core.adapt import adapted_forward
from ocd_core.bundle import load_bundle
from ocd_core.fit import FitConfig, TargetSet, build_target_set, fit_ocd
from ocd_core.io import atomic_write_text
from ocd_core.nets import build_net
from ocd_core.predictor import OCDModel, draw_noise
from training.datasets import prepare
from training.evaluate import KNN, evaluate, metrics, nearest_neighbour_deltas
from training.pipeline import eval_arch
from training.recipes import Recipe

matplotlib.use("Agg")
import matplotlib.pyplot as plt

VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": {},  # the run's own bundle
    "denoiser_x4": {"denoiser": {"hidden": 64, "depth": 2, "probes": 8}},  # hidden x4, depth 2, probes x2
    "steps_x4": {"train_steps": 8000},
    # targets also on 2 random affine views of every training image, which the base model gets wrong
    # more often than the images it was trained on: deltas that correct a prediction, not only sharpen it
    "augmented_targets": {"augment": 2},
}


def affine_views(x: torch.Tensor, views: int, seed: int) -> torch.Tensor:
    """``views`` random affine copies of images x (N, C, H, W): rotation ±7.5°, shift ±5 % of the
    side, scale 0.95-1.05, the background (each image's minimum) filled in -> (views·N, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(views):
        n = x.shape[0]
        ang = (torch.rand(n, generator=g) * 2 - 1) * torch.pi / 24
        sc = 0.95 + 0.1 * torch.rand(n, generator=g)
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.1
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = ang.cos() / sc, -ang.sin() / sc
        theta[:, 1, 0], theta[:, 1, 1] = ang.sin() / sc, ang.cos() / sc
        theta[:, :, 2] = shift
        bg = x.amin(dim=(1, 2, 3), keepdim=True)
        grid = torch.nn.functional.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        out.append(torch.nn.functional.grid_sample(x - bg, grid, align_corners=False) + bg)
    return torch.cat(out)


def _merge(cfg: FitConfig, change: dict[str, Any]) -> FitConfig:
    raw = cfg.model_dump()
    for k, v in change.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
    return FitConfig.model_validate(raw)


@torch.no_grad()
def retrieval_init(
    model: OCDModel, train: TargetSet, x: torch.Tensor, seeds: list[int], t0: int, steps: int
) -> torch.Tensor:
    """Deltas (N, *W) from DDIM started at ``t0`` on the k-NN average delta (in the denoiser's unit
    space, ρ from the scale net) noised with each sample's seed, in ``steps`` steps down to 0."""
    lat = model.latents(x)
    rho = model.scale_net(*lat.flat()).view(-1, *[1] * len(model.delta_shape))
    unit = nearest_neighbour_deltas(model, train, x, KNN) / rho
    noise, _ = draw_noise(seeds, 1, model.delta_shape, steps, 0.0, x.device)
    sched = model.schedule
    xt = sched.q_sample(unit, torch.full((x.shape[0],), t0, device=x.device), noise)
    ctx = model.denoiser.prepare(model.cond(*lat.flat(), lat.grad))
    ts = [round(t0 * (steps - i) / steps) for i in range(steps)]
    for i, t in enumerate(ts):
        out = model.denoiser(xt, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), ctx)
        xt = sched.step(out, t, xt, ts[i + 1] if i + 1 < steps else -1, model.prediction)
    return xt * rho


def val_rows(model: OCDModel, targets: TargetSet, recipe: Recipe, x, y, seed: int) -> dict[str, dict[str, float]]:
    e = recipe.eval
    steps = e.serve_steps or e.default_steps
    rows = evaluate(
        model, x, y, targets, recipe.fit.targets, [], steps, e.ensemble, seed,
        progress=False, only={"base", "ocd", "ocd_ensemble", "nearest_neighbour", "knn_average", "noise_delta"},
    )["rows"]  # fmt: skip
    seeds = [seed * 1_000_003 + i for i in range(x.shape[0])]
    for t0 in (200, 500, 900):
        d = retrieval_init(model, targets, x, seeds, t0, 5)
        rows[f"knn_init_t{t0}"] = metrics(model.head(adapted_forward(model.base, model.layer, x, d)), y, model.task)
    return rows


def run(run_dir: Path, out: Path, variants: list[str], device: str = "cpu") -> dict[str, Any]:
    recipe = Recipe.model_validate_json((run_dir / "recipe.json").read_text())
    prep = prepare(recipe, run_dir.parent / "cache")
    xva, yva = (t.to(device) for t in prep.parts.get("val_served", prep.parts["val"]))
    results: dict[str, Any] = {"recipe": recipe.name, "variant": recipe.variant, "rows": {}, "fit_s": {}}
    path = out / "study.json"
    if path.exists():
        results = json.loads(path.read_text())
    for seed in tqdm(recipe.seeds, desc="seeds"):
        d = run_dir / f"seed{seed}"
        targets = TargetSet.load(d / "targets.safetensors", device)
        for name in variants:
            key = f"{name}/{seed}"
            if key in results["rows"]:
                continue
            if not VARIANTS[name]:
                model, _ = load_bundle(d / "bundle" / recipe.name / "1", device)
                fit_s = None
            else:
                base = build_net(prep.arch.arch, **prep.arch.kwargs).to(device)
                from safetensors.torch import load_file

                base.load_state_dict(load_file(str(d / "base.safetensors"), device=device))
                base.eval()
                change = dict(VARIANTS[name])
                views = change.pop("augment", 0)
                fit = _merge(recipe.fit, change).model_copy(update={"seed": seed})
                t = time.perf_counter()
                tset = targets
                if views:
                    xtr, ytr = (v.to(device) for v in prep.parts["train"])
                    xs = torch.cat([xtr, affine_views(xtr, views, seed)])
                    tset = build_target_set(
                        base, recipe.layer, xs, ytr.repeat(views + 1), fit.targets, task=prep.task, progress=False
                    )
                model, _ = fit_ocd(base, recipe.layer, tset, fit, prep.task, progress=False)
                fit_s = time.perf_counter() - t
            with eval_arch(model.base, recipe):  # as served (tinyNeRF: every pixel)
                results["rows"][key] = val_rows(model, targets, recipe, xva, yva, seed)
            results["fit_s"][key] = fit_s
            results.setdefault("params", {})[name] = " + ".join(
                f"{sum(p.numel() for p in m.parameters()) / 1000:.0f} K" for m in (model.cond, model.denoiser)
            )
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps(results, indent=2), path)
    write(results, out, recipe.seeds)
    return results


def write(results: dict[str, Any], out: Path, seeds: list[int]) -> None:
    """study.md: per variant and row, the paired val gain (mean ± sd over the seeds done), one table
    per metric; study.png: the primary metric's gains."""
    variants = sorted({k.split("/")[0] for k in results["rows"]}, key=list(VARIANTS).index)
    have = next(iter(results["rows"].values()))
    metrics = list(have["base"])
    order = ["ocd", "ocd_ensemble", "noise_delta", "nearest_neighbour", "knn_average"]
    rows = [r for r in order if r in have] + sorted(r for r in have if r not in order and r != "base")
    lines = [
        f"# {results['recipe']} ({results['variant']}): where OCD's gap comes from (val split)",
        "",
        f"Paired gain over the base model on the val split, mean ± sd over the seeds done (of {seeds}); "
        "accuracy in percentage points (higher is better), cross-entropy and MSE lower is better. "
        "Written by `python -m training.study`; the rows are explained in its docstring.",
    ]
    fig, ax = plt.subplots(figsize=(10, 4))
    for metric in metrics:
        scale = 100 if metric == "acc" else 1
        lines += [
            "",
            f"### {metric}",
            "",
            "| variant | seeds | params (cond + denoiser) | fit s/seed | " + " | ".join(rows) + " |",
            "|" + "---|" * (4 + len(rows)),
        ]
        for j, v in enumerate(variants):
            done = [s for s in seeds if f"{v}/{s}" in results["rows"]]
            cells, means = [], []
            for r in rows:
                g = [
                    scale * (results["rows"][f"{v}/{s}"][r][metric] - results["rows"][f"{v}/{s}"]["base"][metric])
                    for s in done
                ]
                m, sd = statistics.mean(g), statistics.stdev(g) if len(g) > 1 else 0.0
                cells.append(f"{m:+.2f} ± {sd:.2f}" if metric == "acc" else f"{m:+.4f} ± {sd:.4f}")
                means.append(m)
            fits = [results["fit_s"][f"{v}/{s}"] for s in done]
            fit = f"{statistics.mean(fits):.0f}" if all(f is not None for f in fits) else "(run's)"
            params = results.get("params", {}).get(v, "?")
            lines.append(f"| {v} | {','.join(map(str, done))} | {params} | {fit} | " + " | ".join(cells) + " |")
            if metric == metrics[0]:
                ax.bar([i + j * 0.8 / len(variants) for i in range(len(rows))], means, 0.8 / len(variants), label=v)
    ax.set_xticks([i + 0.4 - 0.4 / len(variants) for i in range(len(rows))], rows, rotation=20, fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(
        ylabel=f"val gain {metrics[0]}" + (" (pp)" if metrics[0] == "acc" else ""), title="paired val gain over base"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=100)
    plt.close(fig)
    atomic_write_text("\n".join(lines) + "\n", out / "study.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    run(a.run_dir, a.out, a.variants.split(","), a.device)


if __name__ == "__main__":
    main()
