"""Tiny random SD1.5-style and SDXL-style pipelines, built offline from configs.

They are real diffusers modules (UNet2DConditionModel, AutoencoderKL, CLIP text encoders) with
a few thousand parameters, so every code path that runs on SD1.5 / SDXL runs on a laptop CPU.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffalign.models.bundle import FLOW_FAMILIES, ModelBundle
from diffalign.models.tiny.tokenizer import build_tiny_clip_tokenizer

TEXT_LEN = 16  # short prompts keep the tiny cross-attention cheap


def _schedulers() -> tuple[DDPMScheduler, DDIMScheduler]:
    kw = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, prediction_type="epsilon",
    )
    return DDPMScheduler(**kw), DDIMScheduler(**kw, set_alpha_to_one=False, steps_offset=1)


def _vae() -> AutoencoderKL:
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        # scaling_factor makes the scaled latents roughly unit-variance, which is what the SD constant
        # 0.18215 does for the real VAE. This random encoder's latents have std ~0.2-0.35; with SD's
        # constant they would have std ~0.05, i.e. every timestep but the first few would be almost
        # pure noise and the tiny model could barely learn anything about its images.
        scaling_factor=4.0,
    )
    # A trained VAE's posterior is narrow (LDM trains it with a KL weight of 1e-6); this untrained one
    # outputs log-variance ~0, a latent std ~4x the spread of its means, which would bury the images
    # in noise under data.latent_sampling=sample. Lower the log-variance channels (means unchanged).
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] -= 10.0
    return vae


def _text_config(vocab_size: int, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TEXT_LEN, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **kw,
    )


def build_tiny_bundle(family: str = "sd15", seed: int = 0, resolution: int = 32) -> ModelBundle:
    """A random tiny model of the given family ("sd15", "sdxl", or a flow family: "sd3", "flux",
    "qwenimage", built by `tiny.flow`); deterministic in `seed`."""
    if family in FLOW_FAMILIES:
        from diffalign.models.tiny.flow import build_tiny_flow_bundle

        return build_tiny_flow_bundle(family, seed=seed, resolution=resolution)
    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer(model_max_length=TEXT_LEN)
    vocab = len(tokenizer)
    unet_kw = dict(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if family == "sdxl":
        text_encoders = [
            CLIPTextModel(_text_config(vocab)),
            CLIPTextModelWithProjection(_text_config(vocab, projection_dim=32)),
        ]
        tokenizers = [tokenizer, build_tiny_clip_tokenizer(model_max_length=TEXT_LEN)]
        unet = UNet2DConditionModel(
            cross_attention_dim=64,  # penultimate states of both encoders, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            transformer_layers_per_block=1,
            **unet_kw,
        )
    elif family == "sd15":
        text_encoders = [CLIPTextModel(_text_config(vocab))]
        tokenizers = [tokenizer]
        unet = UNet2DConditionModel(cross_attention_dim=32, **unet_kw)
    else:
        raise ValueError(f"model.family must be 'sd15', 'sdxl' or one of {FLOW_FAMILIES}, got {family!r}")
    noise_scheduler, sample_scheduler = _schedulers()
    bundle = ModelBundle(
        family=family, unet=unet, vae=_vae(), text_encoders=text_encoders, tokenizers=tokenizers,
        noise_scheduler=noise_scheduler, sample_scheduler=sample_scheduler, resolution=resolution,
    )
    bundle.freeze_frozen_parts()
    return bundle
