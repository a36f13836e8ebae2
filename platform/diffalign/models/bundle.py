"""The set of modules a text-to-image diffusion model is made of: an SD1.5 / SDXL UNet, or a
rectified-flow transformer (SD3 / SD3.5, FLUX.1, Qwen-Image).

`ModelBundle.unet` is the trained denoising network whatever its kind (a UNet2DConditionModel or a
flow transformer): every objective, reference strategy, checkpoint and weight sync only needs "the
trained module", so one name serves both and `bundle.pipeline()` puts it where the pipeline wants it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from diffalign.models.families import FAMILIES, FLOW_FAMILIES, FLOW_MAX_SEQUENCE_LENGTH, UNET_FAMILIES

__all__ = ["FAMILIES", "FLOW_FAMILIES", "PIPELINES", "UNET_FAMILIES", "ModelBundle"]
# The diffusers pipeline class of each family: what `pipeline()` builds and `save_lora` writes through.
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline, "qwenimage": QwenImagePipeline,
}


@dataclass
class ModelBundle:
    """The trained network (`unet`: UNet or flow transformer), frozen VAE and text encoders (in the
    pipeline's order: SD3 CLIP-L, CLIP-G and T5 unless left out; FLUX CLIP-L, T5; Qwen-Image its VL encoder),
    the training noise schedule (DDPMScheduler, or FlowMatchEulerDiscreteScheduler for flow) and the
    sampling scheduler."""

    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: object
    sample_scheduler: object
    resolution: int
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {FAMILIES}, got {self.family!r}")

    @property
    def is_flow(self) -> bool:
        return self.family in FLOW_FAMILIES

    @property
    def max_sequence_length(self) -> int | None:
        """T5 / VL text tokens of a flow family: `model.max_sequence_length`, else the bundle's own
        (tiny models keep it short), else the pipeline's default. None for the UNets."""
        if not self.is_flow:
            return None
        return int(self.extras.get("max_sequence_length") or FLOW_MAX_SEQUENCE_LENGTH[self.family])

    @property
    def latent_scale(self) -> int:
        if self.family == "qwenimage":  # AutoencoderKLQwenImage: 2^len(temperal_downsample) spatially
            return 2 ** len(self.vae.config.temperal_downsample)
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    def freeze_frozen_parts(self) -> None:
        """VAE and text encoders are never trained by the preference objectives."""
        for module in [self.vae, *self.text_encoders]:
            module.requires_grad_(False)
            module.eval()

    def pipeline(self, unet: torch.nn.Module | None = None) -> DiffusionPipeline:
        """A standard diffusers pipeline around these modules (optionally another trained network)."""
        unet = unet if unet is not None else self.unet
        if self.is_flow:
            pipe = self._flow_pipeline(unet)
            pipe.set_progress_bar_config(disable=True)
            # Sampling encodes prompts with the token budget training used (sampling.call_kwargs).
            pipe.diffalign_max_sequence_length = self.max_sequence_length
            return pipe
        common = dict(vae=self.vae, unet=unet, scheduler=self.sample_scheduler)
        if self.family == "sdxl":
            pipe = StableDiffusionXLPipeline(
                text_encoder=self.text_encoders[0],
                text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0],
                tokenizer_2=self.tokenizers[1],
                **common,
            )
        else:
            pipe = StableDiffusionPipeline(
                text_encoder=self.text_encoders[0],
                tokenizer=self.tokenizers[0],
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                **common,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _flow_pipeline(self, transformer: torch.nn.Module) -> DiffusionPipeline:
        # SD3 / SD3.5 run without T5 as diffusers allows (text_encoder_3=None: zeros in its place).
        enc, tok = self.text_encoders + [None], self.tokenizers + [None]
        common = dict(transformer=transformer, vae=self.vae, scheduler=self.sample_scheduler)
        if self.family == "sd3":
            return StableDiffusion3Pipeline(text_encoder=enc[0], tokenizer=tok[0], text_encoder_2=enc[1],
                                            tokenizer_2=tok[1], text_encoder_3=enc[2], tokenizer_3=tok[2],
                                            **common)
        if self.family == "flux":
            return FluxPipeline(text_encoder=enc[0], tokenizer=tok[0], text_encoder_2=enc[1],
                                tokenizer_2=tok[1], **common)
        return QwenImagePipeline(text_encoder=enc[0], tokenizer=tok[0], **common)

    def save_pretrained(self, path: str | Path) -> None:
        """Writes a diffusers pipeline folder that `DiffusionPipeline.from_pretrained` loads."""
        self.pipeline().save_pretrained(str(path))
        meta = {"family": self.family, "resolution": self.resolution}
        if "max_sequence_length" in self.extras:  # e.g. a tiny model's short token budget travels with it
            meta["max_sequence_length"] = self.extras["max_sequence_length"]
        (Path(path) / "diffalign.json").write_text(json.dumps(meta))
