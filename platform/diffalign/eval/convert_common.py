"""Shared parts of the scorer-checkpoint conversions (`diffalign.eval.convert`): the kinds and their
head counts, the key bookkeeping, loading a released file, and shape helpers."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

KINDS = ("hpsv2", "imagereward")
# (vision heads, text heads): open_clip ViT-H-14 (head width 80 / 64) and ImageReward's BLIP
# (ViT-L 16 heads, BERT-base 12 heads).
HPSV2_HEADS = (16, 16)
IMAGEREWARD_HEADS = (16, 12)
# open_clip's LayerNorm is torch's default; BLIP's ViT uses eps=1e-6 and its BERT (med_config.json) 1e-12.
OPEN_CLIP_LN_EPS = 1e-5
BLIP_VIT_LN_EPS = 1e-6
BLIP_TEXT_LN_EPS = 1e-12
# Buffers some releases carry that the target model recomputes (causal mask, position ids).
DERIVED_KEYS = {
    "hpsv2": ("attn_mask",),
    "imagereward": ("blip.text_encoder.embeddings.position_ids",),
}
# Target keys the release does not have: ImageReward's BLIP_Pretrain has no image-text-matching head.
FILLED_KEYS = {"hpsv2": (), "imagereward": ("itm_head.weight", "itm_head.bias")}
RECORD_FILE = "conversion.json"


class ConversionError(ValueError):
    """A checkpoint that does not have the released layout (keys or shapes named in the message)."""


@dataclass
class Converted:
    """A converted checkpoint: the target config and state dict, the MLP head (ImageReward), and which
    keys were dropped (derived buffers) or filled (absent from the release)."""

    kind: str
    config: Any
    state_dict: dict[str, Tensor]
    head: dict[str, Tensor] | None = None
    dropped: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Reading a release
# ---------------------------------------------------------------------------------------------------------


def load_released_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of a released ``.pt``: unwrapped from ``{"state_dict": ...}`` and a DDP ``module.``
    prefix. Read with ``weights_only`` (no pickled code runs) and memory-mapped where the file allows."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"checkpoint {p!r} does not exist")
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files in torch's legacy (non-zip) format cannot be memory-mapped.
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(f"{p!r} holds more than tensors (weights_only load refused it): {e}") from e
    return unwrap_state_dict(obj, p)


def unwrap_state_dict(obj: Any, what: str = "checkpoint") -> dict[str, Tensor]:
    """``obj`` or its ``"state_dict"`` entry, with a ``module.`` prefix on every key removed."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{what} does not hold a state dict")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if bad:
        raise ConversionError(f"{what}: entries that are not tensors: {bad[:10]}")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _shape(sd: Mapping[str, Tensor], key: str, kind: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"{kind}: the checkpoint lacks {key!r}, so it is not the released layout")
    return tuple(sd[key].shape)


def _num_layers(sd: Mapping[str, Tensor], pattern: str, kind: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    if not idx:
        raise ConversionError(f"{kind}: no keys match {pattern!r}, so it is not the released layout")
    return max(idx) + 1  # a gap shows up as missing target keys, named by the key check


def _heads(width: int, heads: int, what: str) -> int:
    if heads < 1 or width % heads:
        raise ConversionError(f"{what}: width {width} is not divisible by {heads} attention heads")
    return heads


def _grid(num_positions: int, what: str) -> int:
    side = round(num_positions**0.5)
    if side * side != num_positions:
        raise ConversionError(f"{what}: {num_positions} patch positions are not a square grid")
    return side


def filled_keys(state: Mapping[str, Tensor], src_of: Mapping[str, str]) -> list[str]:
    return sorted(k for k in state if k not in src_of)


def check_and_fill(
    kind: str,
    model_cls: Any,
    config: Any,
    mapped: dict[str, Tensor],
    src_of: Mapping[str, str],
    dtype: torch.dtype | None,
) -> dict[str, Tensor]:
    """``mapped`` checked key by key and shape by shape against ``model_cls(config)`` (built on the meta
    device: no memory, no init); the allowed absent keys (``FILLED_KEYS``) become zeros."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra = sorted(src_of[k] for k in mapped if k not in expected)
    if extra:
        raise ConversionError(f"{kind}: checkpoint keys with no place in {model_cls.__name__}: {extra[:20]}")
    wrong = [
        f"{src_of[k]} {tuple(t.shape)} -> {k} {expected[k]}"
        for k, t in mapped.items()
        if tuple(t.shape) != expected[k]
    ]
    if wrong:
        raise ConversionError(f"{kind}: shapes that do not fit {model_cls.__name__}: {wrong[:20]}")
    missing = sorted(k for k in expected if k not in mapped and k not in FILLED_KEYS[kind])
    if missing:
        raise ConversionError(
            f"{kind}: the checkpoint has nothing for {len(missing)} {model_cls.__name__} keys: {missing[:20]}"
        )
    ref_dtype = dtype or next(iter(mapped.values())).dtype
    state: dict[str, Tensor] = {}
    for k, shape in expected.items():
        if k in mapped:
            t = mapped[k].detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            # Own, contiguous storage: safetensors refuses views of one tensor (the q/k/v split).
            state[k] = t.contiguous().clone()
        else:
            state[k] = torch.zeros(shape, dtype=ref_dtype)
    return state
