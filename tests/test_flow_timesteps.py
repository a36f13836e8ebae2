"""Flow-matching sigma tables, SD3 timestep samplers and flow reward scales, against diffusers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffalign.timesteps import (
    FLOW_ONLY_REWARD_SCALES,
    MODE_SCALE_MAX,
    MODE_SCALE_MIN,
    REWARD_SCALES,
    TIMESTEP_SAMPLERS,
    LogitNormalTimesteps,
    ModeTimesteps,
    SkewedTimesteps,
    UniformTimesteps,
    build_timestep_sampler,
    flow_sigmas,
    image_seq_len,
    resolution_mu,
    reward_scale,
)
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

T = 1000
N_DRAWS = 200_000
# float32 scheduler tables against our float64 ones: a few float32 ulps near 1
F32_ATOL = 1e-6


def chi2_critical(df: int) -> float:
    """Chi-square 0.999 quantile: scipy, else the Wilson-Hilferty approximation (z = 3.090232)."""
    try:
        from scipy.stats import chi2
    except ImportError:
        c = 2.0 / (9.0 * df)
        return df * (1.0 - c + 3.090232 * math.sqrt(c)) ** 3
    return float(chi2.ppf(0.999, df))


def grouped_chi2(timesteps: torch.Tensor, probs: torch.Tensor, groups: int = 25) -> tuple[float, float]:
    """Chi-square of the t histogram over ~equal-mass groups of contiguous t; (statistic, critical)."""
    cum = probs.cumsum(0) - probs / 2
    group_of_t = torch.bucketize(cum, torch.linspace(0, 1, groups + 1, dtype=torch.float64)[1:-1])
    expected = torch.zeros(groups, dtype=torch.float64).index_add_(0, group_of_t, probs)
    counts = torch.bincount(group_of_t[timesteps], minlength=groups).to(torch.float64)
    keep = expected > 0
    e = expected[keep] * timesteps.numel()
    stat = float(((counts[keep] - e) ** 2 / e).sum())
    return stat, chi2_critical(int(keep.sum()) - 1)


def diffusers_timesteps(scheme: str, n: int, seed: int, **kwargs: float) -> torch.Tensor:
    """diffusers' training-script draw, u -> index into the descending timesteps -> our ascending t."""
    g = torch.Generator().manual_seed(seed)
    u = compute_density_for_timestep_sampling(scheme, n, generator=g, **kwargs)
    index = (u * T).long()
    assert int(index.min()) >= 0 and int(index.max()) < T
    return T - 1 - index


# --------------------------------------------------------------------------------------------------------
# sigma tables


@pytest.mark.parametrize("num_train_timesteps", [T, 7])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flow_sigmas_static_shift_is_the_scheduler_table(num_train_timesteps: int, shift: float) -> None:
    ours = flow_sigmas(num_train_timesteps, shift=shift)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    assert ours.dtype == torch.float64 and ours.shape == (num_train_timesteps,)
    torch.testing.assert_close(ours, sched.sigmas.flip(0).double(), atol=F32_ATOL, rtol=0)
    # the model timestep the scheduler uses for each index is sigma * T
    torch.testing.assert_close(ours * num_train_timesteps, sched.timesteps.flip(0).double(),
                               atol=F32_ATOL * num_train_timesteps, rtol=0)
    assert float(ours[-1]) == 1.0 and bool((ours.diff() > 0).all())


@pytest.mark.parametrize("mu", [0.5, 1.15, 0.9, -0.3])
def test_flow_sigmas_mu_is_the_scheduler_time_shift(mu: float) -> None:
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, use_dynamic_shifting=True)
    base = torch.arange(1, T + 1, dtype=torch.float64) / T
    ours = flow_sigmas(T, mu=mu)
    torch.testing.assert_close(ours, sched.time_shift(mu, 1.0, base), atol=1e-12, rtol=0)
    # ... and the float32 sigmas the scheduler itself would start from
    torch.testing.assert_close(ours, sched.time_shift(mu, 1.0, sched.sigmas.flip(0)).double(),
                               atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("steps", [T, 50])
def test_flow_sigmas_mu_holds_the_pipeline_inference_sigmas(steps: int) -> None:
    # FLUX / Qwen-Image call set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu): those sigmas are
    # the table's entries at t = (T/N) k - 1.
    mu = resolution_mu(image_seq_len(512))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    visited = sched.sigmas[:-1].double()  # drop the appended terminal 0
    t = torch.arange(T // steps, T + 1, T // steps).flip(0) - 1
    torch.testing.assert_close(flow_sigmas(T, mu=mu)[t], visited, atol=F32_ATOL, rtol=0)


def test_flow_sigmas_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="not both"):
        flow_sigmas(T, shift=3.0, mu=1.0)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(T, shift=0.0)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(T, shift=float("nan"))
    with pytest.raises(ValueError, match="mu"):
        flow_sigmas(T, mu=float("inf"))
    with pytest.raises(ValueError, match="num_train_timesteps"):
        flow_sigmas(0)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6400, 100])
