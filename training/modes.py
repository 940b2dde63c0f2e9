"""Serving modes and the default chosen on the val split (the test split never picks anything).

A mode is how a request is answered (``ocd_core.bundle.ServingMode``): the base model alone, one
adapted sample, an ensemble, other DDIM step counts. Each is measured on val for every seed, as a
paired gain over the same seed's base model, and timed against the base model on a batch. The
default is the mode with the best mean gain on the primary metric among those that are at least as
good as the base on every seed and every metric, gain beyond noise (the mean gain exceeds its
standard error) and cost at most ``max_cost`` times the base; the base model when none does. Ties
go to the cheaper mode. Every mode stays servable on request.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ocd_core.bundle import BASE_MODE, ServingDefaults, ServingMode
from ocd_core.predictor import OCDModel
from training.recipes import EvalConfig

PRIMARY = {"classification": "acc", "regression": "mse"}
HIGHER_IS_BETTER = {"acc": True, "psnr": True, "ce": False, "mse": False}


def mode_rows(ddim_steps: list[int], default_steps: int, ensemble: int, serve_steps: int) -> dict[str, str]:
    """Each mode's evaluation row: base; ocd (one sample at ``serve_steps``); ocd_ensemble
    (``ensemble`` members at ``default_steps``, as the report's ensemble row); ddim_<n> (one sample
    at n steps) for the other step counts of the report's steps curve."""
    rows = {
        BASE_MODE: "base",
        "ocd": "ocd" if serve_steps == default_steps else f"ddim_{serve_steps}",
        "ocd_ensemble": "ocd_ensemble",
    }
    rows.update({f"ddim_{n}": f"ddim_{n}" for n in ddim_steps if n != serve_steps})
    return rows


def curve_steps(rows: dict[str, str]) -> list[int]:
    """The DDIM step counts whose ``ddim_<n>`` rows ``rows`` needs (``evaluate``'s ddim_steps)."""
    return sorted({int(r.removeprefix("ddim_")) for r in rows.values() if r.startswith("ddim_")})


def mode_specs(ddim_steps: list[int], default_steps: int, ensemble: int, serve_steps: int) -> dict[str, ServingMode]:
    """The modes of ``mode_rows``, without evidence."""
    specs = {BASE_MODE: ServingMode(ddim_steps=0), "ocd": ServingMode(ddim_steps=serve_steps)}
    specs["ocd_ensemble"] = ServingMode(ddim_steps=default_steps, ensemble=ensemble)
    specs.update({f"ddim_{n}": ServingMode(ddim_steps=n) for n in ddim_steps if n != serve_steps})
    return specs


def modes_for(e: EvalConfig, serve_steps: int | None = None) -> tuple[dict[str, ServingMode], dict[str, str]]:
    """An evaluation config's serving modes and the row of each, served at ``serve_steps`` (default:
    the config's own ``serve_steps`` or ``default_steps``)."""
    args = (e.ddim_steps, e.default_steps, e.ensemble, serve_steps or e.serve_steps or e.default_steps)
    return mode_specs(*args), mode_rows(*args)


def paired_gains(per_seed: dict[int, dict[str, dict[str, float]]], row: str) -> dict[str, dict[str, Any]]:
    """{metric: {mean, sd, per_seed}} of row − base, per seed (seeds in sorted order)."""
    seeds = sorted(per_seed)
    out = {}
    for metric in per_seed[seeds[0]]["base"]:
        g = [per_seed[s][row][metric] - per_seed[s]["base"][metric] for s in seeds]
        out[metric] = {"mean": statistics.mean(g), "sd": statistics.stdev(g) if len(g) > 1 else 0.0, "per_seed": g}
    return out


@torch.no_grad()
def measure_costs(model: OCDModel, x: torch.Tensor, specs: dict[str, ServingMode], rounds: int = 5) -> dict[str, float]:
    """Each mode's time on the batch x (B, *input) over the base mode's: the fastest of ``rounds``
    interleaved rounds (the machine's noise only ever adds time), after one warm-up round."""
    seeds = list(range(x.shape[0]))
    best = dict.fromkeys(specs, float("inf"))
    for r in range(rounds + 1):
        for name, m in specs.items():
            t = time.perf_counter()
            model.predict(x, m.ddim_steps, m.ensemble, seeds=seeds)
            if r:
                best[name] = min(best[name], time.perf_counter() - t)
    return {name: best[name] / best[BASE_MODE] for name in specs}


