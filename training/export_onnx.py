"""Export a bundle's networks to ONNX, next to its safetensors, for the ONNX Runtime engine.

Five graphs, every batch dimension dynamic:

  base.onnx           x (N, *input)            -> inp, act, out (the layer's latents, pooled as the
                                                  conditioning sees them), base_out (the base model's
                                                  output), live_0.. (values alive at the layer: the
                                                  adapted forward starts from them)
  cond.onnx           inp, act, out            -> the conditioning, prepared for every DDIM step
                                                  (compact: e_c, rows, cols, p_col, p_row; paper: emb, rows, cols)
  denoiser_step.onnx  x_t (N, *W), t (N,) int64, *cond -> ε or x̂_0 (N, *W): one step, the sampler stays outside
  scale.onnx          inp, act, out            -> ρ (N,)
  adapt.onnx          deltas (N, *W), live_0.. -> the adapted network output (N, *out)

``onnx.json`` records the opset, the torch version and the SHA-256 of the safetensors the graphs
came from, so the engine refuses graphs that no longer match their weights. The adapted forward
is exported for Linear layers (the multi-LoRA add-on ``einsum(inp, Δ)``); other layer types need
per-sample weights in a convolution, which ONNX cannot batch.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ocd_core.adapt import fast_path
from ocd_core.bundle import load_bundle, weights_digest
from ocd_core.conditioning import Cond
from ocd_core.denoisers.compact import CompactDenoiser, Context
from ocd_core.io import atomic_write_bytes, atomic_write_text
from ocd_core.predictor import OCDModel
from ocd_core.tap import get_layer, tap

OPSET = 17
GRAPHS = ("base", "cond", "denoiser_step", "scale", "adapt")


class ExportError(ValueError):
    """The bundle cannot be served by ONNX Runtime (the reason says why)."""


class _Base(nn.Module):
    def __init__(self, model: OCDModel, x: torch.Tensor):
        super().__init__()
        self.model = model
        self.live_count = len(model._upstream(x)[0])

    def forward(self, x):
        live, tail = self.model._upstream(x)
        raw = tap(tail, self.model.layer, live)
        lat = self.model._pool(raw)  # what the conditioning sees (CondConfig.latent_pool)
        return (lat.inp, lat.act, lat.out, raw.out, *live)


class _Cond(nn.Module):
    def __init__(self, model: OCDModel):
        super().__init__()
        self.cond, self.den = model.cond, model.denoiser

    def forward(self, inp, act, out):  # the latents as the base graph gives them, flattened here
        c = self.cond(inp.flatten(1), act.flatten(1), out.flatten(1))
        return tuple(self.den.prepare(c)) if isinstance(self.den, CompactDenoiser) else tuple(c)


class _Step(nn.Module):
    def __init__(self, model: OCDModel):
        super().__init__()
        self.den = model.denoiser

    def forward(self, x_t, t, *ctx):
        c = Context(*ctx) if isinstance(self.den, CompactDenoiser) else Cond(*ctx)
        return self.den(x_t, t, c)


class _Scale(nn.Module):
    def __init__(self, model: OCDModel):
        super().__init__()
        self.scale = model.scale_net

    def forward(self, inp, act, out):
        return self.scale(inp.flatten(1), act.flatten(1), out.flatten(1))


class _Adapt(nn.Module):
    def __init__(self, model: OCDModel, tail: nn.Module):
        super().__init__()
        self.tail, self.layer = tail, model.layer

    def forward(self, deltas, *live):  # the Linear / Conv2d add-on (export_onnx checked the layer and shapes)
        module = get_layer(self.tail, self.layer)
        return fast_path(module)(self.tail, module, live, deltas)


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes={n: {0: "batch"} for n in inputs + outputs})
    atomic_write_bytes(buf.getvalue(), path)


@torch.no_grad()
def export_onnx(directory: str | Path) -> list[Path]:
    """Write the five graphs and ``onnx.json`` into the bundle ``directory``; returns the paths."""
    directory = Path(directory)
    model, m = load_bundle(directory)
    if model.cond.output_grad:
        raise ExportError(f"{directory}: conditions on the output error signal (a backward pass); "
                          "ONNX graphs hold forward passes only")
    if fast_path(get_layer(model.base, m.layer)) is None:
        raise ExportError(f"{directory}: layer {m.layer!r} is not Linear or Conv2d (without groups); the ONNX "
                          "adapted forward supports per-sample deltas of those")
    x = torch.zeros(2, *m.input.shape)
    base = _Base(model, x)
    live, tail = model._upstream(x)
    lat = model._pool(tap(tail, m.layer, live))
    lat_args = (lat.inp, lat.act, lat.out)
    live_names = [f"live_{i}" for i in range(base.live_count)]
    cond = _Cond(model)
    ctx = cond(*lat_args)
    ctx_names = list(Context._fields if isinstance(model.denoiser, CompactDenoiser) else Cond._fields)
    W = model.delta_shape
    x_t, t = torch.randn(2, *W), torch.tensor([900, 0])
    inputs = {"base": ["x"], "cond": ["inp", "act", "out"], "denoiser_step": ["x_t", "t", *ctx_names],
              "scale": ["inp", "act", "out"], "adapt": ["deltas", *live_names]}
    paths = [directory / f"{g}.onnx" for g in GRAPHS]
    (directory / "onnx.json").unlink(missing_ok=True)  # the engine refuses a bundle without it meanwhile
    _export(base, (x,), inputs["base"], ["inp", "act", "out", "base_out", *live_names], paths[0])
    _export(cond, lat_args, inputs["cond"], ctx_names, paths[1])
    _export(_Step(model), (x_t, t, *ctx), inputs["denoiser_step"], ["out"], paths[2])
    _export(_Scale(model), lat_args, inputs["scale"], ["rho"], paths[3])
    _export(_Adapt(model, tail), (x_t * 1e-3, *live), inputs["adapt"], ["out"], paths[4])
    info = {"opset": OPSET, "torch": torch.__version__, "weights_sha256": weights_digest(directory),
            "inputs": inputs, "prediction": model.prediction}
    atomic_write_text(json.dumps(info, indent=2), directory / "onnx.json")
    try:
        _verify(directory, model, m.input.shape)
    except BaseException:
        for path in paths + [directory / "onnx.json"]:  # no graphs rather than wrong ones
            path.unlink(missing_ok=True)
        raise
    return paths + [directory / "onnx.json"]


def _verify(directory: Path, model: OCDModel, shape: list[int], tol: float = 1e-4) -> None:
    """ONNX Runtime against torch on 3 random inputs with ragged ensembles; ExportError beyond ``tol``."""
    try:
        from service.onnx_engine import OnnxOCD
    except ImportError:  # exporting needs onnx only; without onnxruntime there is nothing to compare
        return
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    want, _ = model.predict_ragged(x, 3, [1, 2, 1], [0, 1, 2])
    got, _ = OnnxOCD(directory, model).predict_ragged(x, 3, [1, 2, 1], [0, 1, 2])
    err = max((a.members - b.members).abs().max().item() for a, b in zip(got, want))
    if not err < tol:
        raise ExportError(f"{directory}: ONNX Runtime differs from torch by {err:.2e} (> {tol:g}); "
                          "the graphs were not kept")