def test_resolution_mu_is_calculate_shift(seq_len: int) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift as qwen_shift

    assert resolution_mu(seq_len) == pytest.approx(flux_shift(seq_len), abs=1e-12)
    qwen = dict(base_seq_len=256, max_seq_len=8192, base_shift=0.5, max_shift=0.9)
    assert resolution_mu(seq_len, **qwen) == pytest.approx(qwen_shift(seq_len, **qwen), abs=1e-12)
    with pytest.raises(ValueError, match="max_seq_len"):
        resolution_mu(seq_len, base_seq_len=512, max_seq_len=512)


@pytest.mark.parametrize("resolution", [256, 512, 1024, 1000, 328])
def test_image_seq_len_is_the_pipelines_packed_length(resolution: int) -> None:
    from diffusers import FluxPipeline, QwenImagePipeline

    flux = SimpleNamespace(vae_scale_factor=8, _pack_latents=FluxPipeline._pack_latents,
                           _prepare_latent_image_ids=FluxPipeline._prepare_latent_image_ids)
    latents, _ = FluxPipeline.prepare_latents(flux, 1, 16, resolution, resolution, torch.float32, "cpu", None)
    assert image_seq_len(resolution) == latents.shape[1]
    qwen = SimpleNamespace(vae_scale_factor=8, _pack_latents=QwenImagePipeline._pack_latents)
    latents = QwenImagePipeline.prepare_latents(
        qwen, 1, 16, resolution, resolution, torch.float32, "cpu", None
    )
    assert image_seq_len(resolution) == latents.shape[1]


def test_image_seq_len_arguments() -> None:
    assert image_seq_len(1024) == 4096 and image_seq_len(512, vae_scale=8, patch=1) == 4096
    with pytest.raises(ValueError, match="resolution"):
        image_seq_len(8)
    with pytest.raises(ValueError, match="vae_scale"):
        image_seq_len(512, vae_scale=0)


# --------------------------------------------------------------------------------------------------------
# samplers


def test_registry_and_builder() -> None:
    assert TIMESTEP_SAMPLERS == ("uniform", "skewed", "logit_normal", "mode")
    s = build_timestep_sampler("logit_normal", T, logit_mean=0.3, logit_std=0.7)
    assert isinstance(s, LogitNormalTimesteps) and (s.logit_mean, s.logit_std) == (0.3, 0.7)
    m = build_timestep_sampler(" Mode ", 20, mode_scale=0.5)
    assert isinstance(m, ModeTimesteps) and m.mode_scale == 0.5 and m.num_train_timesteps == 20
    # the existing positional form keeps working
    sk = build_timestep_sampler("skewed", T, 0.8, 5)
    assert isinstance(sk, SkewedTimesteps) and (sk.gamma, sk.num_bins) == (0.8, 5)
    assert isinstance(build_timestep_sampler("uniform", T), UniformTimesteps)


@pytest.mark.parametrize(
    "sampler",
    [LogitNormalTimesteps(T), LogitNormalTimesteps(T, 1.0, 0.5), LogitNormalTimesteps(13, -0.5, 2.0),
     ModeTimesteps(T), ModeTimesteps(T, MODE_SCALE_MAX), ModeTimesteps(T, MODE_SCALE_MIN), ModeTimesteps(13)],
    ids=repr,
)
def test_probs_is_a_distribution(sampler) -> None:
    p = sampler.probs()
    assert p.dtype == torch.float64 and p.shape == (sampler.num_train_timesteps,)
    assert bool((p >= 0).all())
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)


def test_logit_normal_probs_formula() -> None:
    # independent write-out: P(t) = P(i/T <= sigmoid(z) < (i+1)/T), i = T-1-t, z ~ N(m, s)
    m, s, n = 0.4, 1.3, 50
    phi = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
    logit = lambda u: -math.inf if u == 0 else (math.inf if u == 1 else math.log(u / (1 - u)))  # noqa: E731
    expected = []
    for t in range(n):
        i = n - 1 - t
        expected.append(phi((logit((i + 1) / n) - m) / s) - phi((logit(i / n) - m) / s))
    torch.testing.assert_close(LogitNormalTimesteps(n, m, s).probs(),
                               torch.tensor(expected, dtype=torch.float64), atol=1e-14, rtol=0)


