"""Edges an outside audit planted bugs in and the suite did not catch (issue #20): body limits at and
past the limit (declared and chunked), v2 parameter errors, regression uncertainty units, 24-bit
WAV, numeric version order with 11 versions, an RGB model with per-channel normalisation and a
real JPEG. Every expectation comes from an independent reference, not from the code under test."""

import base64
import io
import json
import socket

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serving import DIAMOND_ROW, ROOT, Server, make_bundle

from ocd_core.audio import read_wav
from ocd_core.bundle import InputSpec, Normalization, load_bundle, read_manifest
from ocd_core.io import atomic_write_text

DIGIT = [[[((r * 28 + c) % 256) / 255 for c in range(28)] for r in range(28)]]
LIMIT = 200_000


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """mnist in 11 versions (random weights; 10 and 11 sort before 9 as strings) and an RGB model."""
    root = tmp_path_factory.mktemp("repo") / "models"
    for v in range(1, 12):
        make_bundle(root, version=str(v), seed=v)
    rgb = make_bundle(root, name="rgb", version="1", seed=5, in_channels=3)
    m = read_manifest(rgb)
    norm = Normalization(mean=[0.2, 0.5, 0.7], std=[0.1, 0.2, 0.4])
    spec = InputSpec(shape=[3, 28, 28], normalization=norm)
    atomic_write_text(m.model_copy(update={"input": spec}).model_dump_json(indent=2), rgb / "manifest.json")
    return root


@pytest.fixture(scope="module")
def server(repo):
    s = Server(repo, max_body_bytes=LIMIT, max_wait_ms=0)
    yield s
    s.stop()


def exchange(server, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send raw bytes on a new connection -> the status and JSON of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as c:
        c.sendall(head + body)
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += c.recv(65536)
        top, rest = reply.split(b"\r\n\r\n", 1)
        length = int(
            next(v for k, v in (h.split(b":", 1) for h in top.split(b"\r\n")[1:]) if k.lower() == b"content-length")
        )
        while len(rest) < length:
            rest += c.recv(65536)
    return int(top.split()[1]), json.loads(rest)


def padded(size: int) -> bytes:
    """A valid /predict body of exactly ``size`` bytes (JSON padded with spaces)."""
    body = json.dumps({"model": "mnist", "input": DIGIT, "seed": 1}).encode()
    return body + b" " * (size - len(body))


def chunked(body: bytes, piece: int = 65536) -> bytes:
    out = b""
    for i in range(0, len(body), piece):
        part = body[i : i + piece]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


@pytest.mark.parametrize("size,status", [(LIMIT, 200), (LIMIT + 1, 413)])
def test_body_limit_at_and_past_it_declared_and_chunked(server, size, status):
    body = padded(size)
    r = httpx.post(f"{server.url}/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if status == 413:
        assert r.json() == {"error": f"body: {size} bytes is over the limit of {LIMIT} bytes"}
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    got, answer = exchange(server, head, chunked(body))  # no Content-Length: the limit applies as it streams
    assert got == status, answer
    if status == 413:
        assert answer == {"error": f"body: over the limit of {LIMIT} bytes"}


def test_a_declared_length_over_the_limit_is_refused_before_the_body(server):
    """Only the headers are sent: the answer cannot come from counting streamed bytes."""
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {LIMIT + 1}\r\n\r\n"
    assert exchange(server, head.encode()) == (
        413,
        {"error": f"body: {LIMIT + 1} bytes is over the limit of {LIMIT} bytes"},
    )


def test_latest_version_is_the_highest_number_of_eleven(server):
    meta = httpx.get(f"{server.url}/v2/models/mnist").json()
    assert meta["versions"] == [str(v) for v in range(1, 12)]
    r = httpx.post(f"{server.url}/predict", json={"model": "mnist", "input": DIGIT, "seed": 1})
    assert r.json()["version"] == "11"
    assert httpx.get(f"{server.url}/v2/models/mnist/ready").json()["version"] == "11"
    index = httpx.post(f"{server.url}/v2/repository/index").json()
    assert [e["version"] for e in index if e["name"] == "mnist"] == [str(v) for v in range(1, 12)]


@pytest.mark.parametrize(
    "parameters,error",
    [
        ({"ensemble": 33}, "parameters.ensemble: must be between 1 and 32, got 33"),
        ({"ddim_steps": 101}, "parameters.ddim_steps: must be between 1 and 100, got 101"),
        ({"mode": "fast"}, "parameters.mode: unknown mode 'fast'; mnist has ['base', 'ocd']"),
        (
            {"mode": "base", "ensemble": 2},
            "parameters.mode: 'base' is the base model alone: it takes no ddim_steps or ensemble",
        ),
    ],
)
def test_v2_parameter_errors_name_the_parameters_prefix(server, parameters, error):
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.1] * 784}]}
    r = httpx.post(f"{server.url}/v2/models/mnist/infer", json={**body, "parameters": parameters})
    assert (r.status_code, r.json()) == (422, {"error": error})


