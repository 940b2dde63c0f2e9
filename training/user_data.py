"""Data as users keep it, for ``ocd fit``: an image folder (one sub-folder per class), a CSV with a
target column, a folder of WAV files per class, or an ``.npz`` with arrays ``x`` and ``y``.

Each loader returns a ``UserData``: every sample in model space (x), targets (y), the class names,
and what the bundle's manifest needs to preprocess requests the same way. Statistics (image and
audio mean/std, tabular scaling and categories) are fitted on the training split only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ocd_core.bundle import Normalization
from ocd_core.preprocess import TabularSpec
from training.data.splits import Split, make_split
from training.inputs import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class UserData:
    x: torch.Tensor  # (N, *input) model space
    y: torch.Tensor  # (N,) class index or (N, *out) regression target
    split: Split
    modality: str
    labels: list[str] | None = None
    normalization: Normalization | None = None
    tabular: TabularSpec | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def part(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(getattr(self.split, name))
        return self.x[idx], self.y[idx]


def _split(n: int, val: float, test: float, seed: int) -> Split:
    n_val, n_test = round(n * val), round(n * test)
    if n - n_val - n_test < 2 or n_val < 1 or n_test < 1:
        raise InputError("data", f"{n} samples are too few to split into train / val / test ({val:g}, {test:g})")
    return make_split(n, n_val, n_test, seed)


def _class_files(root: Path, suffixes: set[str], what: str) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, ys = [], []
    for i, c in enumerate(classes):
        found = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in suffixes)
        files += found
        ys += [i] * len(found)
    if len(classes) < 2 or not files:
        raise InputError(
            "data", f"{root}: expected one sub-folder per class (at least 2) holding {what} files; found {classes}"
        )
    return files, ys, classes


def _fit_norm(x: torch.Tensor, split: Split, per_channel: bool) -> tuple[torch.Tensor, Normalization]:
    tr = x[torch.tensor(split.train)]
    if per_channel:  # (N, C, H, W): one statistic per channel
        mean, std = tr.mean(dim=(0, 2, 3)), tr.std(dim=(0, 2, 3)).clamp_min(1e-6)
        view = (1, -1, 1, 1)
    else:
        mean, std = tr.mean().reshape(1), tr.std().clamp_min(1e-6).reshape(1)
        view = (1,) * x.ndim
    return (x - mean.view(view)) / std.view(view), Normalization(mean=mean.tolist(), std=std.tolist())


def image_folder(root: Path, shape: list[int] | None, val: float, test: float, seed: int) -> UserData:
    """root/<class>/*.png|jpg -> (N, C, H, W) in [0, 1], normalised per channel on train. ``shape``
    (C, H, W) resizes and converts (1: grey, 3: RGB); default: the first image's size and colours."""
    from PIL import Image

    files, ys, classes = _class_files(root, IMAGE_SUFFIXES, "PNG / JPEG")
    if shape is not None and (len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1):
        raise InputError("input_shape", f"an image is (channels 1 or 3, height, width), got {shape}")
    if shape is None:
        with Image.open(files[0]) as im:
            shape = [1 if im.mode in ("L", "1", "I;16", "I") else 3, im.height, im.width]
    c, h, w = shape
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.float32).reshape(h, w, c).transpose(2, 0, 1) / 255.0)
        except OSError as e:
            raise InputError("data", f"{f}: not a readable image ({e})") from None
    x = torch.from_numpy(np.stack(arrays))
    split = _split(len(x), val, test, seed)
    x, norm = _fit_norm(x, split, per_channel=True)
    return UserData(x, torch.tensor(ys), split, "image", classes, norm, source={"images": str(root), "n": len(x)})


def wav_folder(root: Path, val: float, test: float, seed: int) -> UserData:
    """root/<class>/*.wav -> (N, 1, n_mels, frames) log-mel (the audio modality's front end),
    standardised with one mean / std fitted on train."""
    from ocd_core.audio import AudioError, AudioSpec, clip_to_features, mel_filterbank, read_wav

    files, ys, classes = _class_files(root, {".wav"}, "WAV")
    spec = AudioSpec()
    fb, feats = mel_filterbank(spec), []
    for f in files:
        try:
            wav, rate = read_wav(f.read_bytes())
            feats.append(clip_to_features(wav, rate, spec, fb))
        except AudioError as e:
            raise InputError("data", f"{f}: {e.reason}") from None
    x = torch.stack(feats)
    split = _split(len(x), val, test, seed)
    x, norm = _fit_norm(x, split, per_channel=False)
    return UserData(x, torch.tensor(ys), split, "audio", classes, norm, source={"wavs": str(root), "n": len(x)})


def csv_file(path: Path, target: str | None, task: str, val: float, test: float, seed: int) -> UserData:
    """A CSV with a header and a ``target`` column: numbers standardised and categories one-hot,
    fitted on train (training/data/tabular.py, as the tabular recipes)."""
    import pandas as pd

    from training.data.tabular import encode_frame, fit_spec

    try:
        df = pd.read_csv(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:  # pandas' ParserError / EmptyDataError are ValueErrors
        raise InputError(
            "data", f"{path.name}: not a readable CSV ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if target is None:
        raise InputError("target", f"name the CSV's target column; columns: {list(df.columns)}")
    if target not in df.columns:
        raise InputError("target", f"{target!r} is not a column of {path.name}; columns: {list(df.columns)}")
    df = df[df[target].notna()].reset_index(drop=True)
    split = _split(len(df), val, test, seed)
    spec = fit_spec(df, target, task, "none", split.train)
    labels = sorted(str(v) for v in df[target].unique()) if task == "classification" else None
    x, y = encode_frame(df, spec, task, labels)
    return UserData(x, y, split, "tabular", labels, tabular=spec, source={"csv": str(path), "rows": len(df)})


def npz_file(path: Path, modality: str, val: float, test: float, seed: int) -> UserData:
    """Arrays ``x`` (N, *input) in model space and ``y``; optional ``labels`` (class names)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise InputError("data", f"{path.name} has no array {missing[0]!r}; it holds {z.files}")
            x, y = torch.from_numpy(z["x"].astype(np.float32)), torch.from_numpy(z["y"])
            labels = [str(v) for v in z["labels"]] if "labels" in z.files else None
    except InputError:
        raise
    except (ValueError, OSError, TypeError) as e:  # not an npz, object arrays (pickles), non-numeric arrays
        raise InputError(
            "data", f"{path.name}: not a readable .npz of numeric arrays ({str(e).splitlines()[0]})"
        ) from None
    split = _split(len(x), val, test, seed)
    return UserData(x, y, split, modality, labels, source={"npz": str(path), "n": len(x)})


def load(
    path: Path,
    modality: str | None,
    target: str | None,
    task: str,
    shape: list[int] | None,
    val: float,
    test: float,
    seed: int,
) -> UserData:
    """The layout from the path (folder of images or WAVs, .csv, .npz); ``modality`` picks between
    the folder layouts when given."""
    if not path.exists():
        raise InputError("data", f"{path} does not exist")
    if path.is_dir():
        wavs = any(p.suffix.lower() == ".wav" for p in path.glob("*/*"))
        if modality == "audio" or (modality is None and wavs):
            return wav_folder(path, val, test, seed)
        return image_folder(path, shape, val, test, seed)
    if path.suffix.lower() == ".csv":
        return csv_file(path, target, task, val, test, seed)
    if path.suffix.lower() == ".npz":
        return npz_file(path, modality or "tensor", val, test, seed)
    raise InputError("data", f"{path}: expected a folder of class sub-folders, a .csv or a .npz file")
