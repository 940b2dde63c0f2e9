"""Serving modes through a real server: the default from the manifest (chosen on val), a mode named
by the request, the mode that answered in every response, and the base mode's answer."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serving import Server, make_bundle

from ocd_core.bundle import ServingDefaults, ServingMode, load_bundle, read_manifest
from ocd_core.io import atomic_write_text

DIGIT = [[[((r * 28 + c) % 256) / 255 for c in range(28)] for r in range(28)]]
MEAN, STD = 0.13, 0.31  # make_bundle's normalisation


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle whose val evidence chose the base model; it also offers an ensemble mode."""
    path = make_bundle(tmp_path_factory.mktemp("repo") / "models")
    m = read_manifest(path)
    serving = ServingDefaults(
        ddim_steps=10,
        mode="base",
        modes={"ocd_ensemble": ServingMode(ddim_steps=10, ensemble=3, val={"acc": {"mean": -0.01}})},
        chosen="no adapted mode beat the base model on the val split (3 seeds)",
    )
    atomic_write_text(m.model_copy(update={"serving": serving}).model_dump_json(indent=2), path / "manifest.json")
    return path


@pytest.fixture(scope="module")
def server(bundle):
    s = Server(bundle.parent.parent, max_batch_size=16, max_wait_ms=20)
    yield s
    s.stop()


def post(server, **body):
    return httpx.post(f"{server.url}/predict", json={"model": "mnist", "input": DIGIT, **body}, timeout=60)


def probs(answer: dict) -> list[float]:
    return [answer["probabilities"][str(k)] for k in range(10)]


def test_default_mode_is_the_manifests_and_answers_with_the_base_model(server, bundle):
    model, _ = load_bundle(bundle)
    x = (torch.tensor(DIGIT) - MEAN) / STD
    with torch.no_grad():
        want = model.base(x[None]).softmax(-1)[0].tolist()  # the base network alone
    r = post(server, seed=3)
    assert r.status_code == 200, r.text
    a = r.json()
    assert (a["mode"], a["ddim_steps"], a["ensemble"], a["seed"]) == ("base", 0, 1, 3)
    assert probs(a) == pytest.approx(want, abs=1e-6)
    assert set(a["timings"]["stages_ms"]) == {"base"}
    assert post(server, mode="base").json()["probabilities"] == a["probabilities"]  # no noise: any seed
    meta = httpx.get(f"{server.url}/v2/models/mnist").json()["parameters"]
    assert (meta["max_ensemble"], meta["max_ddim_steps"]) == (32, 100)  # the server's (the model sets none)
    assert meta["default_mode"] == "base"
    assert meta["default_mode_chosen"] == "no adapted mode beat the base model on the val split (3 seeds)"
    assert {k: (v["ddim_steps"], v["ensemble"]) for k, v in meta["modes"].items()} == {
        "base": (0, 1),
        "ocd": (10, 1),
        "ocd_ensemble": (10, 3),
    }
    assert meta["modes"]["ocd_ensemble"]["val"] == {"acc": {"mean": -0.01}}


def test_a_request_names_a_mode_or_its_parameters(server, bundle):
    model, _ = load_bundle(bundle)
    x = ((torch.tensor(DIGIT) - MEAN) / STD)[None]
    ens = post(server, mode="ocd_ensemble", seed=5).json()
    assert (ens["mode"], ens["ddim_steps"], ens["ensemble"]) == ("ocd_ensemble", 10, 3)
    assert probs(ens) == pytest.approx(model.predict(x, 10, 3, seeds=[5]).mean[0].tolist(), abs=1e-5)
    base = post(server).json()
    assert max(abs(p - q) for p, q in zip(probs(ens), probs(base))) > 1e-4  # adapted: not the base answer
    same = post(server, ensemble=3, seed=5).json()  # the mode's parameters: named after it
    assert same["mode"] == "ocd_ensemble" and same["probabilities"] == ens["probabilities"]
    one = post(server, mode="ocd", seed=5).json()
    assert (one["mode"], one["ddim_steps"], one["ensemble"]) == ("ocd", 10, 1)
    custom = post(server, ensemble=2, seed=5).json()  # parameters alone: an adapted prediction
    assert (custom["mode"], custom["ddim_steps"], custom["ensemble"]) == ("custom", 10, 2)
    over = post(server, mode="ocd_ensemble", ddim_steps=4, seed=5).json()  # a mode's parameter overridden
    assert (over["mode"], over["ddim_steps"], over["ensemble"]) == ("custom", 4, 3)
    form = httpx.post(
        f"{server.url}/predict",
        files={"file": ("d.npy", b"", "application/octet-stream")},
        data={"model": "mnist", "mode": "nope"},
        timeout=60,
    )
    assert form.status_code == 422 and form.json()["error"].startswith("mode: unknown mode 'nope'")


