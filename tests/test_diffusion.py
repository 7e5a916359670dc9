"""Diffusion math against closed forms: schedules, q/posterior, parameterisations, samplers, guidance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modules.diffusion import (
    GaussianDiffusion,
    LossWeighting,
    Objective,
    Schedule,
    TimestepSampling,
    VarianceType,
    classifier_free_guidance,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    discretized_gaussian_log_likelihood,
    dynamic_threshold,
    make_betas,
    nested_guidance,
    space_timesteps,
    static_clip,
)
from modules.core.errors import ConfigError
from modules.diffusion.config import SamplingConfig, guided_model, sample

F64 = torch.float64


def make(objective: Objective = Objective.EPS, schedule: Schedule = Schedule.COSINE, steps: int = 1000,
         **kwargs) -> GaussianDiffusion:
    return GaussianDiffusion(make_betas(schedule, steps), objective=objective, **kwargs)


def oracle(base: GaussianDiffusion, x0: torch.Tensor, learned: bool = False):
    """A denoiser that knows x0: returns the prediction for base.objective consistent with x0.

    Uses the BASE tables at the timestep it is called with, so it is only right if samplers pass
    original timesteps.
    """

    def model_fn(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        target_x0 = x0.expand_as(x)
        pred = base.target(target_x0, base.x0_to_eps(x, t, target_x0), t)
        return torch.cat([pred, torch.zeros_like(pred)], dim=1) if learned else pred

    return model_fn


def gaussian_denoiser(base: GaussianDiffusion, mu: torch.Tensor, sd: torch.Tensor):
    """Exact ε-predictor for data x0 ~ N(mu, diag(sd²)): E[x0|x_t] = mu + c (x_t − √ᾱ mu)."""

    def model_fn(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        abar = torch.from_numpy(base.alphas_cumprod)[t][:, None]
        c = abar.sqrt() * sd**2 / (abar * sd**2 + 1 - abar)
        return base.x0_to_eps(x, t, mu + c * (x - abar.sqrt() * mu))

    return model_fn


# ---------------------------------------------------------------- schedules and respacing
def test_linear_and_cosine_betas() -> None:
    lin = make_betas(Schedule.LINEAR, 1000)
    assert lin.dtype == np.float64 and lin.shape == (1000,)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    lin50 = make_betas(Schedule.LINEAR, 50)  # scaled by 1000/T
    assert lin50[0] == pytest.approx(2e-3) and lin50[-1] == pytest.approx(0.4)
    cos = make_betas("cosine", 1000)
    assert (cos > 0).all() and cos.max() == pytest.approx(0.999)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    abar = np.cumprod(1 - cos)
    t = np.arange(1, 1001) / 1000
    np.testing.assert_allclose(abar[:-5], (f(t) / f(0))[:-5], rtol=1e-10)  # exact until β clips
    for betas in (lin, lin50, cos):
        assert (np.diff(np.cumprod(1 - betas)) < 0).all()


@pytest.mark.parametrize("schedule", [Schedule.LINEAR, Schedule.COSINE])
@pytest.mark.parametrize("shift", [0.5, 2.0, 4.0])
def test_schedule_shift_divides_snr_by_shift_squared(schedule: Schedule, shift: float) -> None:
    """Simple diffusion §3.1: logSNR'(t) = logSNR(t) − 2 log s at every t, and s = 1 is the plain schedule."""
    plain, shifted = make_betas(schedule, 1000), make_betas(schedule, 1000, shift=shift)
    np.testing.assert_array_equal(make_betas(schedule, 1000, shift=1.0), plain)
    log_snr = lambda b: np.log(np.cumprod(1 - b)) - np.log1p(-np.cumprod(1 - b))  # noqa: E731
    np.testing.assert_allclose(log_snr(shifted) - log_snr(plain), -2 * np.log(shift), atol=1e-6)
    assert ((shifted > 0) & (shifted < 1)).all() and (np.diff(np.cumprod(1 - shifted)) < 0).all()
    # the config builds the same process
    from modules.diffusion.config import DiffusionConfig

    built = DiffusionConfig(schedule=schedule, schedule_shift=shift).build()
    np.testing.assert_allclose(built.alphas_cumprod, np.cumprod(1 - shifted), rtol=1e-12)
    with pytest.raises(ValueError, match="shift"):
        make_betas(schedule, 10, shift=0.0)


