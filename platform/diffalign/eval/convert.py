"""Conversion of the released HPSv2 and ImageReward checkpoints into the folders their scorers load.

- HPSv2 (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``): an open_clip ViT-H-14 state dict, under
  ``"state_dict"`` in the release. It becomes a transformers ``CLIPModel`` folder (``config.json`` +
  ``model.safetensors``) that ``HPSv2.from_pretrained`` loads.
- ImageReward (``ImageReward.pt``): the state dict of ImageReward's model, its ``BLIP_Pretrain`` under
  ``blip.`` (BLIP ViT-L in the salesforce layout, BERT text encoder with cross-attention, the two
  contrastive projections) and its MLP head under ``mlp.``. It becomes a ``BlipForImageTextRetrieval``
  folder plus ``mlp.safetensors`` that ``ImageReward.from_pretrained`` loads.

Every key is accounted for: each source key is mapped or is a derived buffer named in ``DERIVED_KEYS``
(dropped); each key of the target model is produced or is named in ``FILLED_KEYS`` (ImageReward has no
ITM head; it is written as zeros, and the scorer never uses it). Anything else fails naming the keys,
so a checkpoint of another layout never loads partially. The attention head counts are not in the
weights; they default to the releases' (``HPSV2_HEADS``, ``IMAGEREWARD_HEADS``).

The mapping (open_clip -> CLIPModel), per tower (``visual.`` -> ``vision_model.``, text at the top level
-> ``text_model.``):

- ``transformer.resblocks.N.attn.in_proj_{weight,bias}`` (fused q|k|v rows, as ``nn.MultiheadAttention``
  stores them) -> ``encoder.layers.N.self_attn.{q,k,v}_proj.{weight,bias}`` (split in three along dim 0);
  ``attn.out_proj`` -> ``self_attn.out_proj``; ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``;
  ``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.fc1``/``mlp.fc2``.
- ``visual.conv1`` -> ``embeddings.patch_embedding``; ``visual.class_embedding`` /
  ``visual.positional_embedding`` -> ``embeddings.class_embedding`` / ``embeddings.position_embedding``;
  ``visual.ln_pre`` / ``visual.ln_post`` -> ``pre_layrnorm`` / ``post_layernorm``; ``visual.proj``
  (``x @ proj``) -> ``visual_projection.weight`` transposed.
- ``token_embedding`` / ``positional_embedding`` -> ``text_model.embeddings.token_embedding`` /
  ``position_embedding``; ``ln_final`` -> ``text_model.final_layer_norm``; ``text_projection``
  (``x @ proj``) -> ``text_projection.weight`` transposed; ``logit_scale`` as is.

The mapping (ImageReward / BLIP -> BlipForImageTextRetrieval):

- ``blip.visual_encoder.patch_embed.proj`` -> ``vision_model.embeddings.patch_embedding``; ``cls_token`` /
  ``pos_embed`` -> ``embeddings.class_embedding`` / ``position_embedding``; ``blocks.N.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}`` -> ``encoder.layers.N.{layer_norm1, self_attn.qkv,
  self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}`` (the fused qkv stays fused: both split it the same
  way); ``norm`` -> ``post_layernorm``.
- ``blip.text_encoder.*`` -> ``text_encoder.*`` (BLIP's ``med.py`` BERT and transformers' ``BlipTextModel``
  share parameter names); ``blip.vision_proj`` / ``blip.text_proj`` -> ``vision_proj`` / ``text_proj``.
- ``mlp.layers.{0,2,4,6,7}`` -> ``mlp.safetensors`` (``layers.*``).
"""


from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffalign.eval.convert_common import (  # noqa: F401 - the public names of the conversion
    DERIVED_KEYS,
    FILLED_KEYS,
    HPSV2_HEADS,
    IMAGEREWARD_HEADS,
    KINDS,
    RECORD_FILE,
    ConversionError,
    Converted,
    load_released_state_dict,
    unwrap_state_dict,
)
from diffalign.eval.convert_hpsv2 import convert_hpsv2_state_dict, hpsv2_config, map_open_clip  # noqa: F401
from diffalign.eval.convert_imagereward import (  # noqa: F401
    convert_imagereward_state_dict,
    imagereward_config,
    map_imagereward,
)
from diffalign.models.reward_heads import IMAGEREWARD_HEAD

