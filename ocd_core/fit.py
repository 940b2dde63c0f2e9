"""Training the OCD networks on per-sample targets: conditioning + denoiser (ε-MSE, EMA) and scale.

The Python API for a user's own model is ``build_target_set`` then ``fit_ocd``; see docs/python-api.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .conditioning import CondConfig, CondEncoder
from .denoisers import CompactConfig, DenoiserConfig, build_denoiser
from .ema import EMA
from .io import atomic_save_file, atomic_torch_save
from .predictor import OCDModel, Task
from .scale import ScaleConfig, ScaleNet, scale_loss
from .schedule import NoiseSchedule, ScheduleConfig
from .tap import get_layer, pool_latents, tap
from .targets import TargetConfig, overfit_deltas


class FitConfig(BaseModel):
    """Everything that defines an OCD training run on top of a base model."""

    targets: TargetConfig = TargetConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    denoiser: DenoiserConfig = CompactConfig()
    cond: CondConfig = CondConfig()
    scale: ScaleConfig = ScaleConfig()
    train_steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    scale_lr: float = Field(1e-3, gt=0)
    ema_mu: float = Field(0.999, ge=0, lt=1)
    seed: int = 0
    checkpoint_every: int = Field(500, ge=1)


@dataclass
class TargetSet:
    """Per-sample targets with the latents they are conditioned on.

    deltas (N, *W.shape); inp (N, d_i), act (N, d_a), out (N, d_o), grad (N, d_a) taken with the
    base weights (grad: Latents.grad, the label-free output error signal at the layer)."""

    deltas: torch.Tensor
    inp: torch.Tensor
    act: torch.Tensor
    out: torch.Tensor
    grad: torch.Tensor

    @property
    def scales(self) -> torch.Tensor:
        """ρ* per sample: (N,) root mean square of each delta. That is the std for a zero-mean delta;
        a delta that is nearly a constant shift (spoken digits conv1: std 3e-7, mean 1e-3) would
        otherwise give x_0 = δ/std entries in the thousands and a diverging denoiser."""
        return self.deltas.flatten(1).pow(2).mean(1).sqrt()

    def save(self, path: Path) -> None:
        atomic_save_file(vars(self), path)

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> TargetSet:
        return cls(**load_file(str(path), device=str(device)))


@torch.no_grad()
def build_target_set(
    base: nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TargetConfig | None = None,
    task: Task = "classification",
    chunk: int = 512,
    progress: bool = True,
    pool: int | None = None,
) -> TargetSet:
    """Overfit ``layer`` on every (x_n, y_n) alone and record the latents (pooled with
    ``tap.pool_latents`` when ``pool``, as ``CondConfig.latent_pool`` says): a TargetSet of N samples."""
    base.eval()
    conv = isinstance(get_layer(base, layer), nn.Conv2d)
    parts = []
    for i in tqdm(range(0, x.shape[0], chunk), desc="targets", disable=not progress, leave=False):
        xb, yb = x[i : i + chunk], y[i : i + chunk]
        lat = tap(base, layer, xb, grad_task=task)
        lat = pool_latents(lat, pool, conv) if pool else lat
        parts.append((overfit_deltas(base, layer, xb, yb, cfg, chunk=chunk), *lat.flat(), lat.grad.flatten(1)))
    return TargetSet(*(torch.cat(p) for p in zip(*parts)))


def fit_ocd(
    base: nn.Module,
    layer: str,
    targets: TargetSet,
    cfg: FitConfig | None = None,
    task: Task = "classification",
    checkpoint: Path | None = None,
    progress: bool = True,
) -> tuple[OCDModel, dict[str, list[float]]]:
    """Train conditioning + denoiser (MSE on ε or x_0 as the denoiser config says, EMA) and the scale net.

    Resumes from ``checkpoint`` (a weights-only torch file) when it exists; returns the
    OCDModel with the EMA weights and the loss history (``{"denoise_mse": [...], "scale_db": [...]}``).
    """
    cfg = cfg or FitConfig()
    torch.manual_seed(cfg.seed)
    device = next(base.parameters()).device
    keep = targets.scales > 0
    deltas, scales = targets.deltas[keep], targets.scales[keep]
    inp, act, out, grad = targets.inp[keep], targets.act[keep], targets.out[keep], targets.grad[keep]
    x0 = deltas / scales.view(-1, *([1] * (deltas.ndim - 1)))
    dims = (inp.shape[1], act.shape[1], out.shape[1])
    delta_shape = tuple(deltas.shape[1:])

    cond = CondEncoder(*dims, cfg.cond, weight_shape=delta_shape).to(device)
    den = build_denoiser(cfg.denoiser, delta_shape, cfg.cond.dim).to(device)
    scale_net = ScaleNet(*dims, cfg.scale).to(device)
    scale_net.log_offset.fill_(scales.log().mean())
    net = nn.ModuleDict({"cond": cond, "denoiser": den})
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched_lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.train_steps)
    opt_s = torch.optim.Adam(scale_net.parameters(), lr=cfg.scale_lr)
    ema = EMA(net, cfg.ema_mu)
    schedule = NoiseSchedule(cfg.schedule, device)
    hist: dict[str, list[float]] = {"denoise_mse": [], "scale_db": []}
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
        ema.shadow.load_state_dict(state["ema"])
        scale_net.load_state_dict(state["scale"])
        opt.load_state_dict(state["opt"])
        opt_s.load_state_dict(state["opt_s"])
        sched_lr.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"].cpu())
        if "cuda_rng" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        hist = {k: v.tolist() for k, v in state["hist"].items()}
        start = int(state["step"])
        ema.num_updates = start

    N = x0.shape[0]
    bar = tqdm(
        range(start, cfg.train_steps),
        desc="diffusion",
        disable=not progress,
        initial=start,
        total=cfg.train_steps,
        leave=False,
    )
    net.train()
    scale_net.train()
    for step in bar:
        idx = torch.randint(0, N, (min(cfg.batch_size, N),))
        xb = x0[idx].to(device)
        lat = (inp[idx].to(device), act[idx].to(device), out[idx].to(device))
        g = grad[idx].to(device)
        t = torch.randint(0, schedule.num_train_timesteps, (xb.shape[0],), device=device)
        noise = torch.randn_like(xb)
        target = schedule.training_target(cfg.denoiser.prediction, xb, noise)
        loss = F.mse_loss(den(schedule.q_sample(xb, t, noise), t, cond(*lat, g)), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched_lr.step()
        ema.update(net)
        s_loss = scale_loss(scale_net(*lat), scales[idx].to(device))
        opt_s.zero_grad(set_to_none=True)
        s_loss.backward()
        opt_s.step()
        hist["denoise_mse"].append(loss.item())
        hist["scale_db"].append(s_loss.item())
        if step % 50 == 0:
            bar.set_postfix(mse=f"{sum(hist['denoise_mse'][-50:]) / len(hist['denoise_mse'][-50:]):.4f}")
        if checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.train_steps:
            Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(
                {
                    "net": net.state_dict(),
                    "ema": ema.shadow.state_dict(),
                    "scale": scale_net.state_dict(),
                    "opt": opt.state_dict(),
                    "opt_s": opt_s.state_dict(),
                    "sched": sched_lr.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": step + 1,
                    **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                    "hist": {k: torch.tensor(v) for k, v in hist.items()},
                },
                Path(checkpoint),
            )
    model = OCDModel(
        base.eval(),
        layer,
        ema.shadow["cond"],
        ema.shadow["denoiser"],
        scale_net.eval(),
        cfg.schedule,
        task,
        float(scales.mean()),
    )
    return model.to(device), hist
