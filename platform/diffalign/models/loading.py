"""Loading real SD1.5-style and SDXL-style models through diffusers `from_pretrained` (flow families:
`flow_loading`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    UNet2DConditionModel,
)
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from diffalign.models.bundle import FLOW_FAMILIES, PIPELINES, ModelBundle

# model_index.json `_class_name` of each flow family's pipeline (FLUX has a text_encoder_2 too).
_FLOW_BY_PIPELINE = {PIPELINES[f].__name__: f for f in FLOW_FAMILIES}


def detect_family(path: str) -> str:
    """The flow family named by the pipeline class; else sdxl when the pipeline has a second text
    encoder, else sd15."""
    index = Path(path) / "model_index.json"
    if index.exists():
        data = json.loads(index.read_text())
    else:
        from huggingface_hub import hf_hub_download

        data = json.loads(Path(hf_hub_download(path, "model_index.json")).read_text())
    if data.get("_class_name") in _FLOW_BY_PIPELINE:
        return _FLOW_BY_PIPELINE[data["_class_name"]]
    return "sdxl" if "text_encoder_2" in data else "sd15"


def load_bundle(
    path: str,
    family: str | None = None,
    resolution: int | None = None,
    revision: str | None = None,
    vae_path: str | None = None,
    frozen_dtype: torch.dtype = torch.float32,
    t5: bool = True,
) -> ModelBundle:
    """Loads the components of a diffusers pipeline folder or hub id.

    The UNet stays in float32 (the optimizer's master weights); VAE and text encoders, which are
    frozen, are cast to `frozen_dtype` to save memory. `vae_path` swaps in another VAE (SDXL's
    fp16-fix VAE, as the DPO scripts allow). Flow families load through `load_flow_bundle` (`t5=False`
    leaves SD3's T5 out).
    """
    # A hub id is "name" or "owner/name"; an absolute, relative-dotted or deeper path is a local folder.
    local = Path(path).is_absolute() or path.startswith(".") or path.count("/") > 1
    if not Path(path).exists() and (local or "/" not in path):
        raise FileNotFoundError(f"model.pretrained: {path!r} is neither a folder nor a hub id")
    family = family or detect_family(path)
    if family in FLOW_FAMILIES:
        from diffalign.models.flow_loading import load_flow_bundle

        if vae_path:
            raise ValueError(f"model.vae (a replacement VAE) is for sd15 / sdxl, not {family}")
        return load_flow_bundle(path, family, resolution=resolution, revision=revision,
                                frozen_dtype=frozen_dtype, t5=t5)
    kw = dict(revision=revision)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    vae = (
        AutoencoderKL.from_pretrained(vae_path)
        if vae_path
        else AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    )
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)]
    text_encoders: list[torch.nn.Module] = [
        CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
    ]
    if family == "sdxl":
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw))
        text_encoders.append(
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
        )
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    sample_scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    meta_file = Path(path) / "diffalign.json"
    default_res = json.loads(meta_file.read_text())["resolution"] if meta_file.exists() else None
    if resolution is None:
        resolution = default_res or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    vae.to(frozen_dtype)
    for enc in text_encoders:
        enc.to(frozen_dtype)
    bundle = ModelBundle(
        family=family, unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
        noise_scheduler=noise_scheduler, sample_scheduler=sample_scheduler, resolution=int(resolution),
    )
    bundle.freeze_frozen_parts()
    return bundle
