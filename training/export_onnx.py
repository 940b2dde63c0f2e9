"""Export a bundle's networks to ONNX, next to its safetensors, for ``OnnxRuntime`` (ocd_core/onnx_runtime.py).

Five graphs, each traced from the ``TorchRuntime`` stage of the same name, every batch dimension dynamic:

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
came from, so the runtime refuses graphs that no longer match their weights. The adapted forward
is exported for Linear layers (the multi-LoRA add-on ``einsum(inp, Δ)``) and Conv2d without groups
(one bmm with the input's patches); other layer types would need per-sample weights in a
convolution, which ONNX cannot batch.
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
from ocd_core.io import atomic_write_bytes, atomic_write_text
from ocd_core.onnx_runtime import GRAPHS, OnnxRuntime
from ocd_core.predictor import OCDModel
from ocd_core.runtime import TorchRuntime
from ocd_core.tap import Latents, get_layer

OPSET = 17


class ExportError(ValueError):
    """The bundle cannot be served by ONNX Runtime (the reason says why)."""


class _Stage(nn.Module):
    """One ``TorchRuntime`` stage as a module of flat tensors, for the exporter."""

    def __init__(self, model: OCDModel, fn):
        super().__init__()
        self.model, self.fn = model, fn  # the model's parameters are the graph's

    def forward(self, *args):
        return self.fn(*args)


def _stages(model: OCDModel, rt: TorchRuntime, ctx_type) -> dict[str, nn.Module]:
    """The five graphs, each the runtime's own stage (the latents as the base graph gives them)."""

    def base(x):
        up = rt.upstream(x)
        return (up.lat.inp, up.lat.act, up.lat.out, up.base_out, *up.live)

    fns = {
        "base": base,
        "cond": lambda inp, act, out: tuple(rt.context(Latents(inp, act, out))),
        "denoiser_step": lambda x_t, t, *ctx: rt.denoise(x_t, t, ctx_type(*ctx)),
        "scale": lambda inp, act, out: rt.scale(Latents(inp, act, out)),
        "adapt": lambda deltas, *live: rt.adapt(live, deltas),
    }
    return {g: _Stage(model, fn) for g, fn in fns.items()}


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={n: {0: "batch"} for n in inputs + outputs},
        )
    atomic_write_bytes(buf.getvalue(), path)


@torch.no_grad()
def export_onnx(directory: str | Path) -> list[Path]:
    """Write the five graphs and ``onnx.json`` into the bundle ``directory``; returns the paths."""
    directory = Path(directory)
    model, m = load_bundle(directory)
    if model.cond.output_grad:
        raise ExportError(
            f"{directory}: conditions on the output error signal (a backward pass); "
            "ONNX graphs hold forward passes only"
        )
    if fast_path(get_layer(model.base, m.layer)) is None:
        raise ExportError(
            f"{directory}: layer {m.layer!r} is not Linear or Conv2d (without groups); the ONNX "
            "adapted forward supports per-sample deltas of those"
        )
    x = torch.zeros(2, *m.input.shape)
    rt = TorchRuntime(model)
    up = rt.upstream(x)
    lat_args = (up.lat.inp, up.lat.act, up.lat.out)
    live_names = [f"live_{i}" for i in range(len(up.live))]
    ctx = rt.context(up.lat)
    ctx_names = list(type(ctx)._fields)
    stages = _stages(model, rt, type(ctx))
    x_t, t = torch.randn(2, *model.delta_shape), torch.tensor([900, 0])
    inputs = {
        "base": ["x"],
        "cond": ["inp", "act", "out"],
        "denoiser_step": ["x_t", "t", *ctx_names],
        "scale": ["inp", "act", "out"],
        "adapt": ["deltas", *live_names],
    }
    outputs = {
        "base": ["inp", "act", "out", "base_out", *live_names],
        "cond": ctx_names,
        "denoiser_step": ["out"],
        "scale": ["rho"],
        "adapt": ["out"],
    }
    args = {
        "base": (x,),
        "cond": lat_args,
        "denoiser_step": (x_t, t, *ctx),
        "scale": lat_args,
        "adapt": (x_t * 1e-3, *up.live),
    }
    paths = [directory / f"{g}.onnx" for g in GRAPHS]
    (directory / "onnx.json").unlink(missing_ok=True)  # the engine refuses a bundle without it meanwhile
    for g, path in zip(GRAPHS, paths):
        _export(stages[g], args[g], inputs[g], outputs[g], path)
    info = {
        "opset": OPSET,
        "torch": torch.__version__,
        "weights_sha256": weights_digest(directory),
        "inputs": inputs,
        "prediction": model.prediction,
    }
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
        import onnxruntime  # noqa: F401
    except ImportError:  # exporting needs onnx only; without onnxruntime there is nothing to compare
        return
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    want = model.predict(x, 3, [1, 2, 1], seeds=[0, 1, 2])
    try:
        got = model.predictor(OnnxRuntime(directory)).predict(x, 3, [1, 2, 1], seeds=[0, 1, 2])
    except Exception as e:  # noqa: BLE001  a graph traced at batch 2 that fails at batch 3
        raise ExportError(
            f"{directory}: the exported graphs fail on a batch of 3 ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "the base model's forward does not trace to one graph for every batch size (a Python loop over "
            "the batch?), so the graphs were not kept: serve this bundle with OCD_BACKEND=torch"
        ) from None
    err = (got.members - want.members).abs().max().item()
    if not err < tol:
        raise ExportError(
            f"{directory}: ONNX Runtime differs from torch by {err:.2e} (> {tol:g}); the graphs were not kept"
        )