def test_mode_probs_formula() -> None:
    c, n = 1.29, 40
    p = ModeTimesteps(n, c).probs()
    # t ascending is v ascending (u descending): the cumulative probs are v at the edges of the
    # u-intervals [(n-k-1)/n, (n-k)/n), and the map must send them back to those edges.
    v_edges = torch.cat([torch.zeros(1, dtype=torch.float64), p.cumsum(0)])
    u = 1 - v_edges - c * (torch.cos(math.pi * v_edges / 2) ** 2 - 1 + v_edges)
    torch.testing.assert_close(u, torch.arange(n, -1, -1, dtype=torch.float64) / n, atol=1e-12, rtol=0)
    # mode_scale 0 is u = 1 - v: uniform
    torch.testing.assert_close(ModeTimesteps(T, 0.0).probs(), torch.full((T,), 1 / T, dtype=torch.float64),
                               atol=1e-15, rtol=0)


def test_mode_scale_range_is_where_the_map_is_monotone() -> None:
    v = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    for c in (MODE_SCALE_MIN, 0.0, 1.29, MODE_SCALE_MAX):
        u = 1 - v - c * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        assert bool((u.diff() < 0).all()), c
    for c in (MODE_SCALE_MIN - 0.05, MODE_SCALE_MAX + 0.05):  # just outside: not monotone any more
        u = 1 - v - c * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        assert bool((u.diff() > 0).any()), c


@pytest.mark.parametrize(
    "scheme, kwargs, sampler",
    [
        ("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}, LogitNormalTimesteps(T)),
        ("logit_normal", {"logit_mean": -0.7, "logit_std": 1.6}, LogitNormalTimesteps(T, -0.7, 1.6)),
        ("mode", {"mode_scale": 1.29}, ModeTimesteps(T, 1.29)),
        ("mode", {"mode_scale": -0.8}, ModeTimesteps(T, -0.8)),
    ],
)
def test_diffusers_draws_fit_probs(scheme: str, kwargs: dict, sampler) -> None:
    draws = diffusers_timesteps(scheme, N_DRAWS, seed=1234, **kwargs)
    stat, crit = grouped_chi2(draws, sampler.probs())
    assert stat < crit, f"chi2 {stat:.1f} >= critical {crit:.1f}"
    # KS-style: the empirical CDF over t stays within the alpha = 1e-3 band of the exact one
    ecdf = torch.bincount(draws, minlength=T).cumsum(0).double() / N_DRAWS
    assert float((ecdf - sampler.probs().cumsum(0)).abs().max()) < 1.95 / math.sqrt(N_DRAWS)
    # with the same generator our sampler makes exactly diffusers' draws
    ours = sampler.sample(N_DRAWS, generator=torch.Generator().manual_seed(1234))
    assert ours.dtype == torch.long and torch.equal(ours, draws)


@pytest.mark.parametrize(
    "scheme, drawn, sampler",
    [
        ("logit_normal", {"logit_mean": 0.1, "logit_std": 1.0}, LogitNormalTimesteps(T)),
        ("mode", {"mode_scale": 1.1}, ModeTimesteps(T, 1.29)),
    ],
)
def test_goodness_of_fit_detects_a_wrong_distribution(scheme: str, drawn: dict, sampler) -> None:
    stat, crit = grouped_chi2(diffusers_timesteps(scheme, N_DRAWS, seed=99, **drawn), sampler.probs())
    assert stat > crit


def test_saturated_sigmoid_stays_in_range() -> None:
    # logit_std 50: sigmoid hits 1.0 in float32 about as often as it exceeds (T-1)/T in exact arithmetic
    s = LogitNormalTimesteps(T, 0.0, 50.0)
    t = s.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) >= 0 and int(t.max()) < T
    p = s.probs()
    for edge in (0, T - 1):
        assert float((t == edge).double().mean()) == pytest.approx(float(p[edge]), abs=0.015)


def test_sampling_reproducible_and_empty() -> None:
    for s in (LogitNormalTimesteps(T), ModeTimesteps(T)):
        a = s.sample(64, generator=torch.Generator().manual_seed(5))
        b = s.sample(64, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and a.device.type == "cpu"
        empty = s.sample(0)
        assert empty.shape == (0,) and empty.dtype == torch.long
        with pytest.raises(ValueError, match="number of timesteps"):
            s.sample(-1)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"logit_std": 0.0}, "timesteps.logit_std"),
        ({"logit_std": -1.0}, "timesteps.logit_std"),
        ({"logit_std": float("inf")}, "timesteps.logit_std"),
        ({"logit_mean": float("nan")}, "timesteps.logit_mean"),
        ({"logit_mean": "0"}, "timesteps.logit_mean"),
        ({"mode_scale": MODE_SCALE_MAX + 1e-3}, "timesteps.mode_scale"),
        ({"mode_scale": -1.01}, "timesteps.mode_scale"),
        ({"mode_scale": float("nan")}, "timesteps.mode_scale"),
    ],
)
@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "mode"])
def test_bad_parameters_name_the_config_field(kwargs: dict, field: str, kind: str) -> None:
    # validated whatever the sampler kind, like timestep_gamma
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_timestep_sampler(kind, T, **kwargs)


