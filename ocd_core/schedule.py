"""Noise schedule, forward noising and the DDIM sampler — independent of any denoiser.

Conventions follow DDPM/DDIM (and diffusers' ``DDIMScheduler`` with ``clip_sample=False``,
``set_alpha_to_one=True``, "leading" timestep spacing): ᾱ_t = Π_{s<=t} (1 − β_s),
x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε; the denoiser predicts ε or x_0 (``Prediction``), and
``step(model_output, t, sample, ...)`` is the one place that tells them apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, Field


class ScheduleConfig(BaseModel):
    """Linear betas; the original code uses ``linspace(1e-6, 1e-2, 1000)``."""

    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-6, gt=0)
    beta_end: float = Field(1e-2, gt=0, lt=1)
    beta_schedule: Literal["linear"] = "linear"


Reads = tuple[torch.Tensor, ...]  # a linear map of x_t, e.g. projections (N, out, k), (N, in, k)
FactorFn = Callable[[Reads, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (reads, t) -> s, U, V
ReadFn = Callable[[torch.Tensor, torch.Tensor], Reads]  # (U, V) -> the reads of U Vᵀ
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (N,*), t (N,)) -> eps or x0 (N,*)
Prediction = Literal["epsilon", "sample"]  # what a denoiser outputs: the noise ε, or the clean x_0


class NoiseSchedule:
    """β_t, ᾱ_t and the operations that use them. Tensors are float32 on ``device``."""

    def __init__(self, cfg: ScheduleConfig | None = None, device: torch.device | str = "cpu"):
        self.cfg = cfg or ScheduleConfig()
        T = self.cfg.num_train_timesteps
        betas = torch.linspace(self.cfg.beta_start, self.cfg.beta_end, T, dtype=torch.float64)
        self.betas = betas.float().to(device)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0).float().to(device)
        self._abar_host = self.alphas_cumprod.double().cpu().tolist()  # scalars for the sampler

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    def _abar(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return self.alphas_cumprod[t].reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise x0 (N, *) to timesteps t (N,): sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·noise."""
        a = self._abar(t, x0.ndim)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_target(self, prediction: Prediction, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the denoiser regresses: ε (the paper) or x_0."""
        return noise if prediction == "epsilon" else x0

    def ddim_timesteps(self, steps: int) -> list[int]:
        """Descending timesteps for ``steps`` DDIM steps ("leading" spacing: 900, 800, ..., 0 for 10)."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"ddim steps must be in [1, {T}], got {steps}")
        ratio = T // steps
        return [i * ratio for i in range(steps)][::-1]

    def _alphas(self, t: int, t_prev: int, eta: float) -> tuple[float, float, float]:
        """ᾱ_t, ᾱ_{t_prev} (1 at the clean end, t_prev < 0) and the step's noise std σ (DDIM's eta)."""
        a_t = self._abar_host[t]
        a_prev = self._abar_host[t_prev] if t_prev >= 0 else 1.0
        return a_t, a_prev, eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5

    def x0_coefs(self, t: int, t_prev: int, eta: float = 0.0) -> tuple[float, float, float]:
        """A DDIM step written in x̂_0: x_prev = c_x·x_t + c_0·x̂_0 + σ·z -> (c_x, c_0, σ)."""
        a_t, a_prev, std = self._alphas(t, t_prev, eta)
        c_x = max(1 - a_prev - std**2, 0.0) ** 0.5 / (1 - a_t) ** 0.5  # ε = (x_t − sqrt(ᾱ_t)·x̂_0) / sqrt(1 − ᾱ_t)
        return c_x, a_prev**0.5 - c_x * a_t**0.5, std

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        sample: torch.Tensor,
        t_prev: int,
        prediction: Prediction = "epsilon",
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One DDIM update of ``sample`` x_t (N, *) to x_{t_prev} (t_prev < 0: the clean end, ᾱ = 1), given
        the denoiser's ``model_output`` (N, *): ε or x̂_0 by ``prediction``, resolved here and nowhere else.
        ``noise`` (N, *) is the step's z when eta > 0.

        ε: diffusers' DDIMScheduler arithmetic (x̂_0 from ε, then the update; bit-for-bit with its float32
        ᾱ). x̂_0: the same update as two fused passes, x_prev = c_x·x_t + c_0·x̂_0 (``x0_coefs``)."""
        if eta > 0 and noise is None:
            raise ValueError("eta > 0 needs a noise tensor for the step")
        if prediction == "sample":
            c_x, c_0, std = self.x0_coefs(t, t_prev, eta)
            x_prev = model_output.mul(c_0).add_(sample, alpha=c_x)
            return x_prev.add_(noise, alpha=std) if eta > 0 else x_prev
        if prediction != "epsilon":
            raise ValueError(f"prediction must be 'epsilon' or 'sample', got {prediction!r}")
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
        x0 = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * model_output
        return x_prev + std * noise if eta > 0 else x_prev

    def ddim_sample(
        self,
        model_fn: ModelFn,
        x_T: torch.Tensor,
        steps: int,
        eta: float = 0.0,
        step_noise: torch.Tensor | None = None,
        prediction: Prediction = "epsilon",
    ) -> torch.Tensor:
        """Run DDIM from x_T (N, *) to x_0 with ``steps`` calls of ``model_fn(x_t, t (N,))`` -> ε or x̂_0.

        ``step_noise`` (steps, N, *) supplies the per-step noise when eta > 0, so a caller
        can draw it per request (results then do not depend on batch composition).
        """
        ratio = self.num_train_timesteps // steps
        x = x_T
        for i, t in enumerate(self.ddim_timesteps(steps)):
            out = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
            noise = step_noise[i] if step_noise is not None else None
            x = self.step(out.to(x.dtype), t, x, t - ratio, prediction, eta, noise)  # the state keeps its dtype
        return x

    def ddim_sample_lowrank(
        self, factor_fn: FactorFn, read_fn: ReadFn, reads_T: Reads, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DDIM (eta = 0) for an x̂_0-denoiser of the form x̂_0 = s·x_t + U Vᵀ that sees x_t only
        through a linear map ``reads``, without ever forming x_t.

        Each update x_prev = c_0·x̂_0 + c_x·x_t keeps the state x_t = a·x_T + Σ_j U_j V_jᵀ, and the
        reads follow by linearity: reads(x_prev) = (c_0·s + c_x)·reads(x_t) + c_0·read_fn(U, V).
        ``reads_T`` (each (N, ...)) are the reads of x_T; ``factor_fn(reads, t)``, t the step's
        timestep (an int: every sample is at the same step), returns s (N,),
        U (N, out, r), V (N, in, r). Returns a (N,), U (N, out, m), V (N, in, m) with
        x_0 = a·x_T + U Vᵀ and m = r·steps; equal to ``ddim_sample`` on the dense x_T up to float error.
        """
        ts = self.ddim_timesteps(steps)
        ratio = self.num_train_timesteps // steps
        N = reads_T[0].shape[0]
        reads = tuple(r.float() for r in reads_T)  # the state stays fp32 (e.g. under autocast)
        us: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        alphas: list[torch.Tensor] = []
        c0s: list[float] = []
        for t in ts:
            s, u, v = (z.float() for z in factor_fn(reads, t))
            c_x, c_0, _ = self.x0_coefs(t, t - ratio)
            alpha = c_0 * s + c_x  # (N,): the factor on x_t
            new = tuple(n.float() for n in read_fn(u, v))
            reads = tuple(r.mul(alpha.view(-1, *[1] * (r.ndim - 1))).add_(n, alpha=c_0) for r, n in zip(reads, new))
            us.append(u), vs.append(v), alphas.append(alpha), c0s.append(c_0)
        # U_j's weight in x_0: c_0,j times the factors on x_t of every later step
        al = torch.stack(alphas, 1)  # (N, steps)
        later = torch.cat([torch.flip(torch.cumprod(torch.flip(al[:, 1:], [1]), 1), [1]), al.new_ones(N, 1)], 1)
        coef = later * al.new_tensor(c0s)  # (N, steps)
        r = us[0].shape[-1]
        u_all = torch.cat(us, -1) * coef.repeat_interleave(r, 1).unsqueeze(1)
        return al.prod(1), u_all, torch.cat(vs, -1)
