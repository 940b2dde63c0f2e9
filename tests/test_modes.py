"""Serving modes: the default chosen on val (training/modes.py) and the manifest's modes (ocd_core.bundle)."""

import pytest
from pydantic import ValidationError

from ocd_core.bundle import ServingDefaults, ServingMode
from training.modes import choose, curve_steps, mode_rows, mode_specs

SPECS_ARGS = ([1, 5, 10], 10, 5, 5)  # ddim_steps curve, default steps, ensemble, serve steps


def val_rows(per_mode: dict[str, list[tuple[float, float]]]) -> dict[int, dict[str, dict[str, float]]]:
    """Per seed: base at acc 0.90, ce 0.30; each row at base + (acc gain, ce gain) of that seed."""
    seeds = range(len(next(iter(per_mode.values()))))
    return {
        s: {"base": {"acc": 0.9, "ce": 0.3}}
        | {row: {"acc": 0.9 + g[s][0], "ce": 0.3 + g[s][1]} for row, g in per_mode.items()}
        for s in seeds
    }


def test_modes_and_their_rows():
    assert mode_rows(*SPECS_ARGS) == {
        "base": "base",
        "ocd": "ddim_5",  # served at 5 steps: the steps curve's row
        "ocd_ensemble": "ocd_ensemble",
        "ddim_1": "ddim_1",
        "ddim_10": "ddim_10",
    }
    specs = mode_specs(*SPECS_ARGS)
    assert {k: (m.ddim_steps, m.ensemble) for k, m in specs.items()} == {
        "base": (0, 1),
        "ocd": (5, 1),
        "ocd_ensemble": (10, 5),
        "ddim_1": (1, 1),
        "ddim_10": (10, 1),
    }
    assert mode_rows([2], 2, 3, 2) == {"base": "base", "ocd": "ocd", "ocd_ensemble": "ocd_ensemble"}
    assert curve_steps(mode_rows(*SPECS_ARGS)) == [1, 5, 10]
    assert curve_steps(mode_rows([1, 10], 10, 5, 3)) == [1, 3, 10]  # served at 3 steps, off the curve: measured too


def test_the_best_mode_not_worse_than_base_on_any_seed_wins():
    val = val_rows(
        {
            "ddim_5": [(0.004, -0.01), (-0.001, -0.01), (0.004, -0.01)],  # best mean acc, worse on seed 1
            "ocd_ensemble": [(0.002, -0.002), (0.001, -0.001), (0.0, -0.003)],
            "ddim_1": [(0.0, 0.0), (0.0, 0.0), (0.0, 0.0)],
            "ddim_10": [(0.003, 0.001), (0.003, -0.001), (0.003, -0.001)],  # better acc, ce worse on seed 0
        }
    )
    s = choose(mode_specs(*SPECS_ARGS), mode_rows(*SPECS_ARGS), val, "classification")
    assert s.mode == "ocd_ensemble" and s.ddim_steps == 5
    assert s.modes["ocd_ensemble"].val["acc"]["per_seed"] == pytest.approx([0.002, 0.001, 0.0])
    assert s.modes["ocd_ensemble"].val["acc"]["mean"] == pytest.approx(0.001)
    assert s.modes["ocd"].val["ce"]["mean"] == pytest.approx(-0.01)
    assert s.chosen == (
        "the best paired acc gain on the val split over 3 seeds (+0.10 ± 0.10 pp), and not worse than "
        "the base on any seed or metric; no gain beyond one standard error: ddim_1; "
        "worse than the base on some seed or metric: ddim_10, ocd"
    )


def test_base_is_served_when_no_mode_gains():
    val = val_rows(
        {
            "ddim_5": [(0.0, 0.0), (0.0, 0.0)],  # equal: the base is cheaper
            "ocd_ensemble": [(0.0, 0.01), (0.0, 0.02)],  # ce worse
            "ddim_1": [(0.0, 0.0), (0.0, 0.0)],
            "ddim_10": [(0.01, -0.1), (-0.002, -0.1)],
        }
    )
    s = choose(mode_specs(*SPECS_ARGS), mode_rows(*SPECS_ARGS), val, "classification")
    assert s.mode == "base"
    assert s.chosen == (
        "no adapted mode beat the base model on the val split (2 seeds); no gain beyond one standard "
        "error: ddim_1, ocd; worse than the base on some seed or metric: ddim_10, ocd_ensemble"
    )


def test_a_gain_within_noise_is_not_served():
    val = val_rows(
        {
            "ddim_5": [(0.0, 0.0), (0.0, 0.0), (0.001, 0.0)],  # one image on one seed: mean 0.033, SE 0.033 pp
            "ocd_ensemble": [(0.0, -0.001), (0.0, -0.002), (0.0, 0.0)],  # acc equal: the ce gain counts
            "ddim_1": [(0.002, 0.0), (0.001, 0.0), (0.004, -0.001)],  # mean 0.23 pp, SE 0.088: clear
            "ddim_10": [(0.0, 0.0)] * 3,
        }
    )
    s = choose(mode_specs(*SPECS_ARGS), mode_rows(*SPECS_ARGS), val, "classification")
    assert s.mode == "ddim_1"
    assert s.chosen.endswith("; no gain beyond one standard error: ddim_10, ocd")
    del val[2]  # without the third seed: the ensemble's ce gain is -0.0015 ± 0.0005, ddim_1's acc +0.15 pp
    assert choose(mode_specs(*SPECS_ARGS), mode_rows(*SPECS_ARGS), val, "classification").mode == "ddim_1"
    for rows in val.values():
        rows["ddim_1"]["acc"] = 0.9
    assert choose(mode_specs(*SPECS_ARGS), mode_rows(*SPECS_ARGS), val, "classification").mode == "ocd_ensemble"


