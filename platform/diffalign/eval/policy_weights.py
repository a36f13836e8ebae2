"""Trained weights on top of the base model: which kind a path holds (a diffusers LoRA, a full UNet, or a
training run's output folder holding either) and turning the base pipeline into the policy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # diffusers takes seconds to import; resolve_weights needs none of it
    from diffusers import DiffusionPipeline

LORA_FILE = "pytorch_lora_weights.safetensors"


def resolve_weights(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """``("lora", folder)`` for a diffusers LoRA folder or file, ``("unet", folder)`` for a UNet folder.

    A training run's output folder (holding ``lora/`` or ``unet/``) is accepted too.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights {str(p)!r} do not exist")
    if p.is_file():
        if p.suffix == ".safetensors":
            return "lora", p
        raise ValueError(f"weights {str(p)!r}: a file must be a LoRA .safetensors")
    if (p / LORA_FILE).exists():
        return "lora", p
    config = p / "config.json"
    if config.exists() and "UNet" in json.loads(config.read_text()).get("_class_name", ""):
        return "unet", p
    for sub in ("unet", "lora"):
        if (p / sub).is_dir():
            return resolve_weights(p / sub)
    raise ValueError(
        f"weights {str(p)!r}: expected a diffusers LoRA folder ({LORA_FILE}), a UNet folder (config.json "
        "+ weights, as UNet2DConditionModel.save_pretrained writes) or a run folder holding lora/ or unet/"
    )


def apply_weights(pipe: DiffusionPipeline, weights: str | os.PathLike[str]) -> tuple[str, DiffusionPipeline]:
    """Turns the base pipeline ``pipe`` into the policy: loads LoRA weights into it, or swaps in a
    full UNet. Returns ``(kind, pipe)``.

    A LoRA is loaded in place (into the UNet and, when it carries text-encoder layers, the text
    encoders), so generate every baseline image first.
    """
    kind, path = resolve_weights(weights)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    if kind == "lora":
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        else:
            pipe.load_lora_weights(str(path))
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(str(path), torch_dtype=dtype)
        pipe.unet = unet.to(device).eval().requires_grad_(False)
    return kind, pipe
