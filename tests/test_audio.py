"""Audio: WAV decoding (rates, channels, widths), errors, and predictions through the real server."""

import base64
import io
import math
import wave

import httpx
import pytest
import torch
from serving import Server

from ocd_core.audio import AudioError, AudioSpec, clip_to_features, read_wav, resample, write_wav
from training.data.spoken_digits import synthesize
from training.pipeline import run_recipe
from training.recipes import RECIPES


def wav_bytes(x: torch.Tensor, rate: int, channels: int = 1, width: int = 2) -> bytes:
    """x: (T,) in [-1, 1] -> WAV with ``channels`` copies, ``width`` bytes per sample."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels), w.setsampwidth(width), w.setframerate(rate)
        scale = {1: 127, 2: 32767, 4: 2**31 - 1}[width]
        v = (x.clamp(-1, 1) * scale).round().to(torch.int64)
        if width == 1:
            v = (v + 128).to(torch.uint8)
        else:
            v = v.to({2: torch.int16, 4: torch.int32}[width])
        w.writeframes(v.repeat_interleave(channels).numpy().tobytes())
    return buf.getvalue()


def tone(rate: int, seconds: float = 0.5, hz: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(rate * seconds)) / rate
    return 0.5 * torch.sin(2 * math.pi * hz * t)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_common_rates_resample_to_the_same_features(rate):
    spec = AudioSpec()
    ref = clip_to_features(tone(16000), 16000, spec)
    x, r = read_wav(wav_bytes(tone(rate), rate))
    feats = clip_to_features(x, r, spec)
    assert r == rate and feats.shape == (1, 40, 101)
    assert (feats - ref).abs().mean().item() < 0.05  # same tone, same log-mel


@pytest.mark.parametrize("channels,width", [(2, 2), (1, 1), (1, 4), (2, 4)])
def test_channels_are_mixed_down_and_widths_read(channels, width):
    x, rate = read_wav(wav_bytes(tone(16000), 16000, channels, width))
    assert rate == 16000 and x.shape == (8000,)
    tolerance = 1.5 / 127 if width == 1 else 1e-4
    assert (x - tone(16000)).abs().max().item() < tolerance


def test_resample_keeps_a_band_limited_tone():
    y = resample(tone(48000, 1.0, 1000.0), 48000, 16000)
    assert y.shape == (16000,)
    assert (y - tone(16000, 1.0, 1000.0)).abs().max().item() < 1e-3


def fmt_past_the_end(clip: bytes) -> bytes:
    """The WAV with its ``fmt `` chunk claiming 1 MB (Python's wave raised a bare RuntimeError: a 500)."""
    i = clip.index(b"fmt ")
    return clip[: i + 4] + (10**6).to_bytes(4, "little") + clip[i + 8 :]


def test_corrupt_and_long_clips():
    with pytest.raises(AudioError) as e:
        read_wav(b"RIFF....WAVEjunk")
    assert e.value.status == 400 and e.value.reason.startswith("not a readable WAV file")
    with pytest.raises(AudioError) as e:
        read_wav(fmt_past_the_end(wav_bytes(tone(16000), 16000)))
    assert (e.value.status, e.value.reason) == (400, "not a readable WAV file (a chunk runs past the end of the file)")
    with pytest.raises(AudioError) as e:
        clip_to_features(torch.zeros(16000 * 11), 16000, AudioSpec())
    assert e.value.status == 422 and e.value.reason == "clip is 11.00 s long; the limit is 10 s"
    x, rate = read_wav(write_wav(torch.zeros(100), 16000))
    assert rate == 16000 and x.shape == (100,)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    run_recipe(
        RECIPES["spoken_digits"]("smoke"),
        root / "runs",
        root / "models",
        root / "reports",
        progress=False,
        device="cpu",
    )
    s = Server(root / "models")
    yield s
    s.stop()


def test_audio_predict_upload_json_and_v2(server):
    clip = synthesize("seven", "en-us+m3", 150, 50)  # 22.05 kHz, resampled by the server
    a = httpx.post(
        f"{server.url}/predict",
        files={"file": ("seven.wav", clip, "audio/wav")},
        data={"model": "spoken_digits", "seed": "4"},
        timeout=60,
    )
    assert a.status_code == 200, a.text
    assert a.json()["label"] in [str(i) for i in range(10)] and len(a.json()["probabilities"]) == 10
    b = httpx.post(
        f"{server.url}/predict",
        json={"model": "spoken_digits", "input": base64.b64encode(clip).decode(), "seed": 4},
        timeout=60,
    )
    assert b.json()["probabilities"] == pytest.approx(a.json()["probabilities"], abs=1e-6)
    v2 = httpx.post(
        f"{server.url}/v2/models/spoken_digits/infer",
        json={
            "inputs": [{"name": "audio", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(clip).decode()]}],
            "parameters": {"seed": 4},
        },
        timeout=60,
    ).json()
    assert v2["outputs"][0]["data"] == pytest.approx([a.json()["probabilities"][str(i)] for i in range(10)], abs=1e-6)
    meta = httpx.get(f"{server.url}/v2/models/spoken_digits").json()
    assert meta["inputs"] == [{"name": "audio", "datatype": "BYTES", "shape": [-1]}]


def test_audio_errors(server):
    corrupt = httpx.post(
        f"{server.url}/predict",
        files={"file": ("x.wav", b"RIFFxxxxWAVEfmt garbage", "audio/wav")},
        data={"model": "spoken_digits"},
    )
    assert corrupt.status_code == 400 and corrupt.json()["error"].startswith("file: not a readable WAV file")
    bad = fmt_past_the_end(wav_bytes(tone(16000), 16000))
    why = "not a readable WAV file (a chunk runs past the end of the file)"
    r = httpx.post(
        f"{server.url}/predict", files={"file": ("x.wav", bad, "audio/wav")}, data={"model": "spoken_digits"}
    )
    assert (r.status_code, r.json()) == (400, {"error": f"file: {why}"})
    b64 = base64.b64encode(bad).decode()
    r = httpx.post(f"{server.url}/predict", json={"model": "spoken_digits", "input": b64})
    assert (r.status_code, r.json()) == (400, {"error": f"input: {why}"})
    r = httpx.post(
        f"{server.url}/v2/models/spoken_digits/infer",
        json={"inputs": [{"name": "audio", "shape": [1], "datatype": "BYTES", "data": [b64]}]},
    )
    assert (r.status_code, r.json()) == (400, {"error": f"inputs[audio][0]: {why}"})
    long = base64.b64encode(wav_bytes(torch.zeros(8000 * 12), 8000)).decode()
    r = httpx.post(f"{server.url}/predict", json={"model": "spoken_digits", "input": long})
    assert r.status_code == 422 and r.json() == {"error": "input: clip is 12.00 s long; the limit is 10 s"}
    r = httpx.post(f"{server.url}/predict", json={"model": "spoken_digits", "input": [0.1, 0.2]})
    assert r.status_code == 422 and r.json() == {"error": "input: expected a base64-encoded WAV file, got list"}
    r = httpx.post(
        f"{server.url}/v2/models/spoken_digits/infer",
        json={"inputs": [{"name": "audio", "shape": [1], "datatype": "FP32", "data": [0.5]}]},
    )
    assert r.status_code == 422 and r.json() == {"error": "inputs[audio].datatype: expected BYTES, got FP32"}
