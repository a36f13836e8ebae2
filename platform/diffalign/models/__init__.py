"""Model bundles, loading, conditioning, per-sample errors and LoRA.

Names resolve on first use (PEP 562): importing a light submodule (conditioning, denoiser, weights),
as the config and the reference policies do, does not pull in diffusers and transformers, which
cost seconds in every Ray process that only unpickles a config.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "FAMILIES": "bundle", "ModelBundle": "bundle",
    "Conditioning": "conditioning", "PromptEncoder": "conditioning",
    "Denoiser": "denoiser", "per_sample_mse": "denoiser",
    "load_bundle": "loading",
    "build_tiny_bundle": "tiny.diffusion",
    "WeightMismatchError": "weights", "check_state_dict": "weights",
    "load_trainable_state_dict": "weights", "trainable_state_dict": "weights",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'diffalign.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"diffalign.models.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
