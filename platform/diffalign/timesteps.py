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
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "REWARD_SCALES",
    "TIMESTEP_SAMPLERS",
    "SkewedTimesteps",
    "TimestepSampler",
    "UniformTimesteps",
    "build_timestep_sampler",
    "gather_reward_scale",
    "reward_scale",
]

TIMESTEP_SAMPLERS = ("uniform", "skewed")
REWARD_SCALES = ("constant", "inv_sqrt_snr")

# Kang et al.: gamma 0.9 per interval, 10 equal intervals (their timestep analysis).
DEFAULT_GAMMA = 0.9
DEFAULT_NUM_BINS = 10


def _check_num_train_timesteps(num_train_timesteps: int) -> int:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
        raise ValueError(f"num_train_timesteps must be an int, got {num_train_timesteps!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    return num_train_timesteps


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


def build_timestep_sampler(
    kind: str, num_train_timesteps: int = 1000, gamma: float | None = DEFAULT_GAMMA,
    num_bins: int = DEFAULT_NUM_BINS,
) -> TimestepSampler:
    """Build a sampler by ``kind`` ("uniform" or "skewed"); ``gamma`` and ``num_bins`` are for "skewed".

    ``gamma`` is validated whatever the kind (unless None), so a bad config value is caught early.
    """
    key = kind.strip().lower() if isinstance(kind, str) else kind
    if key not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampler {kind!r}; allowed: {', '.join(TIMESTEP_SAMPLERS)}")
    if gamma is not None:
        gamma = _check_gamma(gamma)
    if key == "uniform":
        return UniformTimesteps(num_train_timesteps)
    if gamma is None:
        raise ValueError("timestep_gamma is required for the 'skewed' timestep sampler")
    return SkewedTimesteps(num_train_timesteps, gamma=gamma, num_bins=num_bins)


def reward_scale(kind: str, alphas_cumprod: Tensor | Sequence[float]) -> Tensor:
    """lambda(t) for every timestep, ``(T,)`` float32.

    * ``"constant"``: ones.
    * ``"inv_sqrt_snr"``: 1 + minmax_t(1 / sqrt(SNR(t))), SNR = abar / (1 - abar), in [1, 2].

    ``alphas_cumprod`` is the scheduler's abar_t (e.g. ``DDPMScheduler.alphas_cumprod``), assumed
    decreasing in t. abar is clipped to [1e-12, 1] so a zero-terminal-SNR schedule stays finite
    (its last step then dominates the min-max range). A constant 1/sqrt(SNR) gives all ones.
    """
    key = kind.strip().lower() if isinstance(kind, str) else kind
    if key not in REWARD_SCALES:
        raise ValueError(f"unknown reward scale {kind!r}; allowed: {', '.join(REWARD_SCALES)}")
    abar = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64)
    if abar.dim() != 1 or abar.numel() < 1:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(abar.shape)}")
    if key == "constant":
        return torch.ones(abar.shape[0], dtype=torch.float32)
    abar = abar.clamp(1e-12, 1.0)
    inv_sqrt_snr = torch.sqrt((1.0 - abar) / abar)
    lo, hi = inv_sqrt_snr.min(), inv_sqrt_snr.max()
    if not hi > lo:
        return torch.ones(abar.shape[0], dtype=torch.float32)
    return (1.0 + (inv_sqrt_snr - lo) / (hi - lo)).to(torch.float32)


def gather_reward_scale(scale: Tensor, timesteps: Tensor) -> Tensor:
    """lambda at the given timesteps: ``scale[timesteps]`` as float32 on ``timesteps.device``."""
    if timesteps.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"timesteps must be an integer tensor, got {timesteps.dtype}")
    return scale.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
