"""Compact denoiser: works on the delta's native (out, in) shape through its rows and columns.

Per-sample deltas of a Linear layer are nearly rank-1 (the gradient of one sample's loss is an
outer product), so ε is predicted as

    ε̂ = a(e_t) · x_t + U Vᵀ / sqrt(r),      U: (B, out, r), V: (B, in, r)

where e_t = PE(t)-MLP + e (conditioning) and the factors come from row / column features:
each row i of x_t is read through k probes made per column from that column's latent (and e_t):
R = x_t · P_col (B, out, k), C = x_tᵀ · P_row (B, in, k) — e.g. a probe ∝ 1[inp_j > 0] reads the
noisy row's projection on the sample's active inputs, the sufficient statistic of a rank-1
gradient delta. A shared per-row MLP maps
[R_i, pos_i, act_i] (FiLM'd by e_t) to U_i, a per-column MLP maps [C_j, pos_j, inp_j] to V_j —
row i of the delta belongs to output unit i, column j to input feature j, and the gradient
outer product makes these the latents that decide them.
Cost ~ 4·out·in·k + (out + in)·MLP FLOPs, about the size of the layer itself.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..conditioning import AXIS_FEATURES, ROW_FEATURES, Cond
from ..layers import mlp, timestep_embedding


class _AxisNet(nn.Module):
    """Per-row (or per-column) MLP: probe features (B, n, k), positions (n, p) and the latent
    along that axis (B, n, 2), FiLM'd by e (B, D) -> (B, n, r)."""

    def __init__(self, n: int, k: int, pos_dim: int, emb_dim: int, hidden: int, rank: int, n_feats: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(n, pos_dim) * 0.1)
        self.inp = nn.Linear(k + pos_dim + n_feats, hidden)
        self.film = nn.Linear(emb_dim, 2 * hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, rank))

    def forward(self, feats: torch.Tensor, axis: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        pos = self.pos.expand(feats.shape[0], -1, -1)
        h = self.inp(torch.cat([feats, pos, axis], dim=-1))
        gamma, beta = self.film(e).unsqueeze(1).chunk(2, dim=-1)
        return self.body(h * (1 + gamma) + beta)


class CompactDenoiser(nn.Module):
    """eps(x_t (B, out, in), t (B,), cond: Cond) -> (B, out, in)."""

    def __init__(self, delta_shape: tuple[int, ...], cond_dim: int, rank: int = 4, probes: int = 8,
                 hidden: int = 32, pos_dim: int = 8, emb_dim: int = 64):
        super().__init__()
        self.delta_shape = tuple(delta_shape)
        self.n_out = delta_shape[0]
        self.n_in = math.prod(delta_shape[1:])
        self.rank, self.probes, self.emb_dim = rank, probes, emb_dim
        self.time = mlp(emb_dim, emb_dim, emb_dim)
        self.cond = nn.Linear(cond_dim, emb_dim)
        R, C = ROW_FEATURES, AXIS_FEATURES
        self.col_probe = _AxisNet(self.n_in, 0, pos_dim, emb_dim, hidden, probes, C)  # P_col (B, in, k): reads rows
        self.row_probe = _AxisNet(self.n_out, 0, pos_dim, emb_dim, hidden, probes, R)  # P_row (B, out, k): reads cols
        self.rows = _AxisNet(self.n_out, probes, pos_dim, emb_dim, hidden, rank, R)
        self.cols = _AxisNet(self.n_in, probes, pos_dim, emb_dim, hidden, rank, C)
        self.skip = nn.Linear(emb_dim, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        B = x_t.shape[0]
        x = x_t.reshape(B, self.n_out, self.n_in)
        e = torch.nn.functional.silu(self.time(timestep_embedding(t, self.emb_dim)) + self.cond(cond.emb))
        none = x.new_zeros(B, 1, 0)
        p_col = self.col_probe(none.expand(B, self.n_in, 0), cond.cols, e) / math.sqrt(self.n_in)
        p_row = self.row_probe(none.expand(B, self.n_out, 0), cond.rows, e) / math.sqrt(self.n_out)
        u = self.rows(torch.bmm(x, p_col), cond.rows, e)  # (B, out, r)
        v = self.cols(torch.bmm(x.transpose(1, 2), p_row), cond.cols, e)  # (B, in, r)
        out = (self.skip(e).unsqueeze(-1) * x).baddbmm_(u, v.transpose(1, 2), alpha=1 / math.sqrt(self.rank))
        return out.reshape(x_t.shape)