def test_sampler_classes_validate_too() -> None:
    with pytest.raises(ValueError, match="timesteps.logit_std"):
        LogitNormalTimesteps(T, logit_std=0.0)
    with pytest.raises(ValueError, match="timesteps.mode_scale"):
        ModeTimesteps(T, mode_scale=2.0)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        ModeTimesteps(0)


# --------------------------------------------------------------------------------------------------------
# reward scales


SIGMA_TABLES = {
    "shift1": flow_sigmas(T),
    "sd3": flow_sigmas(T, shift=3.0),
    "flux1024": flow_sigmas(T, mu=resolution_mu(image_seq_len(1024))),
}


def test_reward_scale_registry() -> None:
    assert REWARD_SCALES == ("constant", "inv_sqrt_snr", "sigma_sqrt", "cosmap")
    assert FLOW_ONLY_REWARD_SCALES == ("sigma_sqrt", "cosmap")


@pytest.mark.parametrize("table", SIGMA_TABLES, ids=str)
@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_sd3_weightings_match_diffusers(table: str, scheme: str) -> None:
    sigmas = SIGMA_TABLES[table]
    ours = reward_scale(scheme, sigmas=sigmas)
    assert ours.dtype == torch.float32 and ours.shape == (T,)
    expected = compute_loss_weighting_for_sd3(scheme, sigmas).float()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    # and on the scheduler's own float32 sigmas, as the training scripts pass them
    f32 = sigmas.float()
    torch.testing.assert_close(reward_scale(scheme, sigmas=f32), compute_loss_weighting_for_sd3(scheme, f32),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("table", SIGMA_TABLES, ids=str)
def test_flow_inv_sqrt_snr_written_out(table: str) -> None:
    sigmas = SIGMA_TABLES[table].tolist()
    # 1/sqrt(SNR) = s / (1 - s); s = 1 (SNR 0) takes the largest finite value of the others
    finite = [s / (1 - s) for s in sigmas if s < 1]
    r = [s / (1 - s) if s < 1 else max(finite) for s in sigmas]
    lo, hi = min(r), max(r)
    expected = torch.tensor([1 + (x - lo) / (hi - lo) for x in r], dtype=torch.float32)
    ours = reward_scale("inv_sqrt_snr", sigmas=SIGMA_TABLES[table])
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert float(ours[0]) == 1.0 and float(ours[-1]) == 2.0 and float(ours[-2]) == 2.0
    assert bool((ours.diff() >= 0).all())


def test_flow_constant_and_degenerate() -> None:
    assert torch.equal(reward_scale("constant", sigmas=SIGMA_TABLES["sd3"]), torch.ones(T))
    assert torch.equal(reward_scale("inv_sqrt_snr", sigmas=torch.ones(1, dtype=torch.float64)), torch.ones(1))
    assert torch.equal(reward_scale("inv_sqrt_snr", sigmas=torch.full((4,), 0.5)), torch.ones(4))


def test_reward_scale_argument_checks() -> None:
    abar = torch.linspace(0.99, 0.01, T)
    for kind in FLOW_ONLY_REWARD_SCALES:
        with pytest.raises(ValueError, match=r"timesteps\.reward_scale"):
            reward_scale(kind, abar)
    with pytest.raises(ValueError, match="exactly one"):
        reward_scale("constant")
    with pytest.raises(ValueError, match="exactly one"):
        reward_scale("constant", abar, sigmas=SIGMA_TABLES["sd3"])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        reward_scale("cosmap", sigmas=torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        reward_scale("sigma_sqrt", sigmas=torch.tensor([0.5, 1.5]))
    # the DDPM path is unchanged by the new keyword
    assert torch.equal(reward_scale("inv_sqrt_snr", abar), reward_scale("inv_sqrt_snr", alphas_cumprod=abar))


def test_builder_defaults_are_the_config_defaults() -> None:
    import inspect

    from diffalign.config.schema import TimestepConfig

    params = inspect.signature(build_timestep_sampler).parameters
    c = TimestepConfig()
    assert (params["logit_mean"].default, params["logit_std"].default, params["mode_scale"].default) == (
        c.logit_mean, c.logit_std, c.mode_scale)
    ln, mode = LogitNormalTimesteps(T), ModeTimesteps(T)
    assert (ln.logit_mean, ln.logit_std, mode.mode_scale) == (c.logit_mean, c.logit_std, c.mode_scale)
