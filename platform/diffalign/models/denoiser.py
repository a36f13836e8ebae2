"""Per-sample denoising errors: the only thing the objectives see of a model.

Hides the prediction type (epsilon or v) so every objective works on either.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from diffalign.models.conditioning import Conditioning


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE averaged over every non-batch dim, in float32 whatever the input dtype."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


class Denoiser:
    """Noising, targets and errors under one training noise schedule."""

    def __init__(self, noise_scheduler: DDPMScheduler) -> None:
        self.scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon, v_prediction)")

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(latents, noise, timesteps)

    @staticmethod
    def predict(unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype = next(unet.parameters()).dtype
        kw = cond.to(noisy.device, dtype).unet_kwargs()
        return unet(noisy.to(dtype), timesteps, **kw).sample

    def errors(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
               target: torch.Tensor) -> torch.Tensor:
        """Per-sample errors of `unet` (B,), float32."""
        return per_sample_mse(self.predict(unet, noisy, timesteps, cond), target)

