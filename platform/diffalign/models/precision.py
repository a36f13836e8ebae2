"""Precision names of the config -> torch dtypes, and the one autocast helper.

`model.mixed_precision` (no | bf16 | fp16) is the compute dtype of the policy under autocast;
`reference.dtype` (auto | fp32 | bf16 | fp16) is the storage dtype of a full-UNet reference copy.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

MIXED_PRECISION = ("no", "bf16", "fp16")
# None: no autocast (the model runs in its own float32).
MIXED_PRECISION_DTYPES: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16,
                                                         "fp16": torch.float16}
REFERENCE_DTYPES = ("auto", "fp32", "bf16", "fp16")
_STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision_dtype(name: str) -> torch.dtype | None:
    """`model.mixed_precision` -> the autocast dtype (None for "no")."""
    if name not in MIXED_PRECISION_DTYPES:
        raise ValueError(f"model.mixed_precision must be one of {MIXED_PRECISION}, got {name!r}")
    return MIXED_PRECISION_DTYPES[name]


def frozen_dtype(mixed_precision: str) -> torch.dtype:
    """Storage dtype of the frozen encoders (VAE, text encoders): the compute dtype, else float32."""
    return mixed_precision_dtype(mixed_precision) or torch.float32


def resolve_reference_dtype(name: str, mixed_precision: str, device: torch.device | str) -> torch.dtype:
    """`reference.dtype` -> torch dtype; auto = the mixed-precision dtype on GPU, float32 on CPU."""
    if name not in REFERENCE_DTYPES:
        raise ValueError(f"reference.dtype must be one of {REFERENCE_DTYPES}, got {name!r}")
    if name != "auto":
        return _STORAGE_DTYPES[name]
    return frozen_dtype(mixed_precision) if torch.device(device).type == "cuda" else torch.float32


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast on `device` to `dtype`; a no-op context for dtype None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
