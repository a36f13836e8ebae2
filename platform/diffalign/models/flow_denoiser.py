"""Rectified-flow denoising behind the `Denoiser` contract (SD3 / SD3.5, FLUX.1, Qwen-Image).

Conventions of diffusers' `FlowMatchEulerDiscreteScheduler` and its flow pipelines:

    x_s = (1 - s) x0 + s eps,      target v = eps - x0,      model timestep = s * num_train_timesteps

(`scale_noise`; the SD3 pipeline passes s * 1000, the FLUX and Qwen-Image pipelines pass s and their
transformers scale it by 1000 inside). The training timestep stays an integer t in [0, T) as for the
UNets (larger t = more noise) and indexes a sigma table (`diffalign.timesteps.flow_sigmas`): the
scheduler's own sigmas with the family's shift, static (SD3: `shift`) or resolution-dependent
(FLUX / Qwen-Image: mu from the image sequence length, as their pipelines compute it). The per-sample
error is the velocity MSE over all non-batch dims, so every objective and reference strategy runs
unchanged.

FLUX and Qwen-Image transformers take 2x2-packed latents, (B, C, h, w) -> (B, h/2 * w/2, 4C), with
positional ids (FLUX) or image shapes (Qwen-Image): packing happens here, so the rest of the
platform only sees (B, C, h, w) latents. Guidance-distilled FLUX (FLUX.1-dev) gets its guidance
embedding: `model.flux_guidance`, 3.5 by default, as diffusers' FLUX training scripts.
"""

from __future__ import annotations

import torch

from diffalign.models.conditioning import Conditioning
from diffalign.models.denoiser import per_sample_mse

FLOW_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
                "QwenImageTransformer2DModel": "qwenimage"}
DEFAULT_FLUX_GUIDANCE = 3.5  # diffusers train_dreambooth_lora_flux.py --guidance_scale default


def flow_family_of(net: torch.nn.Module) -> str | None:
    """The flow family of a transformer module by its class (None for a UNet)."""
    return FLOW_CLASSES.get(type(net).__name__)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), the 2x2 patches of FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents` for (h, w) latents."""
    b, _, c4 = packed.shape
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def pipeline_latents(bundle, latents: torch.Tensor) -> torch.Tensor:
    """A pipeline's `output_type="latent"` result as (B, C, h, w) training latents: the FLUX and
    Qwen-Image pipelines return them packed (already normalised, as SD3's and the UNets' are)."""
    if bundle.family in ("flux", "qwenimage") and latents.dim() == 3:
        side = bundle.resolution // bundle.latent_scale
        return unpack_latents(latents, side, side)
    return latents


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """FLUX positional ids of the packed image tokens, (h/2 * w/2, 3): (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def transformer_forward(family: str, net, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                        guidance: float | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The velocity a flow transformer predicts for (B, C, h, w) latents at noise levels `sigma` (B,),
    called as the family's diffusers pipeline calls it. `dtype`: the transformer's parameter dtype."""
    dtype = dtype or next(net.parameters()).dtype
    x = noisy.to(dtype)
    c = cond.to(noisy.device, dtype)
    s = sigma.to(device=noisy.device, dtype=dtype)
    if family == "sd3":
        return net(hidden_states=x, encoder_hidden_states=c.prompt_embeds, pooled_projections=c.pooled_embeds,
                   timestep=s * 1000, return_dict=False)[0]
    b, _, h, w = x.shape
    packed = pack_latents(x)
    if family == "flux":
        g = None if guidance is None else torch.full((b,), float(guidance), device=x.device, dtype=dtype)
        out = net(hidden_states=packed, encoder_hidden_states=c.prompt_embeds,
                  pooled_projections=c.pooled_embeds, timestep=s, guidance=g,
                  img_ids=image_ids(h, w, x.device, dtype),
                  txt_ids=torch.zeros(c.prompt_embeds.shape[1], 3, device=x.device, dtype=dtype),
                  return_dict=False)[0]
    elif family == "qwenimage":
        out = net(hidden_states=packed, encoder_hidden_states=c.prompt_embeds,
                  encoder_hidden_states_mask=c.mask, timestep=s, img_shapes=[[(1, h // 2, w // 2)]] * b,
                  return_dict=False)[0]
    else:
        raise ValueError(f"not a flow family: {family!r}")
    return unpack_latents(out, h, w)


class FlowDenoiser:
    """Noising, velocity targets and errors of a rectified-flow model (module docstring)."""

    prediction_type = "flow"

    def __init__(self, family: str, scheduler, sigmas: torch.Tensor, guidance: float | None = None) -> None:
        self.family = family
        self.scheduler = scheduler  # its config.num_train_timesteps sizes the drift probe's draws
        if sigmas.dim() != 1 or not bool((sigmas[1:] >= sigmas[:-1]).all()):
            raise ValueError("flow sigmas must be a 1-D table ascending in the timestep index")
        self.sigmas = sigmas.to(torch.float32)
        self.guidance = guidance

    @classmethod
    def for_bundle(cls, bundle) -> FlowDenoiser:
        """The sigma table and guidance of a flow bundle: `bundle.extras` carries `flow_shift` and
        `flux_guidance` from the config (`build_bundle`)."""
        from diffalign.timesteps import flow_sigmas, image_seq_len, resolution_mu

        sch = bundle.noise_scheduler.config
        t = int(sch.num_train_timesteps)
        shift = bundle.extras.get("flow_shift")
        if shift is not None:
            sigmas = flow_sigmas(t, float(shift))
        elif sch.get("use_dynamic_shifting", False):
            mu = resolution_mu(image_seq_len(bundle.resolution, bundle.latent_scale),
                               sch.get("base_image_seq_len", 256), sch.get("max_image_seq_len", 4096),
                               sch.get("base_shift", 0.5), sch.get("max_shift", 1.15))
            sigmas = flow_sigmas(t, 1.0, mu=mu)
        else:
            sigmas = flow_sigmas(t, float(sch.get("shift", 1.0)))
        guidance = None
        if bundle.family == "flux" and bundle.unet.config.get("guidance_embeds", False):
            g = bundle.extras.get("flux_guidance")
            guidance = DEFAULT_FLUX_GUIDANCE if g is None else float(g)
        return cls(bundle.family, bundle.noise_scheduler, sigmas, guidance)

    @property
    def snr(self) -> torch.Tensor:
        """((1 - s) / s)^2 per timestep: the flow SNR (x0 weight over noise weight, squared)."""
        s = self.sigmas.double()
        return ((1 - s) / s) ** 2

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(timesteps.device)[timesteps.long()]

    def noisy_and_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigma(timesteps).to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
        return (1 - s) * latents + s * noise, noise - latents

    def predict(self, net, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return transformer_forward(self.family, net, noisy, self.sigma(timesteps), cond, self.guidance)

    def errors(self, net, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
               target: torch.Tensor) -> torch.Tensor:
        """Per-sample velocity errors of `net` (B,), float32."""
        return per_sample_mse(self.predict(net, noisy, timesteps, cond), target)