def test_space_timesteps_specs() -> None:
    steps = space_timesteps(1000, 50)
    assert len(steps) == 50 and steps[0] == 0 and steps[-1] == 999 and steps == sorted(steps)
    assert space_timesteps(1000, 1) == [999]
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    sec = space_timesteps(1000, "10,15,20")
    assert len(sec) == 45 and sec[9] == 333 and sec[10] == 334 and sec[-1] == 999
    with pytest.raises(ValueError):
        space_timesteps(100, 101)


def test_respacing_keeps_alphas_cumprod_chain() -> None:
    base = make()
    d250 = base.respaced(space_timesteps(1000, 250))
    d50 = d250.respaced(space_timesteps(250, 50))
    d25 = d50.respaced(space_timesteps(50, 25))
    for d, n in ((d250, 250), (d50, 50), (d25, 25)):
        assert d.num_timesteps == n and d.timestep_map[-1] == 999 and d.timestep_map[0] == 0
        np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-10)
    # The map composes: d25's steps are a subset of d50's, which are a subset of d250's.
    assert set(d25.timestep_map) <= set(d50.timestep_map) <= set(d250.timestep_map)
    t = torch.arange(25)
    assert torch.equal(d25.model_timesteps(t), torch.from_numpy(d25.timestep_map))


# ---------------------------------------------------------------- forward process and posterior
def test_q_sample_statistics() -> None:
    d = make(schedule=Schedule.LINEAR)
    n = 200_000
    x0 = torch.tensor([1.0, -0.5, 0.25, 0.0], dtype=F64)
    for step in (10, 500, 990):
        t = torch.full((n,), step)
        xt = d.q_sample(x0.expand(n, 4), t, torch.randn(n, 4, dtype=F64))
        abar = np.prod(1 - d.betas[: step + 1])
        std_err = math.sqrt((1 - abar) / n)
        torch.testing.assert_close(xt.mean(0), math.sqrt(abar) * x0, atol=5 * std_err, rtol=0)
        torch.testing.assert_close(xt.var(0), torch.full((4,), 1 - abar, dtype=F64),
                                   atol=5 * (1 - abar) * math.sqrt(2 / n), rtol=0)
        mean, var, log_var = d.q_mean_variance(x0[None], t[:1])
        torch.testing.assert_close(mean[0], math.sqrt(abar) * x0)
        assert var.item() == pytest.approx(1 - abar) and log_var.item() == pytest.approx(math.log(1 - abar))


