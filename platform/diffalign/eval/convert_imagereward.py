"""ImageReward: BLIP (salesforce layout) + MLP head -> ``BlipForImageTextRetrieval`` + ``mlp.safetensors``
(see `diffalign.eval.convert`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffalign.eval.convert_common import (
    BLIP_TEXT_LN_EPS,
    BLIP_VIT_LN_EPS,
    DERIVED_KEYS,
    IMAGEREWARD_HEADS,
    ConversionError,
    Converted,
    _grid,
    _heads,
    _num_layers,
    _shape,
    check_and_fill,
    filled_keys,
    unwrap_state_dict,
)
from diffalign.models.reward_heads import RewardMLP

# ---------------------------------------------------------------------------------------------------------
# ImageReward: BLIP (salesforce layout) + MLP head -> BlipForImageTextRetrieval + mlp.safetensors
# ---------------------------------------------------------------------------------------------------------

_VIT = "blip.visual_encoder."
_BLIP_BLOCK = re.compile(r"blip\.visual_encoder\.blocks\.(\d+)\.(.+)")
_BLIP_BLOCK_RENAMES = {
    f"{src}.{p}": f"{dst}.{p}"
    for src, dst in (
        ("norm1", "layer_norm1"),
        ("norm2", "layer_norm2"),
        ("attn.qkv", "self_attn.qkv"),
        ("attn.proj", "self_attn.projection"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
    )
    for p in ("weight", "bias")
}
_BLIP_TOP = {
    _VIT + "cls_token": "vision_model.embeddings.class_embedding",
    _VIT + "pos_embed": "vision_model.embeddings.position_embedding",
    _VIT + "patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    _VIT + "patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    _VIT + "norm.weight": "vision_model.post_layernorm.weight",
    _VIT + "norm.bias": "vision_model.post_layernorm.bias",
    "blip.vision_proj.weight": "vision_proj.weight",
    "blip.vision_proj.bias": "vision_proj.bias",
    "blip.text_proj.weight": "text_proj.weight",
    "blip.text_proj.bias": "text_proj.bias",
    # Not in ImageReward's BLIP_Pretrain, but taken if a checkpoint has one.
    "blip.itm_head.weight": "itm_head.weight",
    "blip.itm_head.bias": "itm_head.bias",
}
_HEAD_KEYS = tuple(f"mlp.layers.{i}.{p}" for i in RewardMLP.LINEAR_INDICES for p in ("weight", "bias"))


def imagereward_config(sd: Mapping[str, Tensor], heads: tuple[int, int] = IMAGEREWARD_HEADS) -> Any:
    """The ``BlipConfig`` of an ImageReward state dict, read from its shapes; ``heads`` = (vision, text).

    On the release: ViT-L/16 on 224 px (1024 wide, 24 layers, 16 heads), BERT-base text encoder (768
    wide, 12 layers, 12 heads, 512 positions, 30524 ids) cross-attending to the 1024-d image tokens, 256-d
    contrastive projections; LayerNorm eps 1e-6 (ViT) and 1e-12 (BERT), exact GELU, as in BLIP.
    """
    from transformers import BlipConfig

    k = "imagereward"
    v_width, channels, patch, _ = _shape(sd, _VIT + "patch_embed.proj.weight", k)
    grid = _grid(_shape(sd, _VIT + "pos_embed", k)[1] - 1, "imagereward vision")
    vocab, t_width = _shape(sd, "blip.text_encoder.embeddings.word_embeddings.weight", k)
    layer0 = "blip.text_encoder.encoder.layer.0."
    embed = _shape(sd, "blip.vision_proj.weight", k)[0]
    vision = dict(
        hidden_size=v_width,
        intermediate_size=_shape(sd, _VIT + "blocks.0.mlp.fc1.weight", k)[0],
        num_hidden_layers=_num_layers(sd, r"blip\.visual_encoder\.blocks\.(\d+)\.", k),
        num_attention_heads=_heads(v_width, heads[0], "imagereward vision"),
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
        projection_dim=embed,
        hidden_act="gelu",
        layer_norm_eps=BLIP_VIT_LN_EPS,
    )
    text = dict(
        vocab_size=vocab,
        hidden_size=t_width,
        encoder_hidden_size=_shape(sd, layer0 + "crossattention.self.key.weight", k)[1],
        intermediate_size=_shape(sd, layer0 + "intermediate.dense.weight", k)[0],
        num_hidden_layers=_num_layers(sd, r"blip\.text_encoder\.encoder\.layer\.(\d+)\.", k),
        num_attention_heads=_heads(t_width, heads[1], "imagereward text"),
        max_position_embeddings=_shape(sd, "blip.text_encoder.embeddings.position_embeddings.weight", k)[0],
        projection_dim=embed,
        hidden_act="gelu",
        layer_norm_eps=BLIP_TEXT_LN_EPS,
    )
    config = BlipConfig(
        text_config=text, vision_config=vision, projection_dim=embed, image_text_hidden_size=embed
    )
    config.architectures = ["BlipForImageTextRetrieval"]
    return config


def map_imagereward(
    sd: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Tensor], list[str]]:
    """Renamed BLIP tensors (target -> tensor), each target's source key, the MLP head (``layers.*``) and
    the dropped derived keys. Unknown source keys fail, named."""
    out: dict[str, Tensor] = {}
    src_of: dict[str, str] = {}
    head: dict[str, Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, t in sd.items():
        target: str | None = None
        if key in DERIVED_KEYS["imagereward"]:
            dropped.append(key)
            continue
        if key.startswith("mlp."):
            if key not in _HEAD_KEYS:
                unknown.append(key)
            else:
                head[key.removeprefix("mlp.")] = t
            continue
        m = _BLIP_BLOCK.fullmatch(key)
        if m:
            sub = _BLIP_BLOCK_RENAMES.get(m.group(2))
            target = f"vision_model.encoder.layers.{m.group(1)}.{sub}" if sub else None
        elif key in _BLIP_TOP:
            target = _BLIP_TOP[key]
        elif key.startswith("blip.text_encoder.embeddings.") or key.startswith("blip.text_encoder.encoder."):
            # Same names on both sides; a name the target lacks is reported by the key check.
            target = key.removeprefix("blip.")
        if target is None:
            unknown.append(key)
        else:
            out[target] = t
            src_of[target] = key
    if unknown:
        raise ConversionError(
            f"imagereward: {len(unknown)} checkpoint keys are not part of the ImageReward (BLIP + MLP) "
            f"layout: {sorted(unknown)[:20]}"
        )
    missing_head = [k for k in _HEAD_KEYS if k.removeprefix("mlp.") not in head]
    if missing_head:
        raise ConversionError(f"imagereward: the checkpoint lacks the MLP head keys {missing_head}")
    return out, src_of, head, dropped


def convert_imagereward_state_dict(
    sd: Mapping[str, Tensor], heads: tuple[int, int] = IMAGEREWARD_HEADS, dtype: torch.dtype | None = None
) -> Converted:
    """An ImageReward state dict as a ``BlipForImageTextRetrieval`` config + state dict and the MLP head;
    fails on any key or shape that does not fit."""
    from transformers import BlipForImageTextRetrieval

    sd = unwrap_state_dict(sd, "imagereward checkpoint")
    mapped, src_of, head, dropped = map_imagereward(sd)  # first: a foreign layout fails naming its keys
    config = imagereward_config(sd, heads)
    state = check_and_fill("imagereward", BlipForImageTextRetrieval, config, mapped, src_of, dtype)
    mlp = RewardMLP.from_state_dict(head)  # checks the head's shapes chain
    if mlp.input_size != config.text_config.hidden_size:
        raise ConversionError(
            f"imagereward: the MLP head takes {mlp.input_size}-d features, the text encoder is "
            f"{config.text_config.hidden_size}-d"
        )
    head = {k: v.detach().float().clone() for k, v in head.items()}
    return Converted("imagereward", config, state, head=head, dropped=dropped,
                     filled=filled_keys(state, src_of))