def test_check_resolves_modes_against_the_server_limits():
    """Flow.check alone: an adapted default fills what a request leaves out; a mode whose own steps
    or members are over this server's limits is named, not a field the client never sent."""
    from types import SimpleNamespace

    from service.errors import InputError
    from service.flow import Flow
    from service.registry import Served
    from service.schemas import Params
    from service.settings import Settings

    modes = {"ddim_20": ServingMode(ddim_steps=20), "ocd_ensemble": ServingMode(ddim_steps=10, ensemble=5)}
    serving = ServingDefaults(ddim_steps=10, mode="ddim_20", modes=modes)
    manifest = SimpleNamespace(serving=serving, schedule=SimpleNamespace(num_train_timesteps=1000))
    served = Served("m", "1", manifest, None, None)

    def call(flow, **params):
        c = flow.check(served, Params(seed=1, **params))
        return c.mode, c.steps, c.ensemble

    wide = Flow(None, Settings(max_ddim_steps=100, max_ensemble=32))
    assert call(wide) == ("ddim_20", 20, 1)
    assert call(wide, ensemble=5) == ("custom", 20, 5)  # the default's steps
    assert call(wide, ddim_steps=10, ensemble=5) == ("ocd_ensemble", 10, 5)
    assert call(wide, mode="base") == ("base", 0, 1)
    tight = Flow(None, Settings(max_ddim_steps=10, max_ensemble=4))
    assert call(tight, mode="ocd_ensemble", ensemble=4) == ("custom", 10, 4)  # overridden within the limits
    for params, field, reason in (
        ({}, "mode", "'ddim_20' runs ddim_steps 20, over this server's limit of 10; name another mode"),
        (
            {"mode": "ocd_ensemble"},
            "mode",
            "'ocd_ensemble' runs ensemble 5, over this server's limit of 4; name another mode",
        ),
        ({"ddim_steps": 12}, "ddim_steps", "must be between 1 and 10, got 12"),
        ({"mode": "ocd_ensemble", "ensemble": 6}, "ensemble", "must be between 1 and 4, got 6"),
    ):
        with pytest.raises(InputError) as e:
            tight.check(served, Params(**params))
        assert (e.value.field, e.value.reason) == (field, reason)

    # the model's own limits (its manifest's serving), under the server's wide ones
    manifest.serving = serving.model_copy(update={"max_ensemble": 3, "max_ddim_steps": 25})
    assert wide.limits(served) == (25, 3)
    assert call(wide, ensemble=3) == ("custom", 20, 3)
    for params, field, reason in (
        ({"ensemble": 4}, "ensemble", "must be between 1 and 3, got 4"),
        ({"ddim_steps": 30}, "ddim_steps", "must be between 1 and 25, got 30"),
        (
            {"mode": "ocd_ensemble"},
            "mode",
            "'ocd_ensemble' runs ensemble 5, over this server's limit of 3; name another mode",
        ),
    ):
        with pytest.raises(InputError) as e:
            wide.check(served, Params(**params))
        assert (e.value.field, e.value.reason) == (field, reason)
    assert tight.limits(served) == (10, 3)  # the lower of the two


@pytest.mark.parametrize(
    "body,error",
    [
        ({"mode": "best"}, "mode: unknown mode 'best'; mnist has ['base', 'ocd', 'ocd_ensemble']"),
        ({"mode": "base", "ensemble": 2}, "mode: 'base' is the base model alone: it takes no ddim_steps or ensemble"),
        ({"mode": "base", "ddim_steps": 5}, "mode: 'base' is the base model alone: it takes no ddim_steps or ensemble"),
        ({"mode": 3}, "mode: Input should be a valid string"),
        ({"mode": "ocd_ensemble", "ensemble": 0}, "ensemble: must be between 1 and 32, got 0"),
    ],
)
def test_bad_modes_are_named(server, body, error):
    r = post(server, **body)
    assert r.status_code == 422 and r.json() == {"error": error}


def test_v2_and_render_style_answers_say_the_mode(server):
    flat = [v for row in DIGIT[0] for v in row]
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": flat}]}
    r = httpx.post(f"{server.url}/v2/models/mnist/infer", json=body, timeout=60).json()
    assert r["parameters"]["mode"] == "base" and r["parameters"]["ddim_steps"] == 0
    assert r["outputs"][0]["data"] == pytest.approx(probs(post(server).json()), abs=1e-6)
    body["parameters"] = {"mode": "ocd_ensemble", "seed": 5}
    r = httpx.post(f"{server.url}/v2/models/mnist/infer", json=body, timeout=60).json()
    assert {k: r["parameters"][k] for k in ("mode", "ddim_steps", "ensemble", "seed")} == {
        "mode": "ocd_ensemble",
        "ddim_steps": 10,
        "ensemble": 3,
        "seed": 5,
    }
    assert r["outputs"][0]["data"] == pytest.approx(probs(post(server, mode="ocd_ensemble", seed=5).json()), abs=1e-6)
    bad = httpx.post(f"{server.url}/v2/models/mnist/infer", json={**body, "parameters": {"mode": "x"}}, timeout=60)
    assert bad.status_code == 422 and bad.json()["error"].startswith("parameters.mode: unknown mode 'x'")


def test_modes_batch_together_and_each_answer_is_its_own(server):
    """Concurrent requests of every mode: each gets the answer it gets alone (ocd and ocd_ensemble
    run the same steps, so they share batches as ragged members; the base mode runs apart)."""
    bodies = [dict(mode=m, seed=s) for s in range(4) for m in ("base", "ocd", "ocd_ensemble")]
    alone = [post(server, **b).json() for b in bodies]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda b: post(server, **b).json(), bodies * 2))
    for a, t in zip(alone * 2, together):
        assert t["mode"] == a["mode"] and probs(t) == pytest.approx(probs(a), abs=1e-6)
