"""Trainable weights as flat state dicts: what checkpoints, weight sync and reference copies move.

Loading is strict: a missing, unexpected or mis-shaped key raises an error naming the keys,
because a silently partial load (a dropped LoRA layer) trains or samples the wrong model.
"""

from __future__ import annotations

import torch


class WeightMismatchError(ValueError):
    """A state dict does not match the module it is loaded into."""


def is_lora_model(module: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def trainable_state_dict(module: torch.nn.Module, lora_only: bool | None = None) -> dict[str, torch.Tensor]:
    """LoRA adapter tensors for a LoRA model, else every parameter (detached CPU copies)."""
    lora_only = is_lora_model(module) if lora_only is None else lora_only
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in module.named_parameters()
        if not lora_only or "lora_" in name
    }


def check_state_dict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], lora_only: bool | None = None
) -> None:
    """Raises WeightMismatchError naming every missing, unexpected and mis-shaped key."""
    expected = {
        name: p.shape
        for name, p in module.named_parameters()
        if not (is_lora_model(module) if lora_only is None else lora_only) or "lora_" in name
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(
        f"{k}: got {tuple(state[k].shape)}, expected {tuple(s)}"
        for k, s in expected.items()
        if k in state and tuple(state[k].shape) != tuple(s)
    )
    if missing or unexpected or bad_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad_shape)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {label} keys: {shown}")
        raise WeightMismatchError("state dict does not match the model: " + "; ".join(parts))


@torch.no_grad()
def load_trainable_state_dict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], lora_only: bool | None = None
) -> None:
    """Strict in-place copy of `state` into the module's (trainable) parameters."""
    check_state_dict(module, state, lora_only)
    params = dict(module.named_parameters())
    for name, value in state.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))


def state_fingerprint(state: dict[str, torch.Tensor]) -> float:
    """A cheap scalar summary of weights, used to verify that two copies agree."""
    return float(sum(v.double().sum().item() + v.double().abs().sum().item() for v in state.values()))
