"""Loading rectified-flow models (SD3 / SD3.5, FLUX.1, Qwen-Image) through diffusers `from_pretrained`,
one pipeline subfolder at a time, into a `ModelBundle`."""

from __future__ import annotations

import json
from pathlib import Path

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
    CLIPTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2TokenizerFast,
    T5EncoderModel,
    T5TokenizerFast,
)

from diffalign.models.bundle import FLOW_FAMILIES, ModelBundle

_TRANSFORMERS = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel,
                 "qwenimage": QwenImageTransformer2DModel}
_VAES = {"sd3": AutoencoderKL, "flux": AutoencoderKL, "qwenimage": AutoencoderKLQwenImage}
# (encoder subfolder, class, tokenizer subfolder, class) in the bundle's order.
_TEXT = {
    "sd3": [("text_encoder", CLIPTextModelWithProjection, "tokenizer", CLIPTokenizer),
            ("text_encoder_2", CLIPTextModelWithProjection, "tokenizer_2", CLIPTokenizer),
            ("text_encoder_3", T5EncoderModel, "tokenizer_3", T5TokenizerFast)],
    "flux": [("text_encoder", CLIPTextModel, "tokenizer", CLIPTokenizer),
             ("text_encoder_2", T5EncoderModel, "tokenizer_2", T5TokenizerFast)],
    "qwenimage": [("text_encoder", Qwen2_5_VLForConditionalGeneration, "tokenizer", Qwen2TokenizerFast)],
}
# The pipelines' default_sample_size (in latents) when the transformer config has none (FLUX, Qwen-Image).
_DEFAULT_SAMPLE_SIZE = 128


def _is_local(path: str) -> bool:
    # As loading.load_bundle: an absolute, relative-dotted or deeper path, or an existing folder.
    return Path(path).exists() or Path(path).is_absolute() or path.startswith(".") or path.count("/") > 1


def _index(path: str, revision: str | None) -> dict:
    """model_index.json (used to tell a folder saved without SD3's T5 from one whose T5 is missing)."""
    local = Path(path) / "model_index.json"
    if local.exists():
        return json.loads(local.read_text())
    if _is_local(path):
        return {}
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(path, "model_index.json", revision=revision)).read_text())


def _load(cls: type, path: str, subfolder: str, component: str, **kw):
    """`cls.from_pretrained(path, subfolder=...)`; a missing subfolder is a FileNotFoundError naming it."""
    if _is_local(path) and not (Path(path) / subfolder).is_dir():
        raise FileNotFoundError(f"{component}: {path!r} has no {subfolder}/ folder")
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kw)
    except OSError as err:  # hub ids: the hub's "does not appear to have a file named ..."
        if _is_local(path):
            raise
        raise FileNotFoundError(f"{component}: cannot load {subfolder}/ of {path!r}: {err}") from err


def load_flow_bundle(
    path: str,
    family: str,
    resolution: int | None = None,
    revision: str | None = None,
    frozen_dtype: torch.dtype = torch.float32,
    t5: bool = True,
) -> ModelBundle:
    """Loads a flow model's pipeline folder or hub id into a bundle.

    The transformer stays float32 (the optimizer's master weights); the frozen VAE and text encoders
    are cast to `frozen_dtype`. `t5=False` loads SD3 / SD3.5 without text_encoder_3 / tokenizer_3 (the
    pipeline then feeds zeros in T5's place); a folder saved without them loads that way anyway.
    FLUX cannot drop its T5: it is the only source of its token states.
    """
    if family not in FLOW_FAMILIES:
        raise ValueError(f"model.family must be one of {FLOW_FAMILIES}, got {family!r}")
    if not t5 and family == "flux":
        raise ValueError("FLUX.1 needs its T5 encoder (text_encoder_2): t5=False is for sd3 only")
    if not Path(path).exists() and (_is_local(path) or "/" not in path):
        raise FileNotFoundError(f"model.pretrained: {path!r} is neither a folder nor a hub id")
    kw = dict(revision=revision)
    index = _index(path, revision)
    transformer = _load(_TRANSFORMERS[family], path, "transformer", f"{family} transformer",
                        torch_dtype=torch.float32, **kw)
    vae = _load(_VAES[family], path, "vae", f"{family} VAE", torch_dtype=frozen_dtype, **kw)
    text_encoders: list[torch.nn.Module] = []
    tokenizers: list = []
    for enc_dir, enc_cls, tok_dir, tok_cls in _TEXT[family]:
        saved_without = enc_dir in index and index[enc_dir][0] is None  # model_index: [null, null]
        if enc_dir == "text_encoder_3" and (not t5 or saved_without):
            continue
        # dtype at load, not .to() after: it keeps what the class wants kept in float32 (T5's `wo` in fp16).
        encoder = _load(enc_cls, path, enc_dir, f"{family} text encoder", dtype=frozen_dtype, **kw)
        text_encoders.append(encoder)
        tokenizers.append(_load(tok_cls, path, tok_dir, f"{family} tokenizer", **kw))
    noise_scheduler = _load(FlowMatchEulerDiscreteScheduler, path, "scheduler", f"{family} scheduler", **kw)
    sample_scheduler = FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
    meta_file = Path(path) / "diffalign.json"
    bundle = ModelBundle(
        family=family, unet=transformer, vae=vae, text_encoders=text_encoders,
        tokenizers=tokenizers, noise_scheduler=noise_scheduler, sample_scheduler=sample_scheduler,
        resolution=0,
    )
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if "max_sequence_length" in meta:  # the token budget it was saved with (tiny models keep it short)
        bundle.extras["max_sequence_length"] = int(meta["max_sequence_length"])
    if resolution is None:
        resolution = meta.get("resolution")
    if resolution is None:
        sample_size = transformer.config.get("sample_size") or _DEFAULT_SAMPLE_SIZE
        resolution = sample_size * bundle.latent_scale
    bundle.resolution = int(resolution)
    bundle.freeze_frozen_parts()
    return bundle
