"""Audio front end in plain torch: WAV parsing, resampling, log-mel features (no audio framework).

The service and the training pipeline share it, so a clip is featurised identically in both.
"""

from __future__ import annotations

import io
import struct
import wave

import torch
from pydantic import BaseModel


class AudioSpec(BaseModel):
    """Stored in a bundle's manifest (input.options["audio"])."""

    sample_rate: int = 16000
    clip_seconds: float = 1.0  # the model's window; longer clips use their loudest window
    max_seconds: float = 10.0  # longer requests are refused
    n_fft: int = 400  # 25 ms at 16 kHz
    hop: int = 160  # 10 ms
    n_mels: int = 40

    @property
    def samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def frames(self) -> int:
        return self.samples // self.hop + 1


class AudioError(ValueError):
    def __init__(self, reason: str, status: int):
        super().__init__(reason)
        self.reason, self.status = reason, status


def read_wav(data: bytes) -> tuple[torch.Tensor, int]:
    """WAV bytes (WAVE_FORMAT_PCM, 8/16/24/32-bit, any channels) -> mono waveform (T,) in [-1, 1], rate.

    Python's ``wave`` refuses WAVE_FORMAT_EXTENSIBLE and float WAVs: those are 400s, saying so."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, ValueError, RuntimeError, struct.error) as e:  # RuntimeError: a chunk past the end
        why = str(e) or "a chunk runs past the end of the file"
        raise AudioError(f"not a readable WAV file ({why})", 400) from None
    if rate <= 0 or channels <= 0 or len(raw) < width * channels:
        raise AudioError("not a readable WAV file (no samples)", 400)
    raw = raw[: len(raw) - len(raw) % (width * channels)]
    if width == 1:
        x = torch.frombuffer(bytearray(raw), dtype=torch.uint8).float().sub(128).div(128)
    elif width == 2:
        x = torch.frombuffer(bytearray(raw), dtype=torch.int16).float().div(32768)
    elif width == 3:
        b = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 3).long()
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = torch.where(v >= 2**23, v - 2**24, v).float().div(2**23)
    elif width == 4:
        x = torch.frombuffer(bytearray(raw), dtype=torch.int32).float().div(2**31)
    else:
        raise AudioError(f"unsupported WAV sample width of {width} bytes", 400)
    return x.view(-1, channels).mean(1), rate


def write_wav(x: torch.Tensor, rate: int) -> bytes:
    """Mono waveform (T,) in [-1, 1] -> 16-bit PCM WAV bytes."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((x.clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes())
    return buf.getvalue()


def resample(x: torch.Tensor, rate_in: int, rate_out: int) -> torch.Tensor:
    """Band-limited resampling by the FFT (exact for band-limited periodic signals): (T,) -> (T')."""
    if rate_in == rate_out:
        return x
    n_out = max(1, int(round(x.shape[-1] * rate_out / rate_in)))
    spec = torch.fft.rfft(x)
    keep = min(spec.shape[-1], n_out // 2 + 1)
    out = torch.zeros(n_out // 2 + 1, dtype=spec.dtype)
    out[:keep] = spec[:keep]
    return torch.fft.irfft(out, n=n_out) * (n_out / x.shape[-1])


def mel_filterbank(spec: AudioSpec) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters on the HTK mel scale."""

    def mel(f: torch.Tensor) -> torch.Tensor:
        return 2595 * torch.log10(1 + f / 700)

    n_bins = spec.n_fft // 2 + 1
    freqs = torch.linspace(0, spec.sample_rate / 2, n_bins)
    pts = torch.linspace(0, float(mel(torch.tensor(spec.sample_rate / 2.0))), spec.n_mels + 2)
    hz = 700 * (10 ** (pts / 2595) - 1)
    lo, ce, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up, down = (freqs - lo) / (ce - lo), (hi - freqs) / (hi - ce)
    return torch.clamp(torch.minimum(up, down), min=0)


def window(x: torch.Tensor, spec: AudioSpec) -> torch.Tensor:
    """(T,) -> (samples,): zero-pad a short clip (centred), or take the loudest window of a long one."""
    n = spec.samples
    if x.shape[-1] <= n:
        left = (n - x.shape[-1]) // 2
        return torch.nn.functional.pad(x, (left, n - x.shape[-1] - left))
    energy = torch.nn.functional.avg_pool1d((x**2)[None, None], n, stride=spec.hop).flatten()
    start = int(energy.argmax()) * spec.hop
    return x[start : start + n]


def log_mel(x: torch.Tensor, spec: AudioSpec, fb: torch.Tensor | None = None) -> torch.Tensor:
    """Waveform (..., samples) at spec.sample_rate -> log-mel (..., n_mels, frames)."""
    fb = mel_filterbank(spec) if fb is None else fb
    stft = torch.stft(x, spec.n_fft, spec.hop, window=torch.hann_window(spec.n_fft), center=True, return_complex=True)
    return torch.log(fb @ stft.abs().pow(2) + 1e-6)


def clip_to_features(x: torch.Tensor, rate: int, spec: AudioSpec, fb: torch.Tensor | None = None) -> torch.Tensor:
    """A mono clip at any rate -> (1, n_mels, frames) log-mel of its model window."""
    if x.shape[-1] / rate > spec.max_seconds:
        raise AudioError(f"clip is {x.shape[-1] / rate:.2f} s long; the limit is {spec.max_seconds:g} s", 422)
    return log_mel(window(resample(x, rate, spec.sample_rate), spec), spec, fb).unsqueeze(0)
