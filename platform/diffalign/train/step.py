"""The one training step every objective, reference strategy and runtime shares.

For a batch of pairs:
1. one timestep and one noise per pair, shared by chosen and rejected;
2. one policy forward over [chosen; rejected] -> per-sample errors;
3. reference errors (no grad) when the objective needs them — colocated or from a Ray actor. They
   are requested before the policy forward and read after it (`reference.request_errors`): a
   reference in another process computes while the policy forward runs; a colocated one computes
   when read;
4. the objective in float32, with the per-sample reward scale lambda(t).
Backward and the optimizer live in the loop (plain, DDP or DeepSpeed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.models.bundle import ModelBundle
from diffalign.models.conditioning import Conditioning, PromptEncoder
from diffalign.models.denoiser import Denoiser
from diffalign.models.precision import autocast
from diffalign.objectives import Objective, ObjectiveOutput
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
    probe: dict                # chosen-latent probe for the reference drift estimate


class LatentEncoder:
    """Pixels -> scaled VAE latents (the step never sees pixels when latents are cached)."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.vae = bundle.vae
        cfg = self.vae.config
        self.scale = cfg.scaling_factor
        self.shift = getattr(cfg, "shift_factor", None) or 0.0

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.to(self.vae.device, dtype)).latent_dist
        return ((dist.mean - self.shift) * self.scale).float()


def make_batch(batch: dict, encoder: PromptEncoder, latent_encoder: LatentEncoder | None,
               device: torch.device | str) -> PairBatch:
    """A collated data batch (pixels or cached latents) -> PairBatch on `device`."""
    if "chosen_latents" in batch:
        chosen, rejected = batch["chosen_latents"], batch["rejected_latents"]
    else:
        if latent_encoder is None:
            raise ValueError("batch holds pixels but no VAE encoder was given")
        both = latent_encoder(torch.cat([batch["chosen"], batch["rejected"]]))
        chosen, rejected = both.chunk(2)
    cond = encoder(batch["prompts"], batch.get("original_sizes"), batch.get("crop_top_lefts"))
    return PairBatch(chosen.to(device), rejected.to(device), cond.to(device), list(batch["prompts"]))


class PreferenceStep:
    """Computes the loss of one micro-batch (see module docstring)."""

    def __init__(self, denoiser: Denoiser, objective: Objective, reference, sampler: TimestepSampler,
                 reward_scale: torch.Tensor, divergence_samples: int = 2,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.denoiser = denoiser
        self.objective = objective
        self.reference = reference
        self.sampler = sampler
        self.reward_scale = reward_scale.float()
        self.divergence_samples = divergence_samples
        self.autocast_dtype = autocast_dtype

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
        latents = torch.cat([batch.chosen, batch.rejected])
        t2 = timesteps.repeat(2)
        noisy, target = self.denoiser.noisy_and_target(latents, noise.repeat(2, 1, 1, 1), t2)
        cond2 = batch.cond.repeat(2)
        pending = None
        if self.objective.needs_reference:
            pending = self.reference.request_errors(noisy, t2, cond2, target)
        with self._autocast(device):
            err = self.denoiser.errors(unet, noisy, t2, cond2, target)
        err_w, err_l = err.float().chunk(2)
        ref_w = ref_l = None
        if pending is not None:
            with torch.no_grad(), self._autocast(device):
                ref = pending.result()
            ref_w, ref_l = ref.float().to(device).chunk(2)
        weight = self.reward_scale.to(device)[timesteps]
        out = self.objective(err_w, err_l, ref_w, ref_l, weight=weight)
        k = min(self.divergence_samples, batch.chosen.shape[0])
        bsz = batch.chosen.shape[0]
        probe = {
            "noisy": noisy[:k].detach(), "timesteps": t2[:k], "target": target[:k].detach(),
            "cond": cond2.index(slice(0, k)), "_bsz": bsz,
        }
        return StepResult(out.loss, out, timesteps, weight, probe)
