"""Timestep samplers and timestep-dependent reward scales lambda(t).

Samplers draw one diffusion timestep ``t in [0, T)`` per pair (diffusers convention: larger t =
more noise; generation runs from t = T-1 down to 0).

* ``UniformTimesteps``: t ~ U{0, ..., T-1}, as in Diffusion-DPO, MaPO and xDPO.
* ``SkewedTimesteps``: the timestep-aware oversampling of Kang et al., "Rethinking Direct
  Preference Optimization in Diffusion Models" (AAAI 2026), Sec. "Timestep-aware optimization":
  t is drawn from the skewed categorical Cat(gamma^k), with probabilities gamma^k / sum_k' gamma^k',
  favouring the *early steps of generation*, i.e. high noise, large t.

  Reading used here: [0, T) is split into ``num_bins`` equal intervals (the paper analyses
  timesteps in 10 intervals), bin k = 0 is the noisiest one (the largest t) and bin k = num_bins-1
  contains t = 0; P(bin k) is proportional to gamma^k and t is uniform inside the bin. With
  ``num_bins = T`` every bin is a single timestep and this is Cat(gamma^k) per timestep literally,
  k = T-1-t being the index of t in generation order. (With T = 1000 and gamma = 0.9 per timestep,
  nearly all mass would sit on t > 950, hence the default of 10 bins.) gamma = 1 is uniform.

Reward scale (Kang et al., eq. 6 and Sec. "Timestep-aware optimization"): the DPO loss reads
``log sigma(beta T lambda(t) (r_t(x^w) - r_t(x^l)))``; instead of a constant lambda(t) they use

    lambda(t) = 1 + norm(1 / sqrt(SNR(t))),     SNR(t) = abar_t / (1 - abar_t),

with ``norm`` the min-max normalisation over t, so lambda is in [1, 2]: 1 at t = 0 (least noise),
2 at t = T-1 (most noise), increasing in t, i.e. decreasing over the generation order.

Rectified flow (SD3, FLUX.1, Qwen-Image)
----------------------------------------
Flow models noise as ``x_s = (1 - s) x0 + s eps`` (velocity target ``eps - x0``), with diffusers'
``FlowMatchEulerDiscreteScheduler`` conventions: the model is called with timestep ``s * T``. The
integer t drawn by the samplers keeps its meaning (larger t = more noise) and indexes the per-timestep
table ``flow_sigmas(T, ...)[t]``, the scheduler's ``sigmas`` in ascending order of noise:
``s_t = shift((t + 1) / T)``, so s = 1 (pure noise) at t = T-1 and s = shift(1/T) > 0 at t = 0.

How the pipelines shift the schedule, and so which table training uses:

* SD3 / SD3.5: a static shift (``shift=3.0`` in their scheduler config),
  ``s -> shift s / (1 + (shift - 1) s)``: ``flow_sigmas(T, shift=3.0)``.
* FLUX.1 / Qwen-Image: ``use_dynamic_shifting``; the pipeline computes
  ``mu = calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)``
  (those four read from the scheduler config) from the packed latent sequence length
  ``(resolution / vae_scale / 2)^2`` and samples at ``s -> e^mu / (e^mu + (1/s - 1))``:
  ``flow_sigmas(T, mu=resolution_mu(image_seq_len(resolution), ...))``. Their configured ``shift``
  is then ignored, as in the scheduler.

Training thus uses the sigmas the pipeline samples at the training resolution (all T of them, of
which inference visits a subset). ``shift_terminal`` (set in Qwen-Image's scheduler config) is not
applied: it is an inference-only stretch of the visited steps so that the last one ends at that
value, and depends on the number of inference steps, not on the noise level at a given t.

Flow samplers (Esser et al., "Scaling Rectified Flow Transformers", SD3; diffusers'
``compute_density_for_timestep_sampling``): u in [0, 1) is drawn, i = floor(u T) indexes the
scheduler's *descending* ``timesteps``, i.e. t = T-1-i, so u plays the role of the noise level:

* ``LogitNormalTimesteps``: u = sigmoid(N(logit_mean, logit_std)).
* ``ModeTimesteps``: u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1).

Uniform and skewed sampling apply to flow models unchanged. Flow reward scales (``sigmas=``):
``inv_sqrt_snr`` with the flow SNR ((1 - s) / s)^2, and SD3's loss weightings ``sigma_sqrt`` and
``cosmap`` (flow only).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "FLOW_ONLY_REWARD_SCALES",
    "REWARD_SCALES",
    "TIMESTEP_SAMPLERS",
    "LogitNormalTimesteps",
    "ModeTimesteps",
    "SkewedTimesteps",
    "TimestepSampler",
    "UniformTimesteps",
    "build_timestep_sampler",
    "flow_sigmas",
    "gather_reward_scale",
    "image_seq_len",
    "resolution_mu",
    "reward_scale",
]

TIMESTEP_SAMPLERS = ("uniform", "skewed", "logit_normal", "mode")
REWARD_SCALES = ("constant", "inv_sqrt_snr", "sigma_sqrt", "cosmap")
# SD3's loss weightings are functions of the flow sigma; they have no DDPM reading here.
FLOW_ONLY_REWARD_SCALES = ("sigma_sqrt", "cosmap")

# Kang et al.: gamma 0.9 per interval, 10 equal intervals (their timestep analysis).
DEFAULT_GAMMA = 0.9
DEFAULT_NUM_BINS = 10

# diffusers' SD3 / FLUX training-script defaults (--logit_mean, --logit_std, --mode_scale).
DEFAULT_LOGIT_MEAN = 0.0
DEFAULT_LOGIT_STD = 1.0
DEFAULT_MODE_SCALE = 1.29
# u(v) = 1 - v - c (cos^2(pi v / 2) - 1 + v) has u'(v) = -1 - c + c (pi / 2) sin(pi v): it is
# decreasing on [0, 1] (so a bijection onto [0, 1]) exactly for c in [-1, 1 / (pi / 2 - 1)].
MODE_SCALE_MIN = -1.0
MODE_SCALE_MAX = 1.0 / (math.pi / 2.0 - 1.0)


def _check_num_train_timesteps(num_train_timesteps: int) -> int:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
        raise ValueError(f"num_train_timesteps must be an int, got {num_train_timesteps!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    return num_train_timesteps


def _check_finite(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def flow_sigmas(num_train_timesteps: int = 1000, shift: float = 1.0, mu: float | None = None) -> Tensor:
    """Flow-matching noise level ``s_t`` of every integer timestep, ``(T,)`` float64 ascending in t.

    ``s_t = shift((t + 1) / T)``: with ``mu=None`` the static shift
    ``shift s / (1 + (shift - 1) s)`` (``FlowMatchEulerDiscreteScheduler(T, shift=shift).sigmas``,
    flipped); with ``mu`` the resolution-dependent exponential shift ``e^mu / (e^mu + (1/s - 1))``
    that the scheduler applies under ``use_dynamic_shifting`` (which ignores ``shift``, so passing
    both is an error). Computed in float64; the scheduler's float32 table agrees to float32 rounding.
    """
    t = _check_num_train_timesteps(num_train_timesteps)
    shift = _check_finite(shift, "shift")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    base = torch.arange(1, t + 1, dtype=torch.float64) / t
    if mu is None:
        return shift * base / (1.0 + (shift - 1.0) * base)
    mu = _check_finite(mu, "mu")
    if shift != 1.0:
        raise ValueError(
            f"pass either a static shift or a resolution mu, not both (shift={shift}, mu={mu}): "
            "the dynamically shifted schedule ignores shift"
        )
    e_mu = math.exp(mu)
    return e_mu / (e_mu + (1.0 / base - 1.0))


def resolution_mu(
    image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """diffusers' ``calculate_shift``: mu linear in the image sequence length.

    ``base_shift`` at ``base_seq_len`` and ``max_shift`` at ``max_seq_len`` (FLUX.1's defaults; the
    pipelines pass the scheduler config's ``base_image_seq_len``, ``max_image_seq_len``,
    ``base_shift``, ``max_shift``). Lengths outside the range extrapolate, as in diffusers.
    """
    if max_seq_len == base_seq_len:
        raise ValueError(f"max_seq_len must differ from base_seq_len, both are {base_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def image_seq_len(resolution: int, vae_scale: int = 8, patch: int = 2) -> int:
    """Packed latent tokens of a square ``resolution`` image, ``(resolution // (vae_scale * patch))^2``.

    As the FLUX.1 / Qwen-Image pipelines count them (``latents.shape[1]`` after packing 2x2 latent
    patches); like them, a resolution not divisible by ``vae_scale * patch`` is rounded down.
    """
    resolution = _check_positive_int(resolution, "resolution")
    vae_scale = _check_positive_int(vae_scale, "vae_scale")
    patch = _check_positive_int(patch, "patch")
    side = resolution // (vae_scale * patch)
    if side < 1:
        raise ValueError(f"resolution {resolution} is below one latent patch of {vae_scale * patch} pixels")
    return side * side


class TimestepSampler(ABC):
    """Draws training timesteps in ``[0, num_train_timesteps)``."""

    kind: str

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.num_train_timesteps = _check_num_train_timesteps(num_train_timesteps)

    @abstractmethod
    def probs(self) -> Tensor:
        """``(T,)`` float64 probabilities of each timestep; sums to 1."""

    @abstractmethod
    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """``n`` timesteps as a LongTensor on ``device``.

        Random numbers are drawn on the generator's device (CPU when no generator is given), so a
        seeded CPU generator gives the same timesteps whatever ``device`` is.
        """


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"number of timesteps to sample must be an int >= 0, got {n!r}")
    return n


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class UniformTimesteps(TimestepSampler):
    """t ~ U{0, ..., T-1}."""

    kind = "uniform"

    def probs(self) -> Tensor:
        t = self.num_train_timesteps
        return torch.full((t,), 1.0 / t, dtype=torch.float64)

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        draw = _draw_device(generator)
        t = torch.randint(0, self.num_train_timesteps, (_check_n(n),), generator=generator, device=draw)
        return t.to(device)

    def __repr__(self) -> str:
        return f"UniformTimesteps(num_train_timesteps={self.num_train_timesteps})"


class SkewedTimesteps(TimestepSampler):
    """Cat(gamma^k) over ``num_bins`` equal intervals of [0, T), k = 0 the noisiest; t uniform in a bin."""

    kind = "skewed"

    def __init__(self, num_train_timesteps: int = 1000, gamma: float = DEFAULT_GAMMA,
                 num_bins: int = DEFAULT_NUM_BINS) -> None:
        super().__init__(num_train_timesteps)
        self.gamma = _check_gamma(gamma)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int):
            raise ValueError(f"timestep_num_bins must be an int, got {num_bins!r}")
        if not 1 <= num_bins <= self.num_train_timesteps:
            raise ValueError(
                f"timestep_num_bins must be in [1, num_train_timesteps={self.num_train_timesteps}], "
                f"got {num_bins}"
            )
        self.num_bins = num_bins
        self._probs = self._build_probs()

    def bin_edges(self) -> Tensor:
        """``(num_bins + 1,)`` ascending integer edges; interval j is ``[edges[j], edges[j+1])``."""
        t, nb = self.num_train_timesteps, self.num_bins
        return torch.tensor([(j * t) // nb for j in range(nb + 1)], dtype=torch.long)

    def bin_probs(self) -> Tensor:
        """``(num_bins,)`` float64 P(bin k), k = 0 the noisiest bin (largest t): gamma^k / sum."""
        k = torch.arange(self.num_bins, dtype=torch.float64)
        return torch.softmax(k * math.log(self.gamma), dim=0)

    def bin_index(self, timesteps: Tensor) -> Tensor:
        """Bin k (0 = noisiest) of each timestep."""
        edges = self.bin_edges().to(timesteps.device)
        ascending = torch.bucketize(timesteps, edges[1:], right=True)  # 0 = lowest-t interval
        return self.num_bins - 1 - ascending

    def _build_probs(self) -> Tensor:
        edges = self.bin_edges()
        p_bin = self.bin_probs()
        probs = torch.empty(self.num_train_timesteps, dtype=torch.float64)
        for j in range(self.num_bins):
            lo, hi = int(edges[j]), int(edges[j + 1])
            probs[lo:hi] = p_bin[self.num_bins - 1 - j] / (hi - lo)
        return probs / probs.sum()

    def probs(self) -> Tensor:
        return self._probs.clone()

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        draw = _draw_device(generator)
        if _check_n(n) == 0:
            return torch.empty(0, dtype=torch.long, device=device)
        p = self._probs.to(draw)
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t.to(device)

    def __repr__(self) -> str:
        return (
            f"SkewedTimesteps(num_train_timesteps={self.num_train_timesteps}, gamma={self.gamma}, "
            f"num_bins={self.num_bins})"
        )


def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise ValueError(f"timestep_gamma must be a number in (0, 1], got {gamma!r}")
    gamma = float(gamma)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"timestep_gamma must be in (0, 1], got {gamma}")
    return gamma


def _check_logit_params(logit_mean: float, logit_std: float) -> tuple[float, float]:
    mean = _check_finite(logit_mean, "timesteps.logit_mean")
    std = _check_finite(logit_std, "timesteps.logit_std")
    if std <= 0:
        raise ValueError(f"timesteps.logit_std must be > 0, got {std}")
    return mean, std


def _check_mode_scale(mode_scale: float) -> float:
    scale = _check_finite(mode_scale, "timesteps.mode_scale")
    if not MODE_SCALE_MIN <= scale <= MODE_SCALE_MAX:
        raise ValueError(
            f"timesteps.mode_scale must be in [{MODE_SCALE_MIN}, {MODE_SCALE_MAX:.6f}] (where the mode "
            f"density's map is monotone), got {scale}"
        )
    return scale


def _u_to_timesteps(u: Tensor, num_train_timesteps: int) -> Tensor:
    """diffusers' ``indices = (u * T).long()`` into the descending ``timesteps``, as our ascending t.

    Clamped so that u = 1 (sigmoid saturating in float32, or v = 0 in the mode map) stays in range.
    """
    index = (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
    return num_train_timesteps - 1 - index


def _flip_to_t(p_index: Tensor) -> Tensor:
    """Probabilities over the descending index i as probabilities over t = T-1-i, renormalised."""
    p = p_index.flip(0).clamp_min(0.0)
    return p / p.sum()


class LogitNormalTimesteps(TimestepSampler):
    """SD3's logit-normal sampling: u = sigmoid(N(logit_mean, logit_std)), t = T-1-floor(u T)."""

    kind = "logit_normal"

    def __init__(self, num_train_timesteps: int = 1000, logit_mean: float = DEFAULT_LOGIT_MEAN,
                 logit_std: float = DEFAULT_LOGIT_STD) -> None:
        super().__init__(num_train_timesteps)
        self.logit_mean, self.logit_std = _check_logit_params(logit_mean, logit_std)
        # P(i / T <= u < (i + 1) / T) = Phi((logit((i+1)/T) - m) / s) - Phi((logit(i/T) - m) / s).
        edges = torch.arange(self.num_train_timesteps + 1, dtype=torch.float64) / self.num_train_timesteps
        cdf = torch.special.ndtr((torch.logit(edges) - self.logit_mean) / self.logit_std)
        self._probs = _flip_to_t(cdf[1:] - cdf[:-1])

    def probs(self) -> Tensor:
        return self._probs.clone()

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        # Same draws as diffusers' compute_density_for_timestep_sampling("logit_normal", ...).
        draw = _draw_device(generator)
        z = torch.normal(self.logit_mean, self.logit_std, size=(_check_n(n),), generator=generator,
                         device=draw, dtype=torch.float32)
        return _u_to_timesteps(torch.sigmoid(z), self.num_train_timesteps).to(device)

    def __repr__(self) -> str:
        return (
            f"LogitNormalTimesteps(num_train_timesteps={self.num_train_timesteps}, "
            f"logit_mean={self.logit_mean}, logit_std={self.logit_std})"
        )


def _mode_map(v: Tensor, mode_scale: float) -> Tensor:
    return 1.0 - v - mode_scale * (torch.cos(math.pi * v / 2.0) ** 2 - 1.0 + v)


def _mode_map_inverse(u: Tensor, mode_scale: float, iterations: int = 64) -> Tensor:
    """v with ``_mode_map(v) = u`` for u in [0, 1], by vectorised bisection (the map is decreasing)."""
    lo = torch.zeros_like(u)  # map(lo) >= u
    hi = torch.ones_like(u)  # map(hi) <= u
    for _ in range(iterations):  # 2^-64: below float64 resolution on [0, 1]
        mid = 0.5 * (lo + hi)
        above = _mode_map(mid, mode_scale) >= u
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


class ModeTimesteps(TimestepSampler):
    """SD3's mode sampling: u = 1 - v - c (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1), t = T-1-floor(u T)."""

    kind = "mode"

    def __init__(self, num_train_timesteps: int = 1000, mode_scale: float = DEFAULT_MODE_SCALE) -> None:
        super().__init__(num_train_timesteps)
        self.mode_scale = _check_mode_scale(mode_scale)
        # u(v) is decreasing with u(0) = 1, u(1) = 0: P(i/T <= u < (i+1)/T) = v(i/T) - v((i+1)/T).
        edges = torch.arange(self.num_train_timesteps + 1, dtype=torch.float64) / self.num_train_timesteps
        v = _mode_map_inverse(edges, self.mode_scale)
        v[0], v[-1] = 1.0, 0.0  # exact ends
        self._probs = _flip_to_t(v[:-1] - v[1:])

    def probs(self) -> Tensor:
        return self._probs.clone()

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        # Same draws as diffusers' compute_density_for_timestep_sampling("mode", ...).
        draw = _draw_device(generator)
        v = torch.rand((_check_n(n),), generator=generator, device=draw, dtype=torch.float32)
        return _u_to_timesteps(_mode_map(v, self.mode_scale), self.num_train_timesteps).to(device)

    def __repr__(self) -> str:
        return f"ModeTimesteps(num_train_timesteps={self.num_train_timesteps}, mode_scale={self.mode_scale})"


def build_timestep_sampler(
    kind: str, num_train_timesteps: int = 1000, gamma: float | None = DEFAULT_GAMMA,
    num_bins: int = DEFAULT_NUM_BINS, *, logit_mean: float = DEFAULT_LOGIT_MEAN,
    logit_std: float = DEFAULT_LOGIT_STD, mode_scale: float = DEFAULT_MODE_SCALE,
) -> TimestepSampler:
    """Build a sampler by ``kind`` (one of ``TIMESTEP_SAMPLERS``).

    ``gamma`` and ``num_bins`` are for "skewed", ``logit_mean`` and ``logit_std`` for
    "logit_normal", ``mode_scale`` for "mode". ``gamma`` (unless None), ``logit_mean``,
    ``logit_std`` and ``mode_scale`` are validated whatever the kind, so a bad config value is caught
    early.
    """
    key = kind.strip().lower() if isinstance(kind, str) else kind
    if key not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampler {kind!r}; allowed: {', '.join(TIMESTEP_SAMPLERS)}")
    if gamma is not None:
        gamma = _check_gamma(gamma)
    logit_mean, logit_std = _check_logit_params(logit_mean, logit_std)
    mode_scale = _check_mode_scale(mode_scale)
    if key == "uniform":
        return UniformTimesteps(num_train_timesteps)
    if key == "logit_normal":
        return LogitNormalTimesteps(num_train_timesteps, logit_mean=logit_mean, logit_std=logit_std)
    if key == "mode":
        return ModeTimesteps(num_train_timesteps, mode_scale=mode_scale)
    if gamma is None:
        raise ValueError("timestep_gamma is required for the 'skewed' timestep sampler")
    return SkewedTimesteps(num_train_timesteps, gamma=gamma, num_bins=num_bins)


def reward_scale(
    kind: str, alphas_cumprod: Tensor | Sequence[float] | None = None, *,
    sigmas: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """lambda(t) for every timestep, ``(T,)`` float32, from exactly one of ``alphas_cumprod`` or ``sigmas``.

    DDPM (``alphas_cumprod``, the scheduler's abar_t, e.g. ``DDPMScheduler.alphas_cumprod``, assumed
    decreasing in t):

    * ``"constant"``: ones.
    * ``"inv_sqrt_snr"``: 1 + minmax_t(1 / sqrt(SNR(t))), SNR = abar / (1 - abar), in [1, 2].
      abar is clipped to [1e-12, 1] so a zero-terminal-SNR schedule stays finite (its last step then
      dominates the min-max range). A constant 1/sqrt(SNR) gives all ones.

    Rectified flow (``sigmas``, a table from ``flow_sigmas``, in (0, 1], ascending in t):

    * ``"constant"``: ones.
    * ``"inv_sqrt_snr"``: the same lambda with the flow SNR ((1 - s) / s)^2, 1/sqrt(SNR) = s / (1 - s).
      The terminal s = 1 has SNR 0 (infinite 1/sqrt): it is clipped to the largest finite value of
      the other steps, so lambda is 2 there as on the step before.
    * ``"sigma_sqrt"``: s^-2 and ``"cosmap"``: 2 / (pi (1 - 2s + 2s^2)), diffusers'
      ``compute_loss_weighting_for_sd3``; unnormalised (sigma_sqrt is 1 at s = 1 and up to T^2 at the
      least noisy step), flow only: with ``alphas_cumprod`` they raise.
    """
    key = kind.strip().lower() if isinstance(kind, str) else kind
    if key not in REWARD_SCALES:
        raise ValueError(f"unknown reward scale {kind!r}; allowed: {', '.join(REWARD_SCALES)}")
    if (alphas_cumprod is None) == (sigmas is None):
        raise ValueError("reward_scale needs exactly one of alphas_cumprod (DDPM) or sigmas (flow)")
    if sigmas is not None:
        return _flow_reward_scale(key, sigmas)
    if key in FLOW_ONLY_REWARD_SCALES:
        raise ValueError(
            f"timesteps.reward_scale {key!r} is for flow-matching models only "
            f"({', '.join(FLOW_ONLY_REWARD_SCALES)}); this model has a DDPM schedule"
        )
    abar = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64)
    if abar.dim() != 1 or abar.numel() < 1:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(abar.shape)}")
    if key == "constant":
        return torch.ones(abar.shape[0], dtype=torch.float32)
    abar = abar.clamp(1e-12, 1.0)
    return _one_plus_minmax(torch.sqrt((1.0 - abar) / abar))