def test_v2_batch_edges(server):
    url = f"{server.url}/v2/models/mnist/infer"
    empty = {"inputs": [{"name": "input", "shape": [0, 1, 28, 28], "datatype": "FP32", "data": []}]}
    r = httpx.post(url, json=empty)
    assert (r.status_code, r.json()) == (
        422,
        {"error": "inputs[input].shape: holds no samples (N is 0 in [0, 1, 28, 28])"},
    )
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "parameters": {"binary_data_size": 3135}}
            ]
        }
    ).encode()
    r = httpx.post(url, content=header + b"\0" * 3135, headers={"Inference-Header-Content-Length": str(len(header))})
    assert (r.status_code, r.json()) == (
        422,
        {"error": "inputs[input].parameters.binary_data_size: 3135 is not a whole number of FP32"},
    )


def test_rgb_model_decodes_channels_first_with_per_channel_normalisation(server, repo):
    """An RGB PNG, and its JPEG, give the prediction of the image decoded by PIL, put channels first
    and normalised per channel here (each channel's pixels differ, so a wrong reshape shows)."""
    h, w = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    rgb = np.stack([(h * 9) % 256, (w * 9) % 256, ((h + w) * 5) % 256], -1).astype(np.uint8)
    model, _ = load_bundle(repo / "rgb" / "1")
    mean, std = torch.tensor([0.2, 0.5, 0.7]).view(3, 1, 1), torch.tensor([0.1, 0.2, 0.4]).view(3, 1, 1)
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buf, format=fmt, quality=95)
        decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))  # (H, W, 3)
        x = (torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 255 - mean) / std
        want = model.predict(x[None], steps=3, ensemble=2, seeds=[4])
        body = {
            "model": "rgb",
            "input": base64.b64encode(buf.getvalue()).decode(),
            "seed": 4,
            "ddim_steps": 3,
            "ensemble": 2,
        }
        r = httpx.post(f"{server.url}/predict", json=body)
        assert r.status_code == 200, r.text
        got = [r.json()["probabilities"][str(k)] for k in range(10)]
        assert got == pytest.approx(want.mean[0].tolist(), abs=1e-5), fmt


def test_24_bit_wav_samples_are_read_in_little_endian_order():
    values = [0, 1, -1, 2**23 - 1, -(2**23), 0x123456, -0x123456]
    frames = b"".join(v.to_bytes(3, "little", signed=True) for v in values)
    header = (
        b"RIFF" + (36 + len(frames)).to_bytes(4, "little") + b"WAVEfmt "
        + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
        + (8000).to_bytes(4, "little") + (24000).to_bytes(4, "little") + (3).to_bytes(2, "little")
        + (24).to_bytes(2, "little") + b"data" + len(frames).to_bytes(4, "little")
    )  # fmt: skip
    x, rate = read_wav(header + frames)
    assert rate == 8000
    assert x.tolist() == pytest.approx([v / 2**23 for v in values], abs=0)


def test_regression_uncertainty_is_in_the_targets_units(tmp_path):
    """diamonds/2 predicts a standardised price: /predict and v2 answer the ensemble's std times the
    target's std (from the manifest), and the value in price units."""
    m = read_manifest(ROOT / "models" / "diamonds" / "2")
    spec = m.input.options["tabular"]
    target_mean, target_std = spec["target_mean"], spec["target_std"]
    assert target_std not in (0, 1)
    model, _ = load_bundle(ROOT / "models" / "diamonds" / "2")
    row = DIAMOND_ROW
    s = Server(ROOT / "models", models="diamonds:2")
    try:
        from service.modalities import modality_for

        x = modality_for(m).decode_json(row, "input")
        want = model.predict(x[None], steps=5, ensemble=4, seeds=[2])
        r = httpx.post(
            f"{s.url}/predict", json={"model": "diamonds", "input": row, "seed": 2, "ddim_steps": 5, "ensemble": 4}
        )
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["uncertainty"] == pytest.approx(want.uncertainty[0].item() * target_std, rel=1e-5)
        assert a["value"] == pytest.approx(want.mean[0].item() * target_std + target_mean, rel=1e-5)
        columns = [
            {"name": k, "datatype": "BYTES" if isinstance(v, str) else "FP32", "shape": [1], "data": [v]}
            for k, v in row.items()
        ]
        v2 = {"inputs": columns, "parameters": {"seed": 2, "ddim_steps": 5, "ensemble": 4}}
        reply = httpx.post(f"{s.url}/v2/models/diamonds/infer", json=v2)
        assert reply.status_code == 200, reply.text
        out = {o["name"]: o["data"] for o in reply.json()["outputs"]}
        assert out["uncertainty"][0] == pytest.approx(a["uncertainty"], rel=1e-5)
        assert out["value"][0] == pytest.approx(a["value"], rel=1e-5)
    finally:
        s.stop()