def test_posterior_matches_ddpm_eq_6_7() -> None:
    d = make()
    betas = d.betas
    t = torch.tensor([0, 1, 37, 500, 999])
    x0, xt = torch.randn(5, 3, 4, 4, dtype=F64), torch.randn(5, 3, 4, 4, dtype=F64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for i, s in enumerate(t.tolist()):
        abar = float(np.prod(1.0 - betas[: s + 1]))
        abar_prev = float(np.prod(1.0 - betas[:s]))  # empty product = 1
        beta = float(betas[s])
        mu = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0[i] + \
            (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)) * xt[i]
        torch.testing.assert_close(mean[i], mu, rtol=1e-10, atol=1e-12)
        beta_tilde = (1 - abar_prev) / (1 - abar) * beta
        assert var[i].item() == pytest.approx(beta_tilde, rel=1e-10, abs=1e-300)
        expected_log = math.log(beta_tilde) if s > 0 else math.log(d.posterior_variance[1])
        assert log_var[i].item() == pytest.approx(expected_log, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_parameterisation_round_trips(dtype: torch.dtype) -> None:
    d = make()
    # float32 cannot invert near the ends: ε→x0 divides by √ᾱ_999 ≈ 5e-5, x0→ε by √(1−ᾱ_0) ≈ 6e-3.
    t = torch.tensor([0, 5, 250, 700, 999] if dtype == F64 else [5, 250, 700, 900])
    x0, eps = torch.randn(len(t), 2, 8, dtype=dtype), torch.randn(len(t), 2, 8, dtype=dtype)
    xt = d.q_sample(x0, t, eps)
    assert xt.dtype == dtype
    atol = 1e-5 if dtype == F64 else 1e-4
    torch.testing.assert_close(d.eps_to_x0(xt, t, eps), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(d.x0_to_eps(xt, t, x0), eps, atol=atol, rtol=0)
    v = d.v_from(x0, eps, t)
    torch.testing.assert_close(d.v_to_x0(xt, t, v), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(d.v_to_eps(xt, t, v), eps, atol=1e-5, rtol=0)
    snr = d.snr(t, F64)
    torch.testing.assert_close(snr, torch.from_numpy(d.alphas_cumprod / (1 - d.alphas_cumprod))[t])


# ---------------------------------------------------------------- p(x_{t-1}|x_t) and samplers
def test_p_mean_variance_clip_and_variances() -> None:
    d = make(Objective.X0, variance=VarianceType.FIXED_LARGE)
    t = torch.tensor([0, 10, 600])
    x_t = torch.randn(3, 2, 4, 4, dtype=F64)
    raw = 3.0 * torch.randn(3, 2, 4, 4, dtype=F64)
    out = d.p_mean_variance(raw, x_t, t, clip=static_clip)
    torch.testing.assert_close(out["pred_x0"], raw.clamp(-1, 1))
    torch.testing.assert_close(out["pred_eps"], d.x0_to_eps(x_t, t, raw.clamp(-1, 1)))  # ε from clipped x̂0
    torch.testing.assert_close(out["mean"], d.q_posterior_mean_variance(raw.clamp(-1, 1), x_t, t)[0])
    expected_large = np.array([d.posterior_variance[1], d.betas[10], d.betas[600]])
    np.testing.assert_allclose(out["variance"].flatten().numpy(), expected_large, rtol=1e-12)
    learned = make(variance=VarianceType.LEARNED_RANGE)
    for v, table in ((-1.0, learned.posterior_variance), (1.0, learned.betas)):  # v ∈ [−1, 1]: β̃_t .. β_t
        res = learned.p_mean_variance(torch.cat([raw[1:], torch.full_like(raw[1:], v)], dim=1), x_t[1:], t[1:])
        np.testing.assert_allclose(res["variance"][:, 0, 0, 0].numpy(), table[t[1:]], rtol=1e-10)


def test_clipped_sampling_of_out_of_range_point() -> None:
    base = make(Objective.V)
    d = base.respaced(space_timesteps(1000, 10))
    point = torch.full((1, 3, 4, 4), 1.5, dtype=F64)
    x_T = torch.randn(2, 3, 4, 4, dtype=F64)
    out = ddpm_sample(d, oracle(base, point), x_T, clip=static_clip, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.ones_like(x_T))  # x̂0 = 1.5 clipped to 1 at every step


@pytest.mark.parametrize("objective", list(Objective))
def test_ddim_inversion_reconstructs_with_oracle(objective: Objective) -> None:
    base = make(objective)
    d = base.respaced(space_timesteps(1000, 50))
    x0 = torch.rand(2, 3, 8, 8, dtype=F64) * 2 - 1
    model_fn = oracle(base, x0)
    seen: list[int] = []
    x_T = ddim_invert(d, model_fn, x0, progress=False, callback=lambda info: seen.append(int(info["t"][0])))
    assert seen == list(d.timestep_map)  # model called with ORIGINAL steps, 0 → 999
    assert (x_T - x0).abs().max() > 0.5  # it did move to noise
    recon = ddim_sample(d, model_fn, x_T, progress=False)
    assert (recon - x0).abs().max() < 1e-4


@pytest.mark.parametrize("objective", list(Objective))
@pytest.mark.parametrize("variance", list(VarianceType))
def test_ddpm_one_point_distribution(objective: Objective, variance: VarianceType) -> None:
    base = make(objective, variance=variance)
    d = base.respaced(space_timesteps(1000, 20))
    point = torch.tensor([[0.3, -0.7, 0.9]], dtype=F64)  # (1, D): embeddings rank
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(4, 3, dtype=F64, generator=gen)
    model_fn = oracle(base, point, learned=variance is VarianceType.LEARNED_RANGE)
    steps: list[int] = []
    out = ddpm_sample(d, model_fn, x_T, generator=gen, progress=False, callback=lambda info: steps.append(info["i"]))
    assert steps == list(range(20))
    torch.testing.assert_close(out, point.expand(4, 3), atol=1e-6, rtol=0)


def test_ddim_eta1_equals_ddpm_and_seeded_noise() -> None:
    base = make()
    d = base.respaced(space_timesteps(1000, 10))
    model_fn = gaussian_denoiser(base, torch.tensor([0.5, -0.3], dtype=F64), torch.tensor([0.5, 1.0], dtype=F64))
    x_T = torch.randn(64, 2, dtype=F64)

    def run(sampler, **kw):
        return sampler(d, model_fn, x_T, generator=torch.Generator().manual_seed(3), progress=False, **kw)

    a, b = run(ddpm_sample), run(ddim_sample, eta=1.0)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)  # DDIM η=1 is DDPM with β̃ (Song et al. §4.1)
    assert torch.equal(a, run(ddpm_sample))  # same seed, same samples
    assert not torch.allclose(run(ddim_sample, eta=0.5), run(ddim_sample, eta=0.0))


def _ddim_affine_map(d: GaussianDiffusion, mu: float, sd: float) -> tuple[float, float]:
    """Independent float64 recursion: DDIM η=0 with the exact Gaussian denoiser is x0 = a x_T + b."""
    a, b = 1.0, 0.0
    abar_all = d.alphas_cumprod
    for k in range(d.num_timesteps - 1, -1, -1):
        abar, abar_prev = abar_all[k], (abar_all[k - 1] if k > 0 else 1.0)
        c = math.sqrt(abar) * sd**2 / (abar * sd**2 + 1 - abar)
        # x0̂ = mu + c (x − √ᾱ mu);  ε̂ = (x − √ᾱ x0̂)/√(1−ᾱ);  x' = √ᾱ' x0̂ + √(1−ᾱ') ε̂
        gx0, hx0 = c, mu - c * math.sqrt(abar) * mu  # x0̂ = gx0·x + hx0
        geps, heps = (1 - math.sqrt(abar) * gx0) / math.sqrt(1 - abar), -math.sqrt(abar) * hx0 / math.sqrt(1 - abar)
        g = math.sqrt(abar_prev) * gx0 + math.sqrt(1 - abar_prev) * geps
        h = math.sqrt(abar_prev) * hx0 + math.sqrt(1 - abar_prev) * heps
        a, b = g * a, g * b + h
    return a, b


def test_samplers_on_gaussian_data_match_closed_form() -> None:
    mu, sd = torch.tensor([0.5, -0.3], dtype=F64), torch.tensor([0.5, 1.0], dtype=F64)
    base = make(schedule=Schedule.LINEAR)
    d = base.respaced(space_timesteps(1000, 50))
    model_fn = gaussian_denoiser(base, mu, sd)
    x_T = torch.randn(20_000, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = ddim_sample(d, model_fn, x_T, progress=False)
    for j in range(2):  # deterministic affine map: exact, no Monte Carlo
        a, b = _ddim_affine_map(d, mu[j].item(), sd[j].item())
        torch.testing.assert_close(out[:, j], a * x_T[:, j] + b, atol=1e-9, rtol=0)
    # ... and it approaches the data distribution (50 steps leave a few % of variance error).
    torch.testing.assert_close(out.mean(0), mu, atol=0.03, rtol=0)
    torch.testing.assert_close(out.std(0), sd, atol=0, rtol=0.06)
    gen = torch.Generator().manual_seed(1)
    large = GaussianDiffusion(d.betas, variance=VarianceType.FIXED_LARGE, timestep_map=d.timestep_map)
    ancestral = ddpm_sample(large, model_fn, x_T, generator=gen, progress=False)
    torch.testing.assert_close(ancestral.mean(0), mu, atol=0.03, rtol=0)
    torch.testing.assert_close(ancestral.std(0), sd, atol=0, rtol=0.06)


def test_ddim_inversion_of_gaussian_data_gives_gaussian_latents() -> None:
    """Exact denoiser, non-trivial data: latents ≈ N(0, I); reconstruction error shrinks with steps."""
    mu, sd = torch.tensor([0.5, -0.3], dtype=F64), torch.tensor([0.5, 1.0], dtype=F64)
    base = make()
    model_fn = gaussian_denoiser(base, mu, sd)
    x0 = mu + sd * torch.randn(20_000, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (25, 50):
        d = base.respaced(space_timesteps(1000, steps))
        x_T = ddim_invert(d, model_fn, x0, progress=False)
        torch.testing.assert_close(x_T.mean(0), torch.zeros(2, dtype=F64), atol=0.12, rtol=0)
        torch.testing.assert_close(x_T.std(0), torch.ones(2, dtype=F64), atol=0.06, rtol=0)
        errors.append((ddim_sample(d, model_fn, x_T, progress=False) - x0).abs().mean().item())
    assert errors[1] < 0.05 and errors[1] < 0.7 * errors[0]  # first-order discretisation error


# ---------------------------------------------------------------- guidance and clipping
def _toy_conditional(calls: list[int]):
    """ε(x, c) = 0.5 x + [image term unless dropped] + [text term unless dropped]."""

    def model_fn(x, t, *, image_emb, drop_image, drop_text, text_bias: float):
        calls.append(x.shape[0])
        img = torch.where(drop_image[:, None], torch.zeros_like(image_emb), image_emb)
        txt = torch.where(drop_text[:, None], torch.zeros_like(image_emb), torch.full_like(image_emb, text_bias))
        return 0.5 * x + img + txt

    return model_fn


def test_classifier_free_guidance() -> None:
    calls: list[int] = []
    model_fn = _toy_conditional(calls)
    x, t = torch.randn(3, 4, dtype=F64), torch.tensor([1, 2, 3])
    kw = dict(image_emb=torch.randn(3, 4, dtype=F64), drop_image=torch.zeros(3, dtype=torch.bool),
              drop_text=torch.tensor([False, True, False]), text_bias=2.0)
    cond = model_fn(x, t, **kw)
    uncond = model_fn(x, t, **{**kw, "drop_image": torch.ones(3, dtype=torch.bool),
                               "drop_text": torch.ones(3, dtype=torch.bool)})
    calls.clear()
    keys = ("drop_image", "drop_text")
    torch.testing.assert_close(classifier_free_guidance(model_fn, 1.0, drop_keys=keys)(x, t, **kw), cond)
    assert calls == [6]  # one batched forward over [cond; uncond]
    torch.testing.assert_close(classifier_free_guidance(model_fn, 0.0, drop_keys=keys)(x, t, **kw), uncond)
    guided = classifier_free_guidance(model_fn, 3.0, drop_keys=keys)(x, t, **kw)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))
    # Learned variance: only the first half of dim 1 is guided; variance channels come from cond.
    two = lambda x, t, **k: torch.cat([model_fn(x, t, **k), -model_fn(x, t, **k)], dim=1)  # noqa: E731
    out = classifier_free_guidance(two, 3.0, drop_keys=keys, variance=VarianceType.LEARNED_RANGE)(x, t, **kw)
    torch.testing.assert_close(out, torch.cat([guided, -cond], dim=1))


def test_nested_guidance_against_explicit_passes() -> None:
    """ε_0 + s_1(ε_1 − ε_0) + s_2(ε_2 − ε_1) with each ε_k from its own call; equal scales = joint CFG."""
    calls: list[int] = []

    def model_fn(x, t, *, image_emb, drop_image, drop_text):  # an image x caption interaction term
        calls.append(x.shape[0])
        img = torch.where(drop_image[:, None], torch.zeros_like(image_emb), image_emb)
        txt = torch.where(drop_text[:, None], torch.zeros_like(x), torch.ones_like(x) * t[:, None])
        return 0.5 * x + img + txt + img * txt

    x, t = torch.randn(3, 4, dtype=F64), torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    no, yes = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    kw = dict(image_emb=torch.randn(3, 4, dtype=F64), drop_image=no, drop_text=torch.tensor([False, True, False]))
    eps0 = model_fn(x, t, **{**kw, "drop_image": yes, "drop_text": yes})
    eps1 = model_fn(x, t, **{**kw, "drop_text": yes})
    eps2 = model_fn(x, t, **kw)  # row 1's caption stays dropped, as given
    keys = ("drop_image", "drop_text")
    calls.clear()
    out = nested_guidance(model_fn, (2.0, 5.0), drop_keys=keys)(x, t, **kw)
    assert calls == [9]  # one batched forward over [ε_2; ε_1; ε_0]
    torch.testing.assert_close(out, eps0 + 2.0 * (eps1 - eps0) + 5.0 * (eps2 - eps1))
    torch.testing.assert_close(out[1], (eps0 + 2.0 * (eps1 - eps0))[1])  # a dropped caption adds nothing
    joint = classifier_free_guidance(model_fn, 3.0, drop_keys=keys)(x, t, **kw)
    torch.testing.assert_close(nested_guidance(model_fn, (3.0, 3.0), drop_keys=keys)(x, t, **kw), joint)
    two = lambda x, t, **k: torch.cat([model_fn(x, t, **k), -model_fn(x, t, **k)], dim=1)  # noqa: E731
    out2 = nested_guidance(two, (2.0, 5.0), drop_keys=keys, variance=VarianceType.LEARNED_RANGE)(x, t, **kw)
    torch.testing.assert_close(out2, torch.cat([out, -eps2], dim=1))  # variance channels from ε_2
    with pytest.raises(ValueError, match="2 drop keys"):
        nested_guidance(model_fn, (2.0,), drop_keys=keys)


def test_sampling_text_guidance_scale_needs_two_conditions() -> None:
    d = make(Objective.EPS)
    model = lambda x, t, **k: torch.zeros_like(x)  # noqa: E731
    cfg = SamplingConfig(steps=2, guidance_scale=2.0, text_guidance_scale=4.0)
    with pytest.raises(ConfigError, match="text_guidance_scale"):
        sample(d, model, torch.randn(2, 3), cfg, model_kwargs={"drop_text": torch.zeros(2, dtype=torch.bool)},
               drop_keys=("drop_text",))
    with pytest.raises(ConfigError, match="layout_guidance_scale"):  # a decoder without layouts
        guided_model(d, model, SamplingConfig(layout_guidance_scale=2.0), ("drop_image", "drop_text"))
    for name in ("text_guidance_scale", "layout_guidance_scale"):
        with pytest.raises(ValueError, match=name):
            SamplingConfig(**{name: -1.0})


def test_own_scales_guide_their_condition_by_name() -> None:
    """A layout decoder's drop keys are (image, caption, layout): text_guidance_scale weighs what the
    caption adds and layout_guidance_scale what the plan adds, each against explicit passes."""
    d = make(Objective.EPS)

    def model_fn(x, t, *, image_emb, drop_image, drop_text, drop_layout):  # interacting conditions
        img = torch.where(drop_image[:, None], torch.zeros_like(image_emb), image_emb)
        txt = torch.where(drop_text[:, None], torch.zeros_like(x), torch.ones_like(x) * t[:, None])
        lay = torch.where(drop_layout[:, None], torch.zeros_like(x), 0.3 * x.square())
        return 0.5 * x + img + txt + lay + img * txt * lay

    x, t = torch.randn(3, 4, dtype=F64), torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    no, yes = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    kw = dict(image_emb=torch.randn(3, 4, dtype=F64), drop_image=no, drop_text=no, drop_layout=no)
    eps = [model_fn(x, t, **{**kw, **{k: yes for k in ("drop_image", "drop_text", "drop_layout")[n:]}})
           for n in range(4)]  # eps[k]: the first k conditions kept
    keys = ("drop_image", "drop_text", "drop_layout")

    def nested(s1: float, s2: float, s3: float) -> torch.Tensor:
        return eps[0] + s1 * (eps[1] - eps[0]) + s2 * (eps[2] - eps[1]) + s3 * (eps[3] - eps[2])

    for own, want in ((dict(text_guidance_scale=5.0), nested(2.0, 5.0, 2.0)),
                      (dict(layout_guidance_scale=4.0), nested(2.0, 2.0, 4.0)),
                      (dict(text_guidance_scale=1.0, layout_guidance_scale=6.0), nested(2.0, 1.0, 6.0)),
                      ({}, nested(2.0, 2.0, 2.0))):
        out = guided_model(d, model_fn, SamplingConfig(guidance_scale=2.0, **own), keys)(x, t, **kw)
        torch.testing.assert_close(out, want)


def test_guiding_x0_or_v_equals_guiding_eps() -> None:
    d = make(Objective.V)
    t = torch.tensor([3, 400, 990])
    x_t = torch.randn(3, 5, dtype=F64)
    x0_c, x0_u, s = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64), 4.0
    eps_of = lambda x0: d.x0_to_eps(x_t, t, x0)  # noqa: E731
    guided_eps = eps_of(x0_u) + s * (eps_of(x0_c) - eps_of(x0_u))
    torch.testing.assert_close(eps_of(x0_u + s * (x0_c - x0_u)), guided_eps)
    v_of = lambda x0: d.v_from(x0, eps_of(x0), t)  # noqa: E731
    torch.testing.assert_close(d.v_to_eps(x_t, t, v_of(x0_u) + s * (v_of(x0_c) - v_of(x0_u))), guided_eps)


def test_static_clip_and_dynamic_threshold() -> None:
    assert torch.equal(static_clip(torch.tensor([-3.0, -0.5, 0.2, 7.0])), torch.tensor([-1.0, -0.5, 0.2, 1.0]))
    inside = torch.linspace(-0.9, 0.9, 201)  # |x| ≤ 1: s = 1, unchanged
    ramp = torch.arange(201.0) / 50.0  # |x| = 0, 0.02, ..., 4; 99.5th percentile = x[199] = 3.98
    x0 = torch.stack([inside, -ramp])  # (2, 201)
    out = dynamic_threshold(x0)
    torch.testing.assert_close(out[0], inside)
    s = 3.98
    torch.testing.assert_close(out[1], -ramp.clamp(max=s) / s)
    assert out[1].min() == -1.0
    half = dynamic_threshold(x0.reshape(2, 3, 67), percentile=0.5)  # median of ramp = 2.0; shape kept
    torch.testing.assert_close(half[1].flatten(), -ramp.clamp(max=2.0) / 2.0)


# ---------------------------------------------------------------- training losses
@pytest.mark.parametrize("objective", list(Objective))
def test_training_losses_oracle_and_min_snr(objective: Objective) -> None:
    d = make(objective, schedule=Schedule.LINEAR, loss_weighting=LossWeighting.MIN_SNR)
    x0 = torch.rand(6, 3, 8, 8, dtype=F64) * 2 - 1
    t = torch.tensor([0, 1, 50, 300, 700, 999])
    losses = d.training_losses(oracle(d, x0), x0, t, model_kwargs={})
    assert set(losses) == {"loss", "mse"} and losses["loss"].shape == (6,)
    assert losses["loss"].max() < 1e-12
    assert (d.training_losses(lambda x, t: torch.zeros_like(x), x0, t)["loss"] > 0).all()
    # Min-SNR-γ: whatever the target, the weighted loss equals min(SNR, 5)·‖x̂0 − x0‖² (Hang et al.).
    snr = d.alphas_cumprod[t] / (1 - d.alphas_cumprod[t])
    expected_w = {Objective.EPS: np.minimum(snr, 5) / snr, Objective.X0: np.minimum(snr, 5),
                  Objective.V: np.minimum(snr, 5) / (snr + 1)}[objective]
    np.testing.assert_allclose(d.loss_weight(t, F64).numpy(), expected_w, rtol=1e-12)
    delta = 0.1 * torch.randn_like(x0)
    losses = d.training_losses(oracle(d, x0 + delta), x0, t)
    x0_err = (delta**2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["loss"], torch.from_numpy(np.minimum(snr, 5.0)) * x0_err, rtol=1e-6, atol=0)


@pytest.mark.parametrize("objective", list(Objective))
def test_min_snr_floor_is_truncated_snr_below_gamma(objective: Objective) -> None:
    """min_snr_floor f: the loss is clamp(SNR, f, γ)·‖x̂0 − x0‖² whatever the target; f = 1 is Salimans &
    Ho's truncated SNR max(SNR, 1) where SNR < γ, and f = 0 is plain min-SNR, weight for weight."""
    d = make(objective, schedule=Schedule.LINEAR, loss_weighting=LossWeighting.MIN_SNR, min_snr_floor=1.0)
    t = torch.tensor([0, 1, 50, 300, 700, 999])
    snr = d.alphas_cumprod[t] / (1 - d.alphas_cumprod[t])
    assert snr.min() < 1e-3 and snr.max() > 5  # the clamp binds at both ends
    x0 = torch.rand(6, 3, 8, 8, dtype=F64) * 2 - 1
    delta = 0.1 * torch.randn_like(x0)
    losses = d.training_losses(oracle(d, x0 + delta), x0, t)
    x0_err = (delta**2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["loss"], torch.from_numpy(np.clip(snr, 1.0, 5.0)) * x0_err, rtol=1e-6, atol=0)
    plain = make(objective, schedule=Schedule.LINEAR, loss_weighting=LossWeighting.MIN_SNR)
    assert torch.equal(make(objective, schedule=Schedule.LINEAR, loss_weighting=LossWeighting.MIN_SNR,
                            min_snr_floor=0.0).loss_weight(t, F64), plain.loss_weight(t, F64))
    assert d.respaced([0, 500, 999]).min_snr_floor == 1.0
    with pytest.raises(ValueError, match="min_snr_floor"):
        make(objective, loss_weighting=LossWeighting.MIN_SNR, min_snr_floor=6.0)


def test_weighted_timesteps_follow_the_weights_and_estimate_the_same_objective() -> None:
    """t ∝ w_t (inverse CDF) with weights w̄/w_t: an unbiased, lower-variance estimate of E_{t~U}[w_t L_t]."""
    uniform = make(Objective.V, loss_weighting=LossWeighting.MIN_SNR)
    weighted = make(Objective.V, loss_weighting=LossWeighting.MIN_SNR, timestep_sampling=TimestepSampling.WEIGHTED)
    w = uniform.loss_weight(torch.arange(1000), F64).numpy()
    np.testing.assert_allclose(weighted.timestep_probs, w / w.sum(), rtol=1e-12)
    t = weighted.sample_timesteps(400_000, generator=torch.Generator().manual_seed(0))
    counts = np.bincount(t.numpy(), minlength=1000).reshape(20, 50).sum(1)  # 20 bins of 50 steps
    expected = 400_000 * (w / w.sum()).reshape(20, 50).sum(1)
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected.max())  # binomial tolerance
    assert counts[:1].sum() < expected.sum() * 0.01 and counts[19] < counts[6] / 20  # mass where w_t is
    t_all = torch.arange(1000)
    torch.testing.assert_close(uniform.importance_weight(t_all, F64), torch.ones(1000, dtype=F64))
    torch.testing.assert_close(weighted.importance_weight(t_all, F64), torch.from_numpy(w.mean() / w))
    # A fixed model's per-t objective L(t) = w_t ‖v − v̂‖²: both estimators have mean L̄ over t ~ U.
    x0 = torch.rand(1, 3, 8, 8, dtype=F64) * 2 - 1
    noise = torch.randn_like(x0)
    model = lambda x, t: 0.5 * x  # noqa: E731
    per_t = torch.stack([uniform.training_losses(model, x0, t.view(1), noise=noise)["loss"][0] for t in t_all])
    exact = per_t.mean()
    gen = torch.Generator().manual_seed(1)
    estimates = {}
    for name, d in (("uniform", uniform), ("weighted", weighted)):
        ts = d.sample_timesteps(20_000, generator=gen)
        estimates[name] = per_t[ts] * d.importance_weight(ts, F64)  # per-sample estimates
        assert abs(estimates[name].mean() - exact) < 4 * estimates[name].std() / math.sqrt(20_000)
    assert estimates["weighted"].var() < 0.7 * estimates["uniform"].var()
    # training_loss is that estimate: mean of per-sample losses × 1/(T p(t)).
    ts = torch.tensor([3, 300, 900])
    batch = x0.expand(3, -1, -1, -1)
    torch.manual_seed(0)  # outside a training step ε comes from the global generator
    got = weighted.training_loss(model, batch, ts)
    torch.manual_seed(0)
    ref = (weighted.training_losses(model, batch, ts)["loss"] * weighted.importance_weight(ts, F64)).mean()
    torch.testing.assert_close(got, ref)
    assert weighted.respaced(range(0, 1000, 10)).timestep_sampling is TimestepSampling.WEIGHTED


