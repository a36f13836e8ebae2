"""LoRA on the trained network (UNet or flow transformer, and optionally the UNet families' text
encoders) through peft, saved in diffusers format so that plain `pipe.load_lora_weights` reads it."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffalign.models.bundle import FLOW_FAMILIES, PIPELINES, ModelBundle

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# Default LoRA targets of each family's trained network, as diffusers' own DreamBooth LoRA scripts
# choose them (huggingface/diffusers examples/dreambooth/): train_dreambooth_lora_sd3.py (joint
# attention of every MMDiT block, image and context streams; SD3.5's second image-only attention
# `attn2` is not matched by "attn.*"), train_dreambooth_lora_flux.py (attention plus both feed-forwards
# of the double blocks; "attn.to_q/k/v" also match the single blocks' attention) and
# train_dreambooth_lora_qwen_image.py (to_q/k/v/out.0 of every block). peft matches a name when the
# module's path equals it or ends with "." + it.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "sd15": UNET_TARGETS,
    "sdxl": UNET_TARGETS,
    "sd3": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
            "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"),
    "flux": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
             "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    "qwenimage": ("to_k", "to_q", "to_v", "to_out.0"),
}


def lora_targets(family: str) -> tuple[str, ...]:
    """The module names LoRA adapts in `family`'s trained network (UNet or transformer)."""
    if family not in LORA_TARGETS:
        raise ValueError(f"model.family must be one of {tuple(LORA_TARGETS)}, got {family!r}")
    return LORA_TARGETS[family]


def add_lora(module: torch.nn.Module, rank: int, alpha: float | None = None,
             targets: tuple[str, ...] = UNET_TARGETS) -> None:
    """Adds a peft LoRA adapter; only the adapter weights stay trainable."""
    if rank < 1:
        raise ValueError(f"model.lora_rank must be >= 1, got {rank}")
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=list(targets))
    module.add_adapter(config)


def save_lora(bundle: ModelBundle, out_dir: str | Path, train_text_encoder: bool = False) -> Path:
    """Writes `pytorch_lora_weights.safetensors` that `pipe.load_lora_weights(out_dir)` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if train_text_encoder and bundle.family in FLOW_FAMILIES:
        raise ValueError(f"model.train_text_encoder is not supported for family {bundle.family!r}")
    pipe_cls = PIPELINES[bundle.family]
    # The adapter metadata carries lora_alpha: without it the loader assumes alpha = rank and a
    # LoRA trained with another alpha would load with the wrong scale.
    metadata = bundle.unet.peft_config["default"].to_dict()
    if bundle.family in FLOW_FAMILIES:
        # Transformer loaders take peft's own key names (diffusers' flow LoRA scripts save them as is).
        pipe_cls.save_lora_weights(str(out_dir),
                                   transformer_lora_layers=get_peft_model_state_dict(bundle.unet),
                                   transformer_lora_adapter_metadata=metadata)
        return out_dir
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(bundle.unet)),
              "unet_lora_adapter_metadata": metadata}
    if train_text_encoder:
        names = ["text_encoder", "text_encoder_2"]
        for name, enc in zip(names, bundle.text_encoders):
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(enc))
            layers[f"{name}_lora_adapter_metadata"] = enc.peft_config["default"].to_dict()
    pipe_cls.save_lora_weights(str(out_dir), **layers)
    return out_dir