def _better(metric: str, gain: float) -> float:
    """A gain as "higher is better" (an MSE that falls is a positive number)."""
    return gain if HIGHER_IS_BETTER.get(metric, False) else -gain


def choose(
    specs: dict[str, ServingMode],
    rows: dict[str, str],
    val: dict[int, dict[str, dict[str, float]]],
    task: str,
    costs: dict[str, float] | None = None,
    max_cost: float | None = None,
) -> ServingDefaults:
    """The serving defaults: every mode with its val evidence (``val``: per seed, {row: metrics}) and
    cost (``costs``: time over the base's, ``measure_costs``), and the chosen default with the reason.
    A mode over ``max_cost`` is not a default. No val evidence: the base model, said so."""
    adapted = specs.get("ocd", ServingMode(ddim_steps=10))
    costs = costs or {}
    specs = {n: m.model_copy(update={"cost": costs.get(n)}) for n, m in specs.items()}
    if not val:
        return ServingDefaults(
            ddim_steps=adapted.ddim_steps, mode=BASE_MODE, modes=specs, chosen="no val split: the base model"
        )
    primary = PRIMARY[task]
    modes = {name: spec.model_copy(update={"val": paired_gains(val, rows[name])}) for name, spec in specs.items()}

    metrics = [primary, *(k for k in modes[BASE_MODE].val if k != primary)]  # the primary metric first

    def key(name: str) -> tuple[float, ...]:  # best first: the metrics' mean gains in order, then cost
        m = modes[name]  # (the measured cost; steps x members where none was measured)
        return (*(_better(k, m.val[k]["mean"]) for k in metrics), -costs.get(name, m.ddim_steps * m.ensemble))

    def safe(name: str) -> bool:  # not worse than base on any seed, on any metric
        return all(_better(k, g) >= 0 for k, v in modes[name].val.items() for g in v["per_seed"])

    def clear(name: str) -> bool:
        """A gain beyond noise: on the first metric that moved, the mean gain exceeds its standard error."""
        for k in metrics:
            g = [_better(k, x) for x in modes[name].val[k]["per_seed"]]
            if any(g):
                se = statistics.stdev(g) / len(g) ** 0.5 if len(g) > 1 else 0.0  # one seed: no noise estimate
                return statistics.mean(g) > se * (1 + 1e-9)  # one seed of several moved: mean == SE exactly
        return False

    def affordable(name: str) -> bool:
        return max_cost is None or costs.get(name, 0.0) <= max_cost

    adapted_modes = [n for n in modes if n != BASE_MODE]
    worse = sorted(n for n in adapted_modes if not safe(n))
    noise = sorted(n for n in adapted_modes if safe(n) and not clear(n))
    too_dear = sorted(n for n in adapted_modes if safe(n) and clear(n) and not affordable(n))
    eligible = [n for n in adapted_modes if safe(n) and clear(n) and affordable(n)]
    best = max(eligible, key=key) if eligible else BASE_MODE
    n_seeds = len(val)
    if best == BASE_MODE:
        why = (
            f"no adapted mode within {max_cost:g}x the base model's cost beat it"
            if too_dear
            else "no adapted mode beat the base model"
        ) + f" on the val split ({n_seeds} seeds)"
    else:
        g = modes[best].val[primary]
        gain = (
            f"{100 * g['mean']:+.2f} ± {100 * g['sd']:.2f} pp"
            if primary == "acc"
            else f"{g['mean']:+.4g} ± {g['sd']:.2g}"
        )
        why = (
            f"the best paired {primary} gain on the val split over {n_seeds} seeds ({gain}), "
            "and not worse than the base on any seed or metric"
        )
    if too_dear:
        why += "; better but over the cost budget: " + ", ".join(f"{n} ({costs[n]:.1f}x)" for n in too_dear)
    if noise:
        why += f"; no gain beyond one standard error: {', '.join(noise)}"
    if worse:
        why += f"; worse than the base on some seed or metric: {', '.join(worse)}"
    return ServingDefaults(ddim_steps=adapted.ddim_steps, mode=best, modes=modes, chosen=why)
