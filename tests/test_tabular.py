"""Tabular models: preprocessing from the manifest, decoding errors, predictions through the real server."""

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving import Server

from ocd_core.bundle import load_bundle
from ocd_core.preprocess import FieldSpec, RowError, TabularSpec, encode_row
from training.pipeline import run_recipe
from training.recipes import RECIPES

DIAMOND = {
    "carat": 0.3,
    "cut": "Ideal",
    "color": "E",
    "clarity": "SI1",
    "depth": 61.5,
    "table": 55.0,
    "x": 4.3,
    "y": 4.35,
    "z": 2.66,
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tab")
    for name in ("diamonds", "credit"):
        run_recipe(
            RECIPES[name]("smoke"), root / "runs", root / "models", root / "reports", progress=False, device="cpu"
        )
    return root


@pytest.fixture(scope="module")
def server(repo):
    s = Server(repo / "models")
    yield s
    s.stop()


def test_encode_row_standardises_one_hots_and_fills():
    spec = TabularSpec(
        target="y",
        fields=[
            FieldSpec(name="a", kind="number", mean=2.0, std=4.0, fill=1.0),
            FieldSpec(name="b", kind="category", categories=["p", "q"], missing_category=True),
            FieldSpec(name="c", kind="number", mean=0.0, std=1.0),
        ],
    )
    assert encode_row(spec, {"a": 6, "b": "q", "c": -1.5}).tolist() == [1.0, 0.0, 1.0, 0.0, -1.5]
    assert encode_row(spec, {"a": None, "b": None, "c": 0}).tolist() == [-0.25, 0.0, 0.0, 1.0, 0.0]
    for row, msg in [
        ({"a": 1, "b": "p"}, "input.c: missing field"),
        ({"a": 1, "b": "p", "c": 0, "d": 1}, "input.d: unknown field; expected ['a', 'b', 'c']"),
        ({"a": 1, "b": "r", "c": 0}, "input.b: unknown category 'r'; known: ['p', 'q']"),
        ({"a": "1", "b": "p", "c": 0}, "input.a: expected a number, got str"),
        ({"a": True, "b": "p", "c": 0}, "input.a: expected a number, got bool"),
        ({"a": 1, "b": 3, "c": 0}, "input.b: expected a string category, got int"),
        ({"a": 1, "b": "p", "c": math.inf}, "input.c: must be a finite number (no NaN or infinity)"),
        ({"a": 1, "b": "p", "c": None}, "input.c: is required (no missing values in training)"),
        ([1, 2], "input: expected an object of named fields, got list"),
    ]:
        with pytest.raises(RowError) as e:
            encode_row(spec, row)
        assert str(e.value) == msg


def test_bundle_manifest_holds_the_preprocessing(repo):
    model, m = load_bundle(repo / "models" / "diamonds" / "1")
    spec = TabularSpec.model_validate(m.input.options["tabular"])
    assert m.modality == "tabular" and m.task == "regression" and m.layer == "fc1"
    assert [f.name for f in spec.fields] == list(DIAMOND)
    assert spec.target == "price" and spec.target_transform == "log" and spec.target_std > 0
    cut = next(f for f in spec.fields if f.name == "cut")
    assert cut.categories == ["Fair", "Good", "Ideal", "Premium", "Very Good"]
    assert m.input.shape == [spec.width] == [26]
    assert model.predict(encode_row(spec, DIAMOND)[None], steps=2, ensemble=3, seeds=[0]).stacked().shape == (1, 3, 1)
    _, credit = load_bundle(repo / "models" / "credit" / "1")
    income = next(f for f in TabularSpec.model_validate(credit.input.options["tabular"]).fields if f.name == "Income")
    assert income.fill is not None  # Income has missing values in credit_data: requests may send null
    assert credit.labels == ["bad", "good"]


def test_predict_regression_and_classification(server, repo):
    r = httpx.post(f"{server.url}/predict", json={"model": "diamonds", "input": DIAMOND, "seed": 3, "ensemble": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    model, m = load_bundle(repo / "models" / "diamonds" / "1")  # the same answer, computed here
    spec = TabularSpec.model_validate(m.input.options["tabular"])
    want = model.predict(encode_row(spec, DIAMOND)[None], steps=body["ddim_steps"], ensemble=4, seeds=[3])
    assert body["value"] == pytest.approx(want.mean[0, 0].item() * spec.target_std + spec.target_mean, rel=1e-5)
    assert body["uncertainty"] == pytest.approx(want.uncertainty[0, 0].item() * spec.target_std, rel=1e-4)
    assert body["label"] is None and body["probabilities"] is None
    row = {
        "Seniority": 9,
        "Home": "rent",
        "Time": 60,
        "Age": 30,
        "Marital": "married",
        "Records": "no",
        "Job": "freelance",
        "Expenses": 73,
        "Income": None,
        "Assets": 0,
        "Debt": 0,
        "Amount": 800,
        "Price": 846,
    }
    c = httpx.post(f"{server.url}/predict", json={"model": "credit", "input": row, "seed": 1})
    assert c.status_code == 200, c.text
    assert c.json()["label"] in ("bad", "good") and set(c.json()["probabilities"]) == {"bad", "good"}
    meta = httpx.get(f"{server.url}/v2/models/diamonds").json()
    assert meta["inputs"][:2] == [
        {"name": "carat", "datatype": "FP32", "shape": [-1]},
        {"name": "cut", "datatype": "BYTES", "shape": [-1]},
    ]
    assert meta["outputs"][0] == {"name": "value", "datatype": "FP32", "shape": [-1, 1]}


@pytest.mark.parametrize(
    "change,error",
    [
        (
            {"cut": "Great"},
            "input.cut: unknown category 'Great'; known: ['Fair', 'Good', 'Ideal', 'Premium', 'Very Good']",
        ),
        ({"carat": "heavy"}, "input.carat: expected a number, got str"),
        ({"carat": None}, "input.carat: is required (no missing values in training)"),
        (
            {"weight": 1},
            "input.weight: unknown field; expected "
            "['carat', 'cut', 'color', 'clarity', 'depth', 'table', 'x', 'y', 'z']",
        ),
    ],
)
def test_tabular_errors_name_the_field(server, change, error):
    r = httpx.post(f"{server.url}/predict", json={"model": "diamonds", "input": {**DIAMOND, **change}})
    assert r.status_code == 422 and r.json() == {"error": error}


def test_tabular_missing_field_and_nan(server):
    row = dict(DIAMOND)
    del row["depth"]
    r = httpx.post(f"{server.url}/predict", json={"model": "diamonds", "input": row})
    assert r.status_code == 422 and r.json() == {"error": "input.depth: missing field"}
    body = (
        '{"model": "diamonds", "input": {"carat": NaN, "cut": "Ideal", "color": "E", "clarity": "SI1", '
        '"depth": 61.5, "table": 55, "x": 4.3, "y": 4.35, "z": 2.66}}'
    )
    r = httpx.post(f"{server.url}/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json() == {"error": "input.carat: must be a finite number (no NaN or infinity)"}


def test_v2_named_inputs_match_predict(server):
    rows = [DIAMOND, {**DIAMOND, "carat": 1.2, "cut": "Fair"}]
    inputs = [
        {
            "name": k,
            "shape": [2],
            "datatype": "BYTES" if isinstance(DIAMOND[k], str) else "FP32",
            "data": [r[k] for r in rows],
        }
        for k in DIAMOND
    ]
    out = httpx.post(
        f"{server.url}/v2/models/diamonds/infer", json={"inputs": inputs, "parameters": {"seed": 10, "ensemble": 2}}
    ).json()
    value, unc = out["outputs"]
    assert value["shape"] == [2, 1] and unc["shape"] == [2, 1]
    with ThreadPoolExecutor(2) as pool:
        singles = list(
            pool.map(
                lambda i: httpx.post(
                    f"{server.url}/predict", json={"model": "diamonds", "input": rows[i], "seed": 10 + i, "ensemble": 2}
                ).json(),
                range(2),
            )
        )
    assert value["data"] == pytest.approx([s["value"] for s in singles], abs=1e-5)
    assert value["data"][1] > value["data"][0]  # a 1.2 carat diamond costs more than a 0.3 carat one
    bad = httpx.post(f"{server.url}/v2/models/diamonds/infer", json={"inputs": inputs[1:]})
    assert bad.status_code == 422 and bad.json() == {"error": "inputs[carat]: missing input"}
    short = [dict(i, data=i["data"][:1], shape=[1]) if i["name"] == "z" else i for i in inputs]
    bad = httpx.post(f"{server.url}/v2/models/diamonds/infer", json={"inputs": short})
    assert bad.status_code == 422 and bad.json() == {"error": "inputs[z].data: holds 1 rows, other inputs hold 2"}


def test_out_of_range_numbers_are_refused():
    spec = TabularSpec(target="y", fields=[FieldSpec(name="a", kind="number")])
    for value, msg in [
        (10**400, "input.a: must be a finite number (no NaN or infinity)"),
        (1e300, "input.a: 1e+300 is out of range (|value| <= 1e30)"),
    ]:
        with pytest.raises(RowError) as e:
            encode_row(spec, {"a": value})
        assert str(e.value) == msg
