"""Fixtures of the benchmarks: model configs, random models and inputs, a local Ray instance.

The benchmarks run as scripts (``python benchmarks/step_time.py ...``), so this module and its siblings
``variants`` (the step implementations) and ``measure`` (timing, memory, result files) are imported by
name from the scripts' own folder.

Models:
- ``tiny``: the tiny random SD1.5-style UNet of ``diffalign.models.tiny.diffusion`` (32 px images, 8x8
  latents).
- ``sd15`` / ``sdxl``: random-init UNets built from the real SD1.5 / SDXL UNet configs (no weights are
  downloaded); the text encoders and the VAE are replaced by random prompt embeddings of the right
  shapes, so only the training step is timed.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Real SD1.5 UNet config (runwayml/stable-diffusion-v1-5 unet/config.json), random init.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

# Real SDXL base UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), random init.
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
    norm_num_groups=32,
)

# Real SD1.5 / SDXL VAE config (the two share the architecture; only scaling_factor differs), random init.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)

# Conditioning shapes: (tokens, hidden size, pooled size or None).
TEXT_SHAPES = {"tiny": (16, 32, None), "sd15": (77, 768, None), "sdxl": (77, 2048, 1280)}
FAMILY = {"tiny": "sd15", "sd15": "sd15", "sdxl": "sdxl"}
PROMPTS = tuple(f"prompt {i}" for i in range(64))

# ----------------------------------------------------------------------------- models and inputs


def noise_scheduler() -> Any:
    """The SD1.5 / SDXL DDPM training scheduler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon")


def build_unet(model: str, device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """A random-init fp32 UNet of the given size, built directly on `device`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if model == "tiny":
        from diffalign.models.tiny.diffusion import build_tiny_bundle

        return build_tiny_bundle("sd15", seed=seed).unet.to(device)
    cfg = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}[model]
    with torch.device(device):
        return UNet2DConditionModel(**cfg)


def latent_shape(model: str) -> tuple[int, int, int]:
    size = {"tiny": 8, "sd15": 64, "sdxl": 128}[model]
    return (4, size, size)


def pixel_resolution(model: str) -> int:
    return latent_shape(model)[1] * (4 if model == "tiny" else 8)


class StaticPromptEncoder:
    """Stands in for the frozen text encoders: one fixed random embedding per prompt (CPU tensors)."""

    def __init__(self, model: str, prompts: tuple[str, ...] = PROMPTS, seed: int = 0) -> None:
        from diffalign.models.conditioning import Conditioning

        self._cls = Conditioning
        tokens, dim, pooled = TEXT_SHAPES[model]
        g = torch.Generator().manual_seed(seed + 17)
        self.res = pixel_resolution(model)
        self.embeds = {p: torch.randn(tokens, dim, generator=g) for p in prompts}
        self.pooled = {p: torch.randn(pooled, generator=g) for p in prompts} if pooled else None

    def __call__(self, prompts: list[str], original_sizes: Any = None, crop_top_lefts: Any = None) -> Any:
        embeds = torch.stack([self.embeds[p] for p in prompts])
        if self.pooled is None:
            return self._cls(embeds)
        pooled = torch.stack([self.pooled[p] for p in prompts])
        r = self.res
        time_ids = torch.tensor([[r, r, 0, 0, r, r]] * len(prompts), dtype=torch.float32)
        return self._cls(embeds, pooled, time_ids)


def pair_items(model: str, n: int, seed: int = 0) -> list[dict]:
    """Cached-latent pair items, as ``CachedPairs`` yields them (CPU tensors)."""
    g = torch.Generator().manual_seed(seed)
    shape = latent_shape(model)
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "chosen_latents": torch.randn(shape, generator=g),
             "rejected_latents": torch.randn(shape, generator=g)} for i in range(n)]


def compile_unet(unet: torch.nn.Module, how: str) -> None:
    """In-place torch.compile of the whole UNet or of each down / mid / up block."""
    if how == "none":
        return
    if how == "unet":
        unet.compile()
    elif how == "blocks":
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            block.compile()
    else:
        raise ValueError(f"compile must be none, unet or blocks, got {how!r}")


def ensure_ray(num_cpus: int | None = None) -> ModuleType:
    """A local Ray instance for the benchmarks (one intra-op thread per actor, small object store)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 8), include_dashboard=False,
                 log_to_driver=False, object_store_memory=256 * 2**20,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    return ray


def photo_like_jpeg(px: int, rng: Any) -> bytes:
    """A px x px JPEG that compresses like a photograph (smooth random texture + mild noise, quality
    90: about 70 KiB at 512 px), drawn from the numpy Generator `rng`."""
    import io

    import numpy as np
    from PIL import Image

    coarse = rng.integers(0, 256, (max(2, px // 16), max(2, px // 16), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((px, px), Image.Resampling.BICUBIC), np.int16)
    pixels = np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
