"""Which layer to adapt, chosen on the validation voices: OCD's accuracy gain over the base model on
the val split (1,000 clips of voices in neither train nor test) for each trained variant's bundles.
The variants share their base models, so the gains are paired.

    python training/notes/spoken_digits_val_layers.py [--variants conv1,conv2]

Needs the variants' runs (`ocd train spoken_digits --variant conv1`, `... conv2`) under runs/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from ocd_core.bundle import load_bundle
from ocd_core.nets import build_net
from training.datasets import prepare
from training.pipeline import run_id
from training.recipes import RECIPES


@torch.no_grad()
def val_gains(variants: list[str], runs: Path = Path("runs"), steps: int = 10) -> dict[str, list[float]]:
    """variant -> per-seed accuracy gain (points) of 1-sample OCD over the base model on the val split."""
    out: dict[str, list[float]] = {}
    for variant in variants:
        recipe = RECIPES["spoken_digits"](variant)
        prep = prepare(recipe, runs / "cache")
        x, y = prep.parts["val"]
        run = runs / f"spoken_digits-{variant}-{run_id(recipe)}"
        out[variant] = []
        for seed in recipe.seeds:
            base = build_net(prep.arch.arch, **prep.arch.kwargs)
            base.load_state_dict(load_file(str(run / f"seed{seed}" / "base.safetensors")))
            model, _ = load_bundle(run / f"seed{seed}" / "bundle" / "spoken_digits" / "1")
            seeds = [seed * 1_000_003 + i for i in range(len(x))]
            ocd = torch.cat(
                [model.predict(x[i : i + 250], steps, 1, seeds=seeds[i : i + 250]).mean for i in range(0, len(x), 250)]
            )
            acc = lambda p, y=y: (p.argmax(-1) == y).float().mean().item()
            out[variant].append(100 * (acc(ocd) - acc(base.eval()(x))))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="conv1,conv2")
    gains = val_gains(p.parse_args().variants.split(","))
    print("| variant | val gain per seed (pp) | mean |\n|---|---|---|")
    for v, g in gains.items():
        print(f"| {v} | {' / '.join(f'{x:+.2f}' for x in g)} | {sum(g) / len(g):+.2f} |")