def test_learned_variance_vb_term() -> None:
    d = make(variance=VarianceType.LEARNED_RANGE)
    x0 = torch.rand(4, 3, 8, 8, dtype=F64) * 2 - 1
    t = torch.tensor([0, 1, 200, 900])
    noise = torch.randn_like(x0)
    base_model = oracle(d, x0)
    for v_value in (-1.0, 1.0, 0.3):
        out_holder: list[torch.Tensor] = []

        def model_fn(x, t, v=v_value):
            out = torch.cat([base_model(x, t), torch.full_like(x, v)], dim=1).requires_grad_(True)
            out_holder.append(out)
            return out

        losses = d.training_losses(model_fn, x0, t, noise=noise)
        vb = losses["vb"]
        assert torch.isfinite(vb).all() and (vb >= 0).all() and vb[0] > 0  # t = 0: −log-likelihood
        torch.testing.assert_close(losses["loss"], losses["mse"] + vb)
        if v_value == -1.0:  # exact mean and Σ = β̃_t: KL = 0 for t > 0
            assert vb[1:].abs().max() < 1e-8
        if v_value == 1.0:  # exact mean and Σ = β_t: KL = ½(log β/β̃ + β̃/β − 1), in bits, × λT
            beta, beta_tilde = d.betas[t[2:]], d.posterior_variance[t[2:]]
            kl = 0.5 * (np.log(beta / beta_tilde) + beta_tilde / beta - 1) / math.log(2) * 1000 * 1e-3
            np.testing.assert_allclose(vb[2:].detach().numpy(), kl, rtol=1e-8)
        vb.sum().backward()  # stop-gradient: vb trains the variance channels only
        grad = out_holder[0].grad
        assert grad[:, :3].abs().max() == 0 and grad[:, 3:].abs().max() > 0


def test_discretized_likelihood_sums_to_one() -> None:
    bins = torch.linspace(-1, 1, 256, dtype=F64)
    log_p = discretized_gaussian_log_likelihood(bins, torch.tensor(0.1, dtype=F64), torch.tensor(-1.5, dtype=F64))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_sample_timesteps_and_dtype_device() -> None:
    d = make(steps=50)
    t1 = d.sample_timesteps(5000, torch.Generator().manual_seed(0), device="cpu")
    t2 = d.sample_timesteps(5000, torch.Generator().manual_seed(0))
    assert torch.equal(t1, t2) and t1.dtype == torch.long and t1.min() == 0 and t1.max() == 49
    assert abs(t1.float().mean().item() - 24.5) < 1.0
    x = torch.randn(5000, 4, dtype=torch.float32)
    for dtype in (torch.float32, F64, torch.bfloat16):
        xt = d.q_sample(x.to(dtype), t1)
        assert xt.dtype == dtype and xt.device == x.device