def test_a_mode_over_the_cost_budget_is_not_the_default():
    val = val_rows(
        {
            "ddim_5": [(0.001, -0.001)] * 3,
            "ocd_ensemble": [(0.004, -0.004)] * 3,  # the best, and 6x the base's cost
            "ddim_1": [(0.0, 0.0)] * 3,
            "ddim_10": [(-0.001, 0.0)] * 3,
        }
    )
    costs = {"base": 1.0, "ocd": 3.5, "ocd_ensemble": 6.0, "ddim_1": 2.0, "ddim_10": 4.5}
    s = choose(mode_specs(*SPECS_ARGS), mode_rows(*SPECS_ARGS), val, "classification", costs, 5.0)
    assert s.mode == "ocd" and s.modes["ocd_ensemble"].cost == 6.0 and s.modes["base"].cost == 1.0
    assert s.chosen == (
        "the best paired acc gain on the val split over 3 seeds (+0.10 ± 0.00 pp), and not worse than "
        "the base on any seed or metric; better but over the cost budget: ocd_ensemble (6.0x); "
        "no gain beyond one standard error: ddim_1; worse than the base on some seed or metric: ddim_10"
    )
    costs["ocd"] = 5.5
    s = choose(mode_specs(*SPECS_ARGS), mode_rows(*SPECS_ARGS), val, "classification", costs, 5.0)
    assert s.mode == "base" and s.chosen.startswith(
        "no adapted mode within 5x the base model's cost beat it on the val split (3 seeds); "
        "better but over the cost budget: ocd (5.5x), ocd_ensemble (6.0x)"
    )
    assert choose(mode_specs(*SPECS_ARGS), mode_rows(*SPECS_ARGS), val, "classification", costs).mode == "ocd_ensemble"


def test_equal_accuracy_and_better_cross_entropy_is_a_gain():
    val = val_rows(
        {
            "ddim_5": [(0.0, -0.01)] * 3,
            "ocd_ensemble": [(0.0, -0.02)] * 3,
            "ddim_1": [(0.0, -0.02)] * 3,  # as good as the ensemble, and 50x cheaper: wins the tie
            "ddim_10": [(0.0, 0.0)] * 3,
        }
    )
    assert choose(mode_specs(*SPECS_ARGS), mode_rows(*SPECS_ARGS), val, "classification").mode == "ddim_1"


def test_regression_lower_mse_is_better():
    args = ([2], 2, 3, 2)
    val = {
        s: {"base": {"mse": 1.0}, "ocd": {"mse": 1.0 - d}, "ocd_ensemble": {"mse": 1.0 - 2 * d}}
        for s, d in enumerate([0.01, 0.02])
    }
    s = choose(mode_specs(*args), mode_rows(*args), val, "regression")
    assert s.mode == "ocd_ensemble"
    assert s.chosen.startswith("the best paired mse gain on the val split over 2 seeds (-0.03 ± 0.014)")
    worse = {s: {k: {"mse": v["mse"] + (0.5 if k != "base" else 0)} for k, v in r.items()} for s, r in val.items()}
    assert choose(mode_specs(*args), mode_rows(*args), worse, "regression").mode == "base"


def test_no_val_split_serves_base():
    s = choose(mode_specs(*SPECS_ARGS), mode_rows(*SPECS_ARGS), {}, "classification")
    assert s.mode == "base" and s.chosen == "no val split: the base model" and s.modes["ocd"].val == {}


def test_serving_defaults_name_modes_and_refuse_an_unknown_default():
    legacy = ServingDefaults.model_validate({"ddim_steps": 10, "ensemble": 1})  # manifests before modes
    assert legacy.mode == "ocd"
    assert {k: (m.ddim_steps, m.ensemble) for k, m in legacy.all_modes().items()} == {"base": (0, 1), "ocd": (10, 1)}
    s = ServingDefaults(
        ddim_steps=5, mode="ocd_ensemble", modes={"ocd_ensemble": ServingMode(ddim_steps=10, ensemble=5)}
    )
    assert [s.name_of(*p) for p in ((0, 1), (5, 1), (10, 5), (10, 4), (7, 1))] == [
        "base",
        "ocd",
        "ocd_ensemble",
        "custom",
        "custom",
    ]
    with pytest.raises(ValidationError, match=r"serving.mode 'best' is not one of \['base', 'ocd'\]"):
        ServingDefaults(mode="best")
    with pytest.raises(ValidationError, match="ddim_steps\n  Input should be greater than or equal to 0"):
        ServingMode(ddim_steps=-1)
