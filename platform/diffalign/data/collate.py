"""Batching of dataset items (pairs, single images or cached latents) into training batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# item key -> batch key; tensors are stacked, the rest become lists.
_TENSOR_KEYS = {
    "chosen": "chosen",
    "rejected": "rejected",
    "image": "images",
    "chosen_latents": "chosen_latents",
    "rejected_latents": "rejected_latents",
    "image_latents": "image_latents",
    "prompt_embeds": "prompt_embeds",  # text-encoder outputs read from a pair store
    "pooled_embeds": "pooled_embeds",
}
_LIST_KEYS = {"prompt": "prompts", "original_size": "original_sizes", "crop_top_left": "crop_top_lefts"}


def collate_pairs(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into a batch: "prompts" (list[str]); "chosen"/"rejected" (B,3,H,W) or
    "chosen_latents"/"rejected_latents" (B,C,h,w) (and "images"/"image_latents" for single images);
    "original_sizes"/"crop_top_lefts" as lists of (h, w)/(top, left) tuples when the items carry them.
    Other keys are passed through as lists. Every item must have the same keys.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    keys = list(items[0])
    for n, item in enumerate(items[1:], start=1):
        if set(item) != set(keys):
            raise ValueError(f"item {n} has keys {sorted(item)}, item 0 has {sorted(keys)}: mixed sources?")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in items]
        if key in _TENSOR_KEYS:
            batch[_TENSOR_KEYS[key]] = torch.stack(values)
        elif key in _LIST_KEYS:
            batch[_LIST_KEYS[key]] = [tuple(v) if isinstance(v, (list, tuple)) else v for v in values]
        else:
            batch[key] = values
    return batch
