"""Trained weights on top of the base model: which kind a path holds (a diffusers LoRA, a full UNet or flow
transformer, or a training run's output folder holding one) and turning the base pipeline into the policy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # diffusers takes seconds to import; resolve_weights needs none of it
    from diffusers import DiffusionPipeline

LORA_FILE = "pytorch_lora_weights.safetensors"
# The flow transformers a full fine-tune saves (diffalign.models.flow_denoiser.FLOW_CLASSES).
TRANSFORMER_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel", "QwenImageTransformer2DModel")


def resolve_weights(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """``("lora", folder)`` for a diffusers LoRA folder or file, ``("unet", folder)`` for a UNet folder,
    ``("transformer", folder)`` for a flow transformer folder.

    A training run's output folder (holding ``lora/``, ``unet/`` or ``transformer/``) is accepted too.
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
    name = json.loads(config.read_text()).get("_class_name", "") if config.exists() else ""
    if "UNet" in name:
        return "unet", p
    if name in TRANSFORMER_CLASSES:
        return "transformer", p
    for sub in ("unet", "transformer", "lora"):
        if (p / sub).is_dir():
            return resolve_weights(p / sub)
    raise ValueError(
        f"weights {str(p)!r}: expected a diffusers LoRA folder ({LORA_FILE}), a UNet or flow transformer "
        "folder (config.json + weights, as save_pretrained writes) or a run folder holding lora/, unet/ or "
        "transformer/"
    )


def apply_weights(pipe: DiffusionPipeline, weights: str | os.PathLike[str]) -> tuple[str, DiffusionPipeline]:
    """Turns the base pipeline ``pipe`` into the policy: loads LoRA weights into it, or swaps in a
    full UNet or transformer. Returns ``(kind, pipe)``.

    A LoRA is loaded in place (into the UNet and, when it carries text-encoder layers, the text
    encoders), so generate every baseline image first.
    """
    kind, path = resolve_weights(weights)
    net = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    device, dtype = net.device, net.dtype
    if kind == "lora":
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        else:
            pipe.load_lora_weights(str(path))
    elif kind == "transformer":
        import diffusers

        cls = getattr(diffusers, json.loads((path / "config.json").read_text())["_class_name"])
        net = cls.from_pretrained(str(path), torch_dtype=dtype)
        pipe.transformer = net.to(device).eval().requires_grad_(False)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(str(path), torch_dtype=dtype)
        pipe.unet = unet.to(device).eval().requires_grad_(False)
    return kind, pipe
