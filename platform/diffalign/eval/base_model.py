"""The base model evaluation samples from (the config's model section, frozen, in eval mode) and the
default sampling settings of evaluation and of the reward score during training."""

from __future__ import annotations

import torch

from diffalign.config import RunConfig
from diffalign.models.build import build_bundle
from diffalign.models.bundle import ModelBundle
from diffalign.models.precision import frozen_dtype

DEFAULT_GUIDANCE = {"sd15": 7.5, "sdxl": 5.0}
DEFAULT_PRETRAINED_STEPS = 50


def default_steps(cfg: RunConfig, steps: int | None) -> int:
    """``steps``, else 50 for a pretrained model and ``tracking.sample_steps`` for the tiny one."""
    if steps is not None:
        return int(steps)
    return DEFAULT_PRETRAINED_STEPS if cfg.model.pretrained else cfg.tracking.sample_steps


def default_guidance(cfg: RunConfig, guidance_scale: float | None) -> float:
    """``guidance_scale``, else the family's usual value (7.5 SD1.5, 5.0 SDXL)."""
    return float(guidance_scale if guidance_scale is not None else DEFAULT_GUIDANCE[cfg.model.family])


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, else cuda when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_base_model(cfg: RunConfig, device: torch.device) -> ModelBundle:
    """The base model of ``cfg.model`` on ``device``, frozen; on a GPU in the mixed-precision dtype."""
    bundle = build_bundle(cfg)
    dtype = frozen_dtype(cfg.model.mixed_precision) if device.type == "cuda" else torch.float32
    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return bundle
