"""An analytic scene for the tinyNeRF recipe: a few coloured primitives with soft edges, rendered
with the model's own cameras and compositing (ocd_core.nets.nerf) at many samples per ray.

Poses lie on a sphere around the origin (a golden-angle spiral over elevations 10°–70°, radius 4);
the images are cached on disk, keyed by the settings."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from ocd_core.io import atomic_save_file
from ocd_core.nets.nerf import look_at, pixel_rays, sample_depths, volume_render

# (kind, centre, size, colour): sphere size = radius, box size = half extents
PRIMITIVES = [
    ("sphere", (0.0, 0.0, 0.35), 0.55, (0.90, 0.20, 0.15)),
    ("box", (0.65, -0.55, -0.35), (0.30, 0.30, 0.30), (0.15, 0.45, 0.90)),
    ("sphere", (-0.6, 0.6, -0.2), 0.40, (0.20, 0.80, 0.30)),
    ("box", (0.0, 0.0, -0.75), (1.1, 1.1, 0.08), (0.85, 0.80, 0.55)),
]
SIGMA = 40.0  # density inside a primitive
EDGE = 0.02  # width of the soft boundary


def _sdf(kind: str, p: torch.Tensor, centre, size) -> torch.Tensor:
    q = p - torch.tensor(centre, dtype=p.dtype)
    if kind == "sphere":
        return q.norm(dim=-1) - size
    d = q.abs() - torch.tensor(size, dtype=p.dtype)
    return d.clamp_min(0).norm(dim=-1) + d.max(-1).values.clamp_max(0)


def scene_field(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """points (..., 3) -> density (...), colour (..., 3): occupancy-weighted mix of the primitives."""
    occ = torch.stack([torch.sigmoid(-_sdf(k, points, c, s) / EDGE) for k, c, s, _ in PRIMITIVES], -1)
    colours = torch.tensor([c for *_, c in PRIMITIVES], dtype=points.dtype)
    rgb = (occ[..., None] * colours).sum(-2) / occ.sum(-1, keepdim=True).clamp_min(1e-6)
    return SIGMA * occ.sum(-1), rgb


def spiral_poses(n: int, radius: float = 4.0, el_range: tuple[float, float] = (10.0, 70.0)) -> torch.Tensor:
    """(n, 3) poses (azimuth°, elevation°, radius): golden-angle azimuths, elevations even in sin."""
    i = torch.arange(n, dtype=torch.float64)
    az = (i * 180.0 * (3 - math.sqrt(5))) % 360.0
    lo, hi = (math.sin(math.radians(e)) for e in el_range)
    el = torch.rad2deg(torch.asin(lo + (hi - lo) * (i + 0.5) / n))
    return torch.stack([az, el, torch.full_like(az, radius)], -1).float()


@torch.no_grad()
def render_scene(
    poses: torch.Tensor,
    H: int = 100,
    W: int = 100,
    fov_deg: float = 40.0,
    near: float = 2.0,
    far: float = 6.0,
    n_samples: int = 192,
) -> torch.Tensor:
    """Ground-truth images (N, 3, H, W) in [0, 1] on a white background."""
    focal = 0.5 * W / math.tan(math.radians(fov_deg) / 2)
    out = []
    for pose in poses.split(4):
        o, d = pixel_rays(look_at(pose), H, W, focal)
        t = sample_depths(pose.shape[0], o.shape[1], near, far, n_samples, False, o)
        sigma, rgb = scene_field(o[:, :, None] + d[:, :, None] * t[..., None])
        out.append(volume_render(sigma, rgb, t).transpose(1, 2).reshape(-1, 3, H, W))
    return torch.cat(out).clamp(0, 1)


def nerf_views(cache: Path, n_poses: int = 100, H: int = 100, W: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(poses (N, 3), images (N, 3, H, W)), rendered once and cached."""
    key = hashlib.sha256(json.dumps([PRIMITIVES, SIGMA, EDGE, n_poses, H, W]).encode()).hexdigest()[:12]
    path = Path(cache) / f"nerf-{key}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return t["poses"], t["images"]
    poses = spiral_poses(n_poses)
    images = render_scene(poses, H, W)
    atomic_save_file({"poses": poses, "images": images}, path)
    return poses, images
