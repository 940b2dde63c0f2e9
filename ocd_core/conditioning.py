"""Conditioning: e = E_i(layer input) + E_a(layer output) + E_o(network output), plus axis features.

The timestep embedding PE(t) is added inside the denoiser, so the conditioning is computed
once per request and reused at every DDIM step. Besides the paper's global embedding ``emb``,
the encoder exposes the latents along the delta's axes: row i of a weight delta belongs to
output unit i (its activation), column j to input feature j (its value). The compact
denoiser reads these; the paper UNet uses ``emb`` only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pydantic import BaseModel, Field
from torch import nn

from .layers import mlp

AXIS_FEATURES = 2  # per row / column: value scaled by the sample's mean magnitude, and value > 0
ROW_FEATURES = AXIS_FEATURES + 1  # rows also carry the output error signal (Latents.grad), scaled


class Cond(NamedTuple):
    """emb (B, dim); rows (B, out, 3); cols (B, in_total, 2) for a weight of shape (out, in, ...)."""

    emb: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    def repeat_interleave(self, k: int) -> Cond:
        return Cond(*(t.repeat_interleave(k, 0) for t in self))


class CondConfig(BaseModel):
    dim: int = Field(128, ge=1, description="width of the conditioning embedding e")
    hidden: int = Field(256, ge=1)
    output_grad: bool = Field(
        False,
        description="also give the rows the output error signal (Latents.grad); "
        "off = the paper's conditioning (input, activation, output)",
    )
    latent_pool: int | None = Field(
        None,
        ge=1,
        description="condition on tap.pool_latents(latents, n): a Linear "
        "layer's latents averaged over the points it saw (tinyNeRF), a Conv2d layer's "
        "pooled per channel to n x n, image outputs pooled to n x n",
    )


def axis_features(x: torch.Tensor) -> torch.Tensor:
    """x (B, n) -> (B, n, 2): [x / mean|x|, 1[x > 0]]."""
    scaled = x / (x.abs().mean(1, keepdim=True) + 1e-6)
    return torch.stack([scaled, (x > 0).to(x.dtype)], dim=-1)


class CondEncoder(nn.Module):
    """Flattened latents inp (B, d_i), act (B, d_a), out (B, d_o) -> Cond for a weight of ``weight_shape``."""

    def __init__(
        self,
        d_inp: int,
        d_act: int,
        d_out: int,
        cfg: CondConfig | None = None,
        weight_shape: tuple[int, ...] | None = None,
    ):
        super().__init__()
        cfg = cfg or CondConfig()
        self.dim, self.output_grad, self.latent_pool = cfg.dim, cfg.output_grad, cfg.latent_pool
        self.weight_shape = tuple(weight_shape) if weight_shape else (d_act, d_inp)
        self.e_i = mlp(d_inp, cfg.hidden, cfg.dim, norm_input=True)
        self.e_a = mlp(d_act, cfg.hidden, cfg.dim, norm_input=True)
        self.e_o = mlp(d_out, cfg.hidden, cfg.dim, norm_input=True)

    def embed(self, inp: torch.Tensor, act: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The paper's e (B, dim)."""
        return self.e_i(inp.flatten(1)) + self.e_a(act.flatten(1)) + self.e_o(out.flatten(1))

    def forward(
        self, inp: torch.Tensor, act: torch.Tensor, out: torch.Tensor, grad: torch.Tensor | None = None
    ) -> Cond:
        B = inp.shape[0]
        n_out, c_in = self.weight_shape[0], self.weight_shape[1]
        taps = math.prod(self.weight_shape[2:])  # kernel positions per input channel (1 for Linear)

        def per_unit(v: torch.Tensor, n: int) -> torch.Tensor:
            """(B, ...) -> (B, n): Linear features are last (B, ..., n), conv channels first (B, n, ...)."""
            return v.reshape(B, -1, n).mean(1) if len(self.weight_shape) == 2 else v.reshape(B, n, -1).mean(-1)

        rows = axis_features(per_unit(act, n_out))  # per output unit / channel
        if self.output_grad:
            if grad is None:
                raise ValueError("this encoder conditions on the output error signal: pass Latents.grad")
            g = per_unit(grad, n_out)
            rows = torch.cat([rows, (g / (g.abs().mean(1, keepdim=True) + 1e-12)).unsqueeze(-1)], -1)
        else:
            rows = torch.cat([rows, rows.new_zeros(B, n_out, 1)], -1)
        cols = per_unit(inp, c_in).repeat_interleave(taps, 1)  # per weight column
        return Cond(self.embed(inp, act, out), rows, axis_features(cols))
