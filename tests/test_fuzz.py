"""Fuzzing a live server (the committed bundles: image, tabular and audio models): schemathesis from
the server's own OpenAPI document, and hypothesis on the bodies each modality decodes (PNG, WAV,
tabular rows, v2 tensors), mutated from valid ones. No input may get a 5xx; every 4xx names a field."""

import base64
import io
import json
import struct
import wave
import zlib

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import ROOT, Server

MODELS = ("mnist", "diamonds", "spoken_digits")


@pytest.fixture(scope="module")
def live():
    s = Server(ROOT / "models", models="mnist:3,diamonds:2,spoken_digits:3", max_body_bytes=1 << 20, timeout_s=20)
    yield s
    s.stop()


def _pin_models(case) -> None:
    """Most generated model names would only meet the 404: name a served model, mostly (chosen from
    the case itself, so that hypothesis replays it)."""
    pick = [*MODELS, None][zlib.crc32(repr(case.body).encode() + repr(case.path_parameters).encode()) % 4]
    if pick is None:
        return
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = pick
    if case.path_parameters and "name" in case.path_parameters:
        case.path_parameters["name"] = pick
        if "version" in case.path_parameters:
            case.path_parameters["version"] = ["1", "2", "3", "x"][len(repr(case.body)) % 4]


def test_schema_fuzz_gets_no_server_error(live):
    """Every operation of /openapi.json, up to 150 generated cases each (schemathesis' strategies, run by
    hypothesis here: its pytest plugin does not run on pytest 9.2)."""
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 15  # every route but the docs
    calls = []

    for operation in operations:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy())
        def run(case):
            _pin_models(case)
            response = case.call(timeout=30)
            calls.append(response.status_code)
            where = f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:500]}"
            assert response.status_code < 500, where
            if 400 <= response.status_code < 500 and "json" in response.headers.get("content-type", ""):
                error = response.json().get("error", "") if isinstance(response.json(), dict) else ""
                assert ": " in error, f"an error that names no field: {where}"

        run()
    assert len(calls) >= 1000


def _wav(rate: int = 8000, seconds: float = 0.5, width: int = 2) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    pcm = (np.sin(2 * np.pi * 440 * t) * 0.5 * (2 ** (8 * width - 1) - 1)).astype(f"<i{width}")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


PNG = (ROOT / "examples" / "digits" / "7" / "00.png").read_bytes()
WAV = _wav()


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """``valid`` with a few edits where decoders look: bytes flipped (mostly in the headers and
    chunk sizes), cut short, spliced or extended, or 32-bit fields overwritten with extreme values."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "splice", "extend", "size"]))
        at = draw(st.integers(0, max(0, min(len(data) - 1, 64 if draw(st.booleans()) else len(data) - 1))))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "splice":
            data[at:at] = draw(st.binary(max_size=32))
        elif kind == "extend":
            data += draw(st.binary(max_size=64))
        elif kind == "size" and at + 4 <= len(data):
            data[at : at + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, len(data) * 4])))
    return bytes(data)


def _check(r: httpx.Response, what) -> None:
    assert r.status_code < 500, f"{what!r:.300} -> {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        error = r.json()["error"]
        assert ": " in error and error.split(": ")[0], f"an error that names no field: {error!r}"


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def test_mutated_images_and_audio_get_no_server_error(live):
    statuses = set()
    with httpx.Client(base_url=live.url, timeout=30) as c:

        @FUZZ
        @given(data=st.one_of(mutated(PNG), mutated(WAV)), upload=st.booleans())
        def run(data, upload):
            model = "mnist" if data[:4] != b"RIFF" and data[1:4] == PNG[1:4] or len(data) % 2 else "spoken_digits"
            if upload:
                r = c.post("/predict", data={"model": model, "seed": "1"}, files={"file": ("x", data)})
            else:
                r = c.post("/predict", json={"model": model, "input": base64.b64encode(data).decode(), "seed": 1})
            _check(r, data[:64])
            statuses.add(r.status_code)

        run()
    assert {200, 400} <= statuses  # the decoders were reached: some mutations still decode, most do not


def test_tabular_rows_and_v2_tensors_get_no_server_error(live):
    names = [f["name"] for f in json.loads((ROOT / "models/diamonds/2/manifest.json").read_text())["input"]["options"]
             ["tabular"]["fields"]]  # fmt: skip
    with httpx.Client(base_url=live.url, timeout=30) as c:

        @FUZZ
        @given(
            row=st.dictionaries(st.sampled_from(names) | st.text(max_size=6), JSON_VALUE, max_size=len(names) + 2),
            tensor=st.fixed_dictionaries(
                {"name": st.sampled_from(["input", "x"]), "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "?"])},
                optional={"shape": JSON_VALUE, "data": JSON_VALUE, "parameters": JSON_VALUE},
            ),
            model=st.sampled_from(MODELS),
        )
        def run(row, tensor, model):
            for path, body in (
                ("/predict", {"model": "diamonds", "input": row, "seed": 1}),
                (f"/v2/models/{model}/infer", {"inputs": [tensor]}),
            ):  # (NaN and Infinity as Python's json writes them: clients do send them)
                r = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
                _check(r, body)

        run()
