"""Tiny random rectified-flow pipelines (SD3 / SD3.5, FLUX.1, Qwen-Image), built offline from configs.

Real diffusers / transformers modules at toy sizes: the family's transformer, a 16-channel VAE with the
real models' 8x downsampling, the family's text encoders and FlowMatchEulerDiscreteScheduler with the
real scheduler configs, so every flow code path runs on a CPU in seconds. Resolutions must be multiples
of 16: the VAE divides by 8 and each transformer then works on 2x2 latent patches (SD3's patch_size 2,
FLUX / Qwen-Image's 2x2 packing).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
)
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2_5_VLForConditionalGeneration,
    T5EncoderModel,
)

from diffalign.models.bundle import FLOW_FAMILIES, ModelBundle
from diffalign.models.tiny.text_encoders import (
    CLIP_HIDDEN,
    CLIP_LEN,
    QWEN_HIDDEN,
    T5_DIM,
    T5_LEN,
    build_tiny_qwen_tokenizer,
    build_tiny_t5_tokenizer,
    clip_config,
    qwen_vl_config,
    t5_config,
)
from diffalign.models.tiny.tokenizer import build_tiny_clip_tokenizer

LATENT_CHANNELS = 16
MAX_SEQUENCE_LENGTH = T5_LEN  # T5 / VL prompt tokens (the pipelines' 256-512 would dwarf 4 image tokens)
CLIP_PROJ = 32

# The released models' scheduler_config.json values.
SCHEDULER_CONFIGS: dict[str, dict] = {
    "sd3": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
    "flux": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                 max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    "qwenimage": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                      time_shift_type="exponential"),
}

# The random VAEs' latent means have std ~0.2 (AutoencoderKL) and ~0.135 (Qwen), mean ~0 (seed-independent
# to ~10%: seeds 0-4, uniform-noise and smooth images). These constants make the scaled latents ~unit
# variance, which is what the real ones (SD3 1.5305 / 0.0609, FLUX 0.3611 / 0.1159) do for the trained
# VAEs; with those, these latents would have std 0.07-0.3 and most noise levels would be almost pure noise.
_KL_SCALING, _KL_SHIFT = 5.0, 0.0
_QWEN_MEAN, _QWEN_STD = 0.0, 0.135


def _kl_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),  # 4 levels, 3 downsamplings: the real 8x
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=True,  # the real SD3 / FLUX VAEs have none; kept so the log-variance can be lowered
        use_post_quant_conv=True,
    )
    # A trained VAE's posterior is narrow; this random one's log-variance ~0 would bury the latent means
    # in sampling noise (see tiny/diffusion.py). Lower the log-variance channels, means unchanged.
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:] -= 10.0
    return vae


def _qwen_vae() -> AutoencoderKLQwenImage:
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],  # 3 entries: 8x spatial, as the real one
        latents_mean=[_QWEN_MEAN] * LATENT_CHANNELS, latents_std=[_QWEN_STD] * LATENT_CHANNELS,
    )
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:] -= 10.0
    return vae


def _sd3(resolution: int, t5: bool) -> tuple[torch.nn.Module, list, list]:
    vocab = len(build_tiny_clip_tokenizer())
    # SD3's CLIP-L and CLIP-G both pool through a projection; their states are concatenated (64 wide) and
    # zero-padded to T5's width, so joint_attention_dim = T5_DIM >= 2 * CLIP_HIDDEN.
    encoders: list = [CLIPTextModelWithProjection(clip_config(vocab, projection_dim=CLIP_PROJ)),
                      CLIPTextModelWithProjection(clip_config(vocab, projection_dim=CLIP_PROJ))]
    tokenizers: list = [build_tiny_clip_tokenizer(CLIP_LEN), build_tiny_clip_tokenizer(CLIP_LEN)]
    t5_tok = build_tiny_t5_tokenizer()
    t5_enc = T5EncoderModel(t5_config(len(t5_tok)))  # built even when dropped: same RNG stream either way
    if t5:
        encoders.append(t5_enc)
        tokenizers.append(t5_tok)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 8, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_DIM,
        caption_projection_dim=32, pooled_projection_dim=2 * CLIP_PROJ, pos_embed_max_size=16,
        # SD3.5's layout (qk RMSNorm, one dual-attention block) so its extra modules are covered too.
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    return transformer, encoders, tokenizers


def _flux() -> tuple[torch.nn.Module, list, list]:
    clip_tok, t5_tok = build_tiny_clip_tokenizer(CLIP_LEN), build_tiny_t5_tokenizer()
    encoders = [CLIPTextModel(clip_config(len(clip_tok))), T5EncoderModel(t5_config(len(t5_tok)))]
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
        pooled_projection_dim=CLIP_HIDDEN, axes_dims_rope=(4, 6, 6),  # sums to the head dim, as (16, 56, 56)
        guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
    )
    return transformer, encoders, [clip_tok, t5_tok]


def _qwenimage() -> tuple[torch.nn.Module, list, list]:
    tok = build_tiny_qwen_tokenizer()
    encoder = Qwen2_5_VLForConditionalGeneration(qwen_vl_config(tok))
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=QWEN_HIDDEN,
        axes_dims_rope=(4, 6, 6),
    )
    return transformer, [encoder], [tok]


def flow_schedulers(family: str) -> tuple[FlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler]:
    """(noise_scheduler, sample_scheduler) of a flow family: two FlowMatchEulerDiscreteScheduler with the
    released model's config (separate objects: sampling sets timesteps on its own)."""
    cfg = SCHEDULER_CONFIGS[family]
    return FlowMatchEulerDiscreteScheduler(**cfg), FlowMatchEulerDiscreteScheduler(**cfg)


def build_tiny_flow_bundle(family: str, seed: int = 0, resolution: int = 32, t5: bool = True) -> ModelBundle:
    """A random tiny model of a flow family ("sd3", "flux" or "qwenimage"); deterministic in `seed`.
    `t5=False` leaves SD3's T5 encoder out (FLUX needs its T5; Qwen-Image has none)."""
    if family not in FLOW_FAMILIES:
        raise ValueError(f"model.family must be one of {FLOW_FAMILIES}, got {family!r}")
    if resolution % 16:
        raise ValueError(f"model.resolution must be a multiple of 16 for {family} (8x VAE, 2x2 patches), "
                         f"got {resolution}")
    with torch.random.fork_rng(devices=[]):  # deterministic in `seed`, caller's stream untouched
        torch.manual_seed(seed)
        if family == "sd3":
            transformer, encoders, tokenizers = _sd3(resolution, t5)
            vae = _kl_vae(_KL_SCALING, _KL_SHIFT)
        elif family == "flux":
            transformer, encoders, tokenizers = _flux()
            vae = _kl_vae(_KL_SCALING, _KL_SHIFT)
        else:
            transformer, encoders, tokenizers = _qwenimage()
            vae = _qwen_vae()
    noise_scheduler, sample_scheduler = flow_schedulers(family)
    bundle = ModelBundle(
        family=family, unet=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
        noise_scheduler=noise_scheduler, sample_scheduler=sample_scheduler, resolution=resolution,
        extras={"max_sequence_length": MAX_SEQUENCE_LENGTH},
    )
    bundle.freeze_frozen_parts()
    return bundle
