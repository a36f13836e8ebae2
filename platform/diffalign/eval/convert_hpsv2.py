"""HPSv2: an open_clip ViT-H-14 state dict -> a transformers ``CLIPModel`` (see `diffalign.eval.convert`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffalign.eval.convert_common import (
    DERIVED_KEYS,
    HPSV2_HEADS,
    OPEN_CLIP_LN_EPS,
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

# ---------------------------------------------------------------------------------------------------------
# HPSv2: open_clip ViT-H-14 -> CLIPModel
# ---------------------------------------------------------------------------------------------------------

_OC_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_OC_BLOCK_RENAMES = {
    f"{src}.{p}": f"{dst}.{p}"
    for src, dst in (
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("attn.out_proj", "self_attn.out_proj"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
    )
    for p in ("weight", "bias")
}
# source -> (target, transpose): open_clip multiplies ``x @ proj``, nn.Linear computes ``x @ W.T``.
_OC_TOP: dict[str, tuple[str, bool]] = {
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", False),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", False),
    "ln_final.weight": ("text_model.final_layer_norm.weight", False),
    "ln_final.bias": ("text_model.final_layer_norm.bias", False),
    "text_projection": ("text_projection.weight", True),
    "logit_scale": ("logit_scale", False),
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", False),
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", False),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", False),
    "visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", False),
    "visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", False),
    "visual.ln_post.weight": ("vision_model.post_layernorm.weight", False),
    "visual.ln_post.bias": ("vision_model.post_layernorm.bias", False),
    "visual.proj": ("visual_projection.weight", True),
}


def hpsv2_config(sd: Mapping[str, Tensor], heads: tuple[int, int] = HPSV2_HEADS) -> Any:
    """The ``CLIPConfig`` of an open_clip state dict, read from its shapes; ``heads`` = (vision, text).

    On the HPSv2 release this is ViT-H-14: vision 1280 wide, 32 layers, 16 heads, 14 px patches on 224 px;
    text 1024 wide, 24 layers, 16 heads, 77 tokens, 49408 ids; 1024-d projections; exact GELU (open_clip
    ViT-H-14 has no QuickGELU). The end-of-text id is the vocabulary's last, as in CLIP: open_clip pools
    the text at the largest token id, and the converted model at the first end-of-text token.
    """
    from transformers import CLIPConfig

    k = "hpsv2"
    v_width, _, patch, _ = _shape(sd, "visual.conv1.weight", k)
    grid = _grid(_shape(sd, "visual.positional_embedding", k)[0] - 1, "hpsv2 vision")
    vocab, t_width = _shape(sd, "token_embedding.weight", k)
    proj = _shape(sd, "visual.proj", k)[1]
    vision = dict(
        hidden_size=v_width,
        intermediate_size=_shape(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight", k)[0],
        num_hidden_layers=_num_layers(sd, r"visual\.transformer\.resblocks\.(\d+)\.", k),
        num_attention_heads=_heads(v_width, heads[0], "hpsv2 vision"),
        image_size=grid * patch,
        patch_size=patch,
        num_channels=_shape(sd, "visual.conv1.weight", k)[1],
        projection_dim=proj,
        hidden_act="gelu",
        layer_norm_eps=OPEN_CLIP_LN_EPS,
    )
    text = dict(
        vocab_size=vocab,
        hidden_size=t_width,
        intermediate_size=_shape(sd, "transformer.resblocks.0.mlp.c_fc.weight", k)[0],
        num_hidden_layers=_num_layers(sd, r"transformer\.resblocks\.(\d+)\.", k),
        num_attention_heads=_heads(t_width, heads[1], "hpsv2 text"),
        max_position_embeddings=_shape(sd, "positional_embedding", k)[0],
        projection_dim=proj,
        hidden_act="gelu",
        layer_norm_eps=OPEN_CLIP_LN_EPS,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    ls = sd.get("logit_scale")
    # Shapes suffice for the config; a meta tensor (shape-only checks) has no value to read.
    scale = float(ls.float()) if ls is not None and ls.device.type != "meta" else 2.6592
    config = CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=proj, logit_scale_init_value=scale
    )
    config.architectures = ["CLIPModel"]
    return config


def _split_in_proj(t: Tensor, key: str) -> tuple[Tensor, Tensor, Tensor]:
    # nn.MultiheadAttention stacks the q, k and v projections row-wise: [W_q; W_k; W_v].
    if t.shape[0] % 3:
        raise ConversionError(f"hpsv2: {key!r} has {t.shape[0]} rows, not 3 x width")
    q, k, v = t.chunk(3, dim=0)
    return q, k, v


def map_open_clip(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Renamed tensors (target -> tensor), each target's source key, and the dropped derived keys.
    Unknown source keys fail, named."""
    out: dict[str, Tensor] = {}
    src_of: dict[str, str] = {}
    dropped: list[str] = []
    unknown: list[str] = []

    def put(target: str, t: Tensor, key: str) -> None:
        out[target] = t
        src_of[target] = key

    for key, t in sd.items():
        if key in DERIVED_KEYS["hpsv2"]:
            dropped.append(key)
            continue
        m = _OC_BLOCK.fullmatch(key)
        if m:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, sub = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
                suffix = "weight" if sub.endswith("weight") else "bias"
                for name, part in zip(("q", "k", "v"), _split_in_proj(t, key)):
                    put(f"{prefix}self_attn.{name}_proj.{suffix}", part, key)
            elif sub in _OC_BLOCK_RENAMES:
                put(prefix + _OC_BLOCK_RENAMES[sub], t, key)
            else:
                unknown.append(key)
        elif key in _OC_TOP:
            target, transpose = _OC_TOP[key]
            put(target, t.t() if transpose else t, key)
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"hpsv2: {len(unknown)} checkpoint keys are not part of the open_clip ViT-H-14 layout: "
            f"{sorted(unknown)[:20]}"
        )
    return out, src_of, dropped


def convert_hpsv2_state_dict(
    sd: Mapping[str, Tensor], heads: tuple[int, int] = HPSV2_HEADS, dtype: torch.dtype | None = None
) -> Converted:
    """An open_clip (HPSv2) state dict as a ``CLIPModel`` config + state dict; fails on any key or shape
    that does not fit."""
    from transformers import CLIPModel

    sd = unwrap_state_dict(sd, "hpsv2 checkpoint")
    mapped, src_of, dropped = map_open_clip(sd)  # first: a foreign layout fails naming its keys
    config = hpsv2_config(sd, heads)
    state = check_and_fill("hpsv2", CLIPModel, config, mapped, src_of, dtype)
    return Converted("hpsv2", config, state, dropped=dropped, filled=filled_keys(state, src_of))


