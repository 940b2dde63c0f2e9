"""Spoken digits synthesised with Debian's espeak-ng: accents x voice variants x speeds x pitches,
with noise and gain changes. Test and val voices (variants) never appear in training.

Clips are featurised with ocd_core.audio exactly as the service does, and the features are cached
on disk (keyed by the generation settings)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ocd_core.audio import AudioSpec, clip_to_features, read_wav
from ocd_core.io import atomic_save_file

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029"]


def variants() -> list[str]:
    """espeak-ng's voice variants (timbres), sorted."""
    out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[4].split("/")[-1] for line in out.splitlines()[1:] if len(line.split()) >= 5})


def require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")


def synthesize(word: str, voice: str, speed: int, pitch: int) -> bytes:
    return subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        capture_output=True,
        check=True,
    ).stdout


def build(
    spec: AudioSpec, n_variants: int | None, accents: list[str], seed: int, cache: Path, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(features (N, 1, n_mels, frames), labels (N,), voice name per clip), cached."""
    require_espeak()
    vs = variants()[:n_variants] if n_variants else variants()
    key = hashlib.sha256(json.dumps([spec.model_dump(), vs, accents, seed]).encode()).hexdigest()[:12]
    path = cache / f"spoken_digits-{key}.safetensors"
    voices = [f"{a}+{v}" for v in vs for a in accents]
    if path.exists():
        d = load_file(str(path))
        return d["x"], d["y"], [voices[i] for i in d["voice"].tolist()]
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for vi, voice in enumerate(voices):
        for digit, word in enumerate(WORDS):
            speed = int(torch.randint(120, 221, (1,), generator=g))
            pitch = int(torch.randint(20, 81, (1,), generator=g))
            gain = float(torch.empty(1).uniform_(0.2, 1.0, generator=g))
            snr_db = float(torch.empty(1).uniform_(10, 40, generator=g))
            jobs.append(
                (vi, voice, digit, word, speed, pitch, gain, snr_db, int(torch.randint(0, 2**31, (1,), generator=g)))
            )

    def run(job):
        vi, voice, digit, word, speed, pitch, gain, snr_db, noise_seed = job
        wav, rate = read_wav(synthesize(word, voice, speed, pitch))
        wav = wav * gain
        power = wav.pow(2).mean().clamp_min(1e-10)
        noise = torch.randn(wav.shape, generator=torch.Generator().manual_seed(noise_seed))
        wav = wav + noise * (power / 10 ** (snr_db / 10)).sqrt()
        return clip_to_features(wav, rate, spec), digit, vi

    with ThreadPoolExecutor(4) as pool:
        out = list(tqdm(pool.map(run, jobs), total=len(jobs), desc="espeak-ng", disable=not progress, leave=False))
    x = torch.stack([o[0] for o in out])
    y = torch.tensor([o[1] for o in out])
    vid = torch.tensor([o[2] for o in out])
    atomic_save_file({"x": x, "y": y, "voice": vid}, path)
    return x, y, [voices[i] for i in vid.tolist()]


def voice_split(voice_names: list[str], every: int = 5) -> tuple[list[int], list[int], list[int]]:
    """Indices (train, val, test): variants k*every go to test, k*every+2 to val, all accents of them."""
    vs = sorted({v.split("+", 1)[1] for v in voice_names})
    test_v = {v for i, v in enumerate(vs) if i % every == 0}
    val_v = {v for i, v in enumerate(vs) if i % every == 2}
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i, name in enumerate(voice_names):
        v = name.split("+", 1)[1]
        parts[2 if v in test_v else 1 if v in val_v else 0].append(i)
    return parts
