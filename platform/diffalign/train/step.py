"""The one training step every objective, reference strategy and runtime shares.

For a batch of pairs:
1. one timestep and one noise per pair, shared by chosen and rejected;
2. one policy forward over [chosen; rejected] -> per-sample errors (over the chosen images only
   when the objective does not use the rejected ones: `Objective.uses_rejected`, SFT by default);
3. reference errors (no grad) when the objective needs them — colocated or from a Ray actor. They
   are requested before the policy forward and read after it (`reference.request_errors`): a
   reference in another process computes while the policy forward runs; a colocated one computes
   when read;
4. the objective in float32, with the per-sample reward scale lambda(t).
Backward and the optimizer live in the loop (plain, DDP or DeepSpeed).

Latents: `data.latent_sampling=sample` (the default) trains on `latent_dist.sample()`, as diffusers'
Diffusion-DPO and the official MaPO scripts do; each image's draw is seeded by
`diffalign.data.transforms.latent_draws(seed, epoch, index)`, so a read is a function of the step
whether the latents are cached (`train.cache.CachedPairs`) or encoded here (`make_batch`), and
resuming stays exact. `mean` trains on `latent_dist.mean`. Held-out batches always use the mean.

Drift probe: for a reference that checks its drift (periodic_threshold) the step keeps the first
`divergence_samples` chosen latents it sees, across micro-batches, with their conditioning, and
returns them in every `StepResult.probe` once complete (None before); the reference fixes their
timesteps and noise (`diffalign.reference.divergence`). The probe uses none of the step's draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffalign.data.latent_cache import sample_latents, vae_moments
from diffalign.models.bundle import ModelBundle
from diffalign.models.conditioning import Conditioning, PromptEncoder
from diffalign.models.denoiser import Denoiser
from diffalign.models.precision import autocast
from diffalign.objectives import Objective, ObjectiveOutput
from diffalign.reference.divergence import cat_conditioning
from diffalign.reference.names import DEFAULT_DIVERGENCE_SAMPLES
from diffalign.timesteps import TimestepSampler


@dataclass
class PairBatch:
    """Latents of a batch of pairs, ready for the step."""

    chosen: torch.Tensor       # (B, C, h, w) scaled latents
    rejected: torch.Tensor
    cond: Conditioning         # (B, ...) one conditioning per pair
    prompts: list[str]


@dataclass
class StepResult:
    loss: torch.Tensor
    out: ObjectiveOutput
    timesteps: torch.Tensor    # (B,) per pair
    weight: torch.Tensor       # (B,) lambda(t)
    probe: dict | None         # {"latents", "cond"}: the drift probe set once complete (module doc)


class LatentEncoder:
    """Pixels -> scaled VAE latents (the step never sees pixels when latents are cached)."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.vae = bundle.vae

    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the normalised latent posterior, float32 (`data.latent_cache.vae_moments`)."""
        return vae_moments(self.vae, pixels)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """The posterior means, or with one seed per image a sample seeded by it."""
        mean, std = self.moments(pixels)
        return mean if seeds is None else sample_latents(mean, std, seeds)


def make_batch(batch: dict, encoder: PromptEncoder, latent_encoder: LatentEncoder | None,
               device: torch.device | str) -> PairBatch:
    """A collated data batch (pixels or cached latents) -> PairBatch on `device`. Pixels are encoded
    to the posterior mean, or sampled when the items carry `latent_seeds` (`train.cache.SampledPixels`)."""
    if "chosen_latents" in batch:
        chosen, rejected = batch["chosen_latents"], batch["rejected_latents"]
    else:
        if latent_encoder is None:
            raise ValueError("batch holds pixels but no VAE encoder was given")
        pairs = batch.get("latent_seeds")
        seeds = None if pairs is None else [s[0] for s in pairs] + [s[1] for s in pairs]
        both = latent_encoder(torch.cat([batch["chosen"], batch["rejected"]]), seeds)
        chosen, rejected = both.chunk(2)
    if "prompt_embeds" in batch and not getattr(encoder, "trainable", False):
        cond = encoder.conditioning(batch["prompt_embeds"], batch.get("pooled_embeds"),
                                    batch.get("original_sizes"), batch.get("crop_top_lefts"))
    else:
        cond = encoder(batch["prompts"], batch.get("original_sizes"), batch.get("crop_top_lefts"))
    return PairBatch(chosen.to(device), rejected.to(device), cond.to(device), list(batch["prompts"]))


class PreferenceStep:
    """Computes the loss of one micro-batch (see module docstring)."""

    def __init__(self, denoiser: Denoiser, objective: Objective, reference, sampler: TimestepSampler,
                 reward_scale: torch.Tensor, divergence_samples: int = DEFAULT_DIVERGENCE_SAMPLES,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.denoiser = denoiser
        self.objective = objective
        self.reference = reference
        self.sampler = sampler
        self.reward_scale = reward_scale.float()
        self.divergence_samples = divergence_samples
        self.autocast_dtype = autocast_dtype
        self._probe_parts: list[tuple[torch.Tensor, Conditioning]] = []
        self._probe: dict | None = None

    def _autocast(self, device: torch.device):
        return autocast(device, self.autocast_dtype)

    def noise_and_timesteps(self, batch: PairBatch, generator: torch.Generator | None):
        bsz = batch.chosen.shape[0]
        timesteps = self.sampler.sample(bsz, generator=generator).to(batch.chosen.device)
        noise = torch.randn(batch.chosen.shape, generator=generator).to(batch.chosen.device)
        return noise, timesteps

    def __call__(self, unet, batch: PairBatch, generator: torch.Generator | None = None) -> StepResult:
        noise, timesteps = self.noise_and_timesteps(batch, generator)
        return self.compute(unet, batch, noise, timesteps)

    def compute(self, unet, batch: PairBatch, noise: torch.Tensor, timesteps: torch.Tensor) -> StepResult:
        device = batch.chosen.device
        # An objective that ignores the rejected images (SFT without its diagnostic) gets the
        # chosen half only: half the forward it would otherwise pay for nothing.
        both = self.objective.uses_rejected or self.objective.needs_reference
        latents = torch.cat([batch.chosen, batch.rejected]) if both else batch.chosen
        n = 2 if both else 1
        t2 = timesteps.repeat(n)
        noisy, target = self.denoiser.noisy_and_target(latents, noise.repeat(n, 1, 1, 1), t2)
        cond2 = batch.cond.repeat(n)
        pending = None
        if self.objective.needs_reference:
            with torch.no_grad():  # also for a reference that computes when asked, not when read
                pending = self.reference.request_errors(noisy, t2, cond2, target)
        with self._autocast(device):
            err = self.denoiser.errors(unet, noisy, t2, cond2, target)
        err_w, err_l = err.float().chunk(2) if both else (err.float(), None)
        ref_w = ref_l = None
        if pending is not None:
            with torch.no_grad(), self._autocast(device):
                ref = pending.result()
            ref_w, ref_l = ref.float().to(device).chunk(2)
        weight = self.reward_scale.to(device)[timesteps]
        out = self.objective(err_w, err_l, ref_w, ref_l, weight=weight)
        return StepResult(out.loss, out, timesteps, weight, self.probe_set(batch))

    def probe_set(self, batch: PairBatch) -> dict | None:
        """Adds this batch's chosen latents to the probe set until it holds `divergence_samples`;
        returns the set once complete (None before, and when the reference checks no drift)."""
        if self._probe is not None or not getattr(self.reference, "needs_probe", False):
            return self._probe
        need = self.divergence_samples - sum(x.shape[0] for x, _ in self._probe_parts)
        k = min(need, batch.chosen.shape[0])
        # Copies: the set must not keep the whole batch alive.
        cond = batch.cond.index(slice(0, k))
        cond = Conditioning(**{name: v.detach().clone() for name, v in cond.tensors().items()})
        self._probe_parts.append((batch.chosen[:k].detach().clone(), cond))
        if k == need:
            self._probe = {"latents": torch.cat([x for x, _ in self._probe_parts]),
                           "cond": cat_conditioning([c for _, c in self._probe_parts])}
            self._probe_parts = []
        return self._probe