def _one_plus_minmax(values: Tensor) -> Tensor:
    lo, hi = values.min(), values.max()
    if not hi > lo:
        return torch.ones(values.shape[0], dtype=torch.float32)
    return (1.0 + (values - lo) / (hi - lo)).to(torch.float32)


def _flow_reward_scale(key: str, sigmas: Tensor | Sequence[float]) -> Tensor:
    s = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float64)
    if s.dim() != 1 or s.numel() < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(s.shape)}")
    if not bool(((s > 0) & (s <= 1)).all()):
        raise ValueError("flow sigmas must lie in (0, 1]")
    if key == "constant":
        return torch.ones(s.shape[0], dtype=torch.float32)
    if key == "sigma_sqrt":
        return (s**-2.0).to(torch.float32)
    if key == "cosmap":
        return (2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s**2))).to(torch.float32)
    finite = s < 1.0
    if not bool(finite.any()):
        return torch.ones(s.shape[0], dtype=torch.float32)
    ratio = torch.where(finite, s / (1.0 - s).clamp_min(1e-300), torch.zeros_like(s))
    ratio = torch.where(finite, ratio, ratio[finite].max())  # SNR 0 at s = 1: clip to the finite max
    return _one_plus_minmax(ratio)


def gather_reward_scale(scale: Tensor, timesteps: Tensor) -> Tensor:
    """lambda at the given timesteps: ``scale[timesteps]`` as float32 on ``timesteps.device``."""
    if timesteps.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"timesteps must be an integer tensor, got {timesteps.dtype}")
    return scale.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
