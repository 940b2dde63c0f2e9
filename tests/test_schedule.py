import pytest
import torch
from diffusers import DDIMScheduler

from ocd_core.schedule import NoiseSchedule, ScheduleConfig


def reference(cfg: ScheduleConfig | None = None):
    cfg = cfg or ScheduleConfig()
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
    )


def test_betas_and_alphas_match_original_code():
    s = NoiseSchedule()
    assert s.betas.shape == (1000,)
    assert torch.allclose(s.betas, torch.linspace(1e-6, 1e-2, 1000))
    assert torch.allclose(
        s.alphas_cumprod, torch.cumprod(1 - torch.linspace(1e-6, 1e-2, 1000, dtype=torch.float64), 0).float()
    )


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 50])
def test_timesteps_equal_diffusers(steps):
    ref = reference()
    ref.set_timesteps(steps)
    assert NoiseSchedule().ddim_timesteps(steps) == ref.timesteps.tolist()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [2, 10])
def test_ddim_steps_equal_diffusers(eta, steps):
    ref, s = reference(), NoiseSchedule()
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 12, generator=g)
    noises = torch.randn(steps, 3, 8, 12, generator=g)
    eps_fn = lambda v, t: torch.sin(3 * v + t / 100)  # any deterministic "denoiser"
    ours = s.ddim_sample(lambda v, t: eps_fn(v, t.view(-1, 1, 1).float()), x, steps, eta, noises)
    theirs = x.clone()
    for i, t in enumerate(ref.timesteps):
        theirs = ref.step(eps_fn(theirs, float(t)), t, theirs, eta=eta, variance_noise=noises[i]).prev_sample
    assert torch.allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    s.alphas_cumprod = ref.alphas_cumprod.clone()  # diffusers accumulates in float32: then bit-for-bit
    assert torch.equal(s.ddim_sample(lambda v, t: eps_fn(v, t.view(-1, 1, 1).float()), x, steps, eta, noises), theirs)


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20])
def test_ddim_with_exact_noise_oracle_recovers_x0(steps, eta):
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 6, 7, generator=g)

    def oracle(x_t, t):
        a = s.alphas_cumprod[t].view(-1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    x_T = torch.randn(4, 6, 7, generator=g)
    out = s.ddim_sample(oracle, x_T, steps, eta, torch.randn(steps, 4, 6, 7, generator=g) if eta else None)
    assert (out - x0).abs().max().item() < 1e-4


def test_q_sample_matches_formula():
    s = NoiseSchedule()
    x0, noise, t = torch.ones(2, 3), torch.full((2, 3), 2.0), torch.tensor([0, 999])
    a = s.alphas_cumprod[t].view(-1, 1)
    assert torch.allclose(s.q_sample(x0, t, noise), a.sqrt() + 2 * (1 - a).sqrt())


def test_bad_step_counts_are_refused():
    with pytest.raises(ValueError, match=r"ddim steps must be in \[1, 1000\], got 0"):
        NoiseSchedule().ddim_timesteps(0)
    with pytest.raises(ValueError, match="eta > 0 needs a noise tensor"):
        NoiseSchedule().step(torch.zeros(1), 500, torch.zeros(1), 400, eta=0.5)
    with pytest.raises(ValueError, match="prediction must be 'epsilon' or 'sample', got 'v'"):
        NoiseSchedule().step(torch.zeros(1), 500, torch.zeros(1), 400, prediction="v")


def eps_of(s: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The ε that x̂_0 implies at x_t (written out here, independently of the schedule's step)."""
    a = s.alphas_cumprod[t].view(-1, *[1] * (x_t.ndim - 1))
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


@pytest.mark.parametrize("steps", [1, 5, 10])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_ddim_with_exact_x0_oracle_lands_on_x0(steps, prediction):
    """A denoiser that knows x0 exactly, as ε or as x̂_0: DDIM lands on x0."""
    s = NoiseSchedule()
    x0 = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(2))
    fn = (lambda x_t, t: eps_of(s, x0, x_t, t)) if prediction == "epsilon" else (lambda x_t, t: x0.clone())
    out = s.ddim_sample(fn, torch.randn(3, 5, 4), steps, prediction=prediction)
    assert (out - x0).abs().max().item() < 1e-4
    noise = torch.randn(3, 5, 4)
    assert s.training_target("sample", x0, noise) is x0 and s.training_target("epsilon", x0, noise) is noise


@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_x0_sampler_equals_the_eps_sampler(steps, eta):
    """prediction="sample" (fused x̂0 update) == converting x̂0 to ε and taking the usual DDIM step."""
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(3)
    x_T, noise = torch.randn(2, 7, 5, generator=g), torch.randn(steps, 2, 7, 5, generator=g)
    x0_fn = lambda x, t: torch.tanh(x) * 0.5 + t.view(-1, 1, 1) / 2000  # any x̂0-predicting "denoiser"
    fused = s.ddim_sample(x0_fn, x_T, steps, eta, noise if eta else None, prediction="sample")
    via_eps = s.ddim_sample(lambda x, t: eps_of(s, x0_fn(x, t), x, t), x_T, steps, eta, noise if eta else None)
    assert (fused - via_eps).abs().max().item() < 1e-4


def test_q_sample_and_training_targets_are_the_closed_forms():
    s = NoiseSchedule()
    x0, noise, t = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.tensor([0, 10, 500, 999])
    ab = s.alphas_cumprod[t].view(-1, 1, 1)
    assert torch.equal(s.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    assert s.training_target("epsilon", x0, noise) is noise and s.training_target("sample", x0, noise) is x0


def test_alphas_are_accumulated_in_float64():
    ref = torch.cumprod(1 - torch.linspace(1e-6, 1e-2, 1000, dtype=torch.float64), 0)
    assert torch.equal(NoiseSchedule().alphas_cumprod, ref.float())
    assert not torch.equal(torch.cumprod(1 - torch.linspace(1e-6, 1e-2, 1000), 0), ref.float())  # float32 drifts


def test_schedule_bounds_defaults_and_errors():
    s = NoiseSchedule()
    assert s.ddim_timesteps(1000) == list(range(999, -1, -1))  # every training step can be a DDIM step
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=rf"^ddim steps must be in \[1, 1000\], got {bad}$"):
            s.ddim_timesteps(bad)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="^eta > 0 needs a noise tensor for the step$"):
        s.step(x, 500, x, 400, eta=0.5)
    with pytest.raises(ValueError, match="^prediction must be 'epsilon' or 'sample', got 'v'$"):
        s.step(x, 500, x, 400, "v")
    assert torch.equal(s.step(x, 500, x, 400), s.step(x, 500, x, 400, "epsilon"))  # ε by default
    assert s.x0_coefs(500, 400) == s.x0_coefs(500, 400, 0.0) and s.x0_coefs(500, 400, 1.0)[2] > 0  # eta 0 by default