# ---------------------------------------------------------------------------------------------------------
# Checking against the target model, writing the folder
# ---------------------------------------------------------------------------------------------------------


def _save_processor(kind: str, processor: str | os.PathLike[str], config: Any, out: Path) -> dict[str, Any]:
    """Copy the processor at ``processor`` into ``out``, its image size set to the model's (ImageReward
    runs BLIP at 224 px; transformers' BLIP processors default to 384)."""
    from transformers import BlipProcessor, CLIPProcessor

    cls: Callable[..., Any] = CLIPProcessor if kind == "hpsv2" else BlipProcessor
    proc = cls.from_pretrained(os.fspath(processor))
    size = int(config.vision_config.image_size)
    ip = proc.image_processor
    before = {"size": dict(ip.size), "crop_size": dict(getattr(ip, "crop_size", None) or {})}
    if kind == "hpsv2":
        ip.size = {"shortest_edge": size}
        ip.crop_size = {"height": size, "width": size}
        eos = proc.tokenizer.eos_token_id
        if eos != config.text_config.vocab_size - 1:
            # open_clip pools at the largest token id; the tokenizer's end-of-text token must be it.
            raise ConversionError(
                f"hpsv2: the processor's end-of-text id is {eos}, not the vocabulary's last "
                f"({config.text_config.vocab_size - 1}); it is not the model's tokenizer"
            )
    else:
        ip.size = {"height": size, "width": size}
    if len(proc.tokenizer) > config.text_config.vocab_size:
        raise ConversionError(
            f"{kind}: the processor's tokenizer has {len(proc.tokenizer)} tokens, the model "
            f"{config.text_config.vocab_size}"
        )
    proc.save_pretrained(out)
    return {"path": os.fspath(processor), "image_size": size, "before": before}


def save_converted(
    conv: Converted,
    out: str | os.PathLike[str],
    processor: str | os.PathLike[str] | None = None,
    source: str | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``mlp.safetensors``), the processor from
    ``processor`` and a ``conversion.json`` record (source, dropped and filled keys, heads)."""
    from safetensors.torch import save_file

    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    conv.config.save_pretrained(dest)
    save_file(conv.state_dict, str(dest / "model.safetensors"), metadata={"format": "pt"})
    if conv.head is not None:
        save_file(conv.head, str(dest / IMAGEREWARD_HEAD))
    proc_record = _save_processor(conv.kind, processor, conv.config, dest) if processor is not None else None
    record = {
        "kind": conv.kind,
        "source": source,
        "architecture": conv.config.architectures[0],
        "heads": [conv.config.vision_config.num_attention_heads, conv.config.text_config.num_attention_heads],
        "tensors": len(conv.state_dict),
        "dropped": conv.dropped,
        "filled": conv.filled,
        "processor": proc_record,
    }
    (dest / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return dest


def convert_checkpoint(
    kind: str,
    checkpoint: str | os.PathLike[str] | Mapping[str, Tensor],
    out: str | os.PathLike[str],
    processor: str | os.PathLike[str] | None = None,
    heads: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Convert a released ``kind`` checkpoint (a path or an already loaded state dict) into ``out``.

    ``processor``: a processor folder copied into ``out`` (HPSv2: a ``CLIPProcessor``, e.g. the
    CLIP-ViT-H-14-laion2B one, which the scorer falls back to without it; ImageReward: a ``BlipProcessor``
    with a bert-base-uncased tokenizer, which the scorer needs). ``dtype``: cast the weights (default: as
    released).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    if isinstance(checkpoint, Mapping):
        sd, source = unwrap_state_dict(checkpoint), None
    else:
        sd, source = load_released_state_dict(checkpoint), os.fspath(checkpoint)
    if kind == "hpsv2":
        conv = convert_hpsv2_state_dict(sd, heads or HPSV2_HEADS, dtype)
    else:
        conv = convert_imagereward_state_dict(sd, heads or IMAGEREWARD_HEADS, dtype)
    return save_converted(conv, out, processor=processor, source=source)
