"""tinyNeRF, as in the original OCD code's default example (after Krishna Murthy's tiny_nerf).

A camera pose x = (azimuth°, elevation°, radius) looks at the origin from a sphere; a pixel's ray
is sampled at ``n_samples`` depths in [near, far] (stratified: jittered in training, midpoints in
eval, so a prediction is deterministic); points are positionally encoded (3 + 6·n_freqs values) and
a 3-layer MLP (``fc1`` -> ``fc2`` -> ``out``: 4 values, density and colour) is volume rendered.
OCD adapts ``fc1``, the first fully connected layer (the paper's choice for tinyNeRF).

The pieces (``look_at``, ``pixel_rays``, ``positional_encoding``, ``volume_render``) are shared with
the analytic scene that renders the ground truth, so the data and the model see the same cameras.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a x b over the last dim (written out: ONNX has no cross product)."""
    a0, a1, a2 = a.unbind(-1)
    b0, b1, b2 = b.unbind(-1)
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], -1)


def look_at(pose: torch.Tensor) -> torch.Tensor:
    """pose (B, 3) = (azimuth°, elevation°, radius) -> camera-to-world (B, 3, 4): columns right, up,
    backward (the camera looks along −z, OpenGL style), then the camera position; world up is +z."""
    az, el, r = pose[:, 0] * (math.pi / 180), pose[:, 1] * (math.pi / 180), pose[:, 2]
    eye = torch.stack([r * torch.cos(el) * torch.cos(az), r * torch.cos(el) * torch.sin(az), r * torch.sin(el)], -1)
    back = F.normalize(eye, dim=-1)
    zero = torch.zeros_like(r)
    up_world = torch.stack([zero, zero, zero + 1], -1)
    right = F.normalize(_cross(up_world, back), dim=-1)
    up = _cross(back, right)
    return torch.stack([right, up, back, eye], -1)


def pixel_rays(c2w: torch.Tensor, H: int, W: int, focal: float, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through the centres of every ``stride``-th pixel: origins and unit directions (B, R, 3),
    R = ceil(H / stride) · ceil(W / stride), row-major."""
    ii, jj = torch.meshgrid(
        torch.arange(0, H, stride, dtype=c2w.dtype, device=c2w.device) + 0.5,
        torch.arange(0, W, stride, dtype=c2w.dtype, device=c2w.device) + 0.5,
        indexing="ij",
    )
    cam = torch.stack([(jj - W / 2) / focal, -(ii - H / 2) / focal, -torch.ones_like(ii)], -1).reshape(-1, 3)
    dirs = F.normalize(torch.einsum("rc,bkc->brk", cam, c2w[:, :, :3]), dim=-1)
    return c2w[:, None, :, 3].expand_as(dirs), dirs


def sample_depths(
    batch: int, n_rays: int, near: float, far: float, n_samples: int, jitter: bool, like: torch.Tensor
) -> torch.Tensor:
    """Stratified depths (B, R, S): the midpoints of S equal bins of [near, far], or a uniform draw
    within each bin when ``jitter``."""
    edges = torch.linspace(near, far, n_samples + 1, device=like.device, dtype=like.dtype)
    if not jitter:
        return ((edges[:-1] + edges[1:]) / 2).expand(batch, n_rays, n_samples)
    u = torch.rand(batch, n_rays, n_samples, device=like.device, dtype=like.dtype)
    return edges[:-1] + (edges[1:] - edges[:-1]) * u


def positional_encoding(p: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """p (..., 3) -> (..., 3 + 6·n_freqs): [p, sin(2^k p), cos(2^k p)] for k < n_freqs."""
    freqs = 2.0 ** torch.arange(n_freqs, device=p.device, dtype=p.dtype)
    angles = (p[..., None, :] * freqs[:, None]).flatten(-2)
    return torch.cat([p, torch.sin(angles), torch.cos(angles)], -1)


def volume_render(
    sigma: torch.Tensor, rgb: torch.Tensor, depths: torch.Tensor, background: float = 1.0
) -> torch.Tensor:
    """Emission-absorption compositing: sigma (B, R, S), rgb (B, R, S, 3), depths (B, R, S) -> (B, R, 3)."""
    delta = torch.cat([depths[..., 1:] - depths[..., :-1], torch.full_like(depths[..., :1], 1e10)], -1)
    tau = sigma * delta  # optical depth of each segment
    before = torch.cat([torch.zeros_like(tau[..., :1]), torch.cumsum(tau[..., :-1], -1)], -1)
    trans = torch.exp(-before)  # light reaching the segment: exp(−Σ earlier τ)
    w = (1 - torch.exp(-tau)) * trans
    return (w[..., None] * rgb).sum(-2) + background * (1 - w.sum(-1, keepdim=True))


class TinyNeRF(nn.Module):
    """x (B, 3) pose (azimuth°, elevation°, radius) -> (B, 3, h, w) RGB in [0, 1], h = ceil(H / stride).

    ``stride`` renders every stride-th pixel (training on a coarse grid, evaluating at full size);
    change it on the module. OCD layer: ``fc1`` (its input is (B, R·S, 3 + 6·n_freqs))."""

    def __init__(
        self,
        H: int = 100,
        W: int = 100,
        fov_deg: float = 40.0,
        near: float = 2.0,
        far: float = 6.0,
        n_samples: int = 32,
        n_freqs: int = 6,
        width: int = 128,
        stride: int = 1,
    ):
        super().__init__()
        self.H, self.W, self.near, self.far, self.n_samples, self.n_freqs = H, W, near, far, n_samples, n_freqs
        self.focal = 0.5 * W / math.tan(math.radians(fov_deg) / 2)
        self.stride = stride
        self.fc1 = nn.Linear(3 + 6 * n_freqs, width)
        self.fc2 = nn.Linear(width, width)
        self.out = nn.Linear(width, 4)

    def field(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points (B, P, 3) -> density (B, P), colour (B, P, 3)."""
        h = F.relu(self.fc1(positional_encoding(points, self.n_freqs)))
        o = self.out(F.relu(self.fc2(h)))
        return F.relu(o[..., 0]), torch.sigmoid(o[..., 1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        o, d = pixel_rays(look_at(x), self.H, self.W, self.focal, self.stride)
        t = sample_depths(B, o.shape[1], self.near, self.far, self.n_samples, self.training, o)
        pts = (o[:, :, None] + d[:, :, None] * t[..., None]).reshape(B, -1, 3)
        sigma, rgb = self.field(pts)
        S = self.n_samples
        img = volume_render(sigma.reshape(B, -1, S), rgb.reshape(B, -1, S, 3), t)
        h, w = -(-self.H // self.stride), -(-self.W // self.stride)
        return img.transpose(1, 2).reshape(B, 3, h, w)
