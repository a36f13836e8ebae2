"""Shared types and plumbing for the preference objectives.

Every objective is a function of per-sample denoising errors

    err = mean over non-batch dims of (pred - target)^2,     shape (B,), float32,

for the chosen (``w``) and rejected (``l``) images of each pair, optionally the same errors of a
reference model, and an optional per-sample weight ``lambda(t)`` (the reward scale of Kang et al.).
Inputs of any floating dtype are upcast to float32 before any arithmetic, so a bf16 forward pass
still yields a float32 loss.

Subclasses implement :meth:`Objective._compute`, returning the per-pair loss, the implicit reward
margin (positive when the pair is ranked the right way) and objective-specific metric tensors.
The base class validates shapes, computes the common metrics and converts every metric to a python
float with a single device synchronisation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["Objective", "ObjectiveOutput", "check_positive", "check_non_negative", "tie_half_accuracy"]


def tie_half_accuracy(margin: Tensor) -> Tensor:
    """Fraction of margins > 0, a tie (== 0) counting half, as diffusers' Diffusion-DPO script logs
    ``implicit_acc``: a policy equal to its reference (all margins 0) scores 0.5, not 0."""
    margin = margin.detach().float()
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


@dataclass
class ObjectiveOutput:
    """Result of one objective evaluation.

    Attributes:
        loss: scalar float32 loss (``per_sample.mean()``), differentiable.
        per_sample: ``(B,)`` per-pair loss, differentiable.
        margin: ``(B,)`` implicit reward margin; ``> 0`` means the pair is ranked right. Empty
            (``(0,)``) when no rejected errors were computed (SFT without its diagnostic).
        metrics: detached python floats (common metrics plus objective-specific ones).
    """

    loss: Tensor
    per_sample: Tensor
    margin: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def check_positive(objective: str, name: str, value: float) -> float:
    """Return ``float(value)`` or raise ``ValueError`` naming ``name`` unless it is finite and > 0."""
    value = _as_float(objective, name, value)
    if not value > 0:
        raise ValueError(f"{objective}: hyperparameter '{name}' must be > 0, got {value}")
    return value


def check_non_negative(objective: str, name: str, value: float) -> float:
    """Return ``float(value)`` or raise ``ValueError`` naming ``name`` unless it is finite and >= 0."""
    value = _as_float(objective, name, value)
    if not value >= 0:
        raise ValueError(f"{objective}: hyperparameter '{name}' must be >= 0, got {value}")
    return value


def _as_float(objective: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{objective}: hyperparameter '{name}' must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{objective}: hyperparameter '{name}' must be finite, got {value}")
    return value


def _prepare(name: str, what: str, x: Tensor | None, batch: int | None) -> Tensor | None:
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: {what} must be a floating tensor, got dtype {x.dtype}")
    if x.dim() != 1 or (batch is not None and x.shape[0] != batch):
        expected = "(B,)" if batch is None else f"({batch},)"
        raise ValueError(f"{name}: {what} must have shape {expected}, got {tuple(x.shape)}")
    return x.float()


class Objective(ABC):
    """Base class of every preference objective.

    Call signature (all tensors ``(B,)``)::

        objective(err_w, err_l, ref_err_w=None, ref_err_l=None, weight=None) -> ObjectiveOutput

    ``weight`` is the per-sample reward scale lambda(t); a python number or a 0-d tensor is
    broadcast to every pair. Objectives that do not need a reference ignore the reference errors
    except for reporting ``ref_mse_w`` / ``ref_mse_l``.

    ``uses_rejected`` False (SFT without its diagnostic) lets the step skip the rejected images:
    ``err_l`` may then be None, and the margin metrics (``implicit_acc``, ``margin_*``, ``mse_l``)
    are not reported. ``implicit_acc`` counts a zero margin as half right (:func:`tie_half_accuracy`).
    """

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = False
    uses_rejected: bool = True

    def __call__(
        self,
        err_w: Tensor,
        err_l: Tensor | None,
        ref_err_w: Tensor | None = None,
        ref_err_l: Tensor | None = None,
        weight: Tensor | float | None = None,
    ) -> ObjectiveOutput:
        err_w = _prepare(self.name, "err_w", err_w, None)
        batch = err_w.shape[0]
        if err_l is None and self.uses_rejected:
            raise ValueError(f"{self.name}: err_l (the rejected images' errors) is required")
        err_l = _prepare(self.name, "err_l", err_l, batch)
        if err_l is not None:
            err_l = err_l.to(err_w.device)
        ref_err_w = _prepare(self.name, "ref_err_w", ref_err_w, batch)
        ref_err_l = _prepare(self.name, "ref_err_l", ref_err_l, batch)
        if ref_err_w is not None and ref_err_l is not None:
            # reference errors may come from another device (e.g. a remote reference worker)
            ref_err_w, ref_err_l = ref_err_w.to(err_w.device), ref_err_l.to(err_w.device)
        if (ref_err_w is None) != (ref_err_l is None):
            raise ValueError(f"{self.name}: pass both ref_err_w and ref_err_l or neither")
        if self.needs_reference and ref_err_w is None:
            raise ValueError(
                f"objective '{self.name}' needs reference errors: pass ref_err_w and ref_err_l "
                "(computed by the reference model on the same noisy latents and timesteps)"
            )
        weight_t = self._prepare_weight(weight, err_w)

        per_sample, margin, extra = self._compute(err_w, err_l, ref_err_w, ref_err_l, weight_t)
        loss = per_sample.mean()

        with torch.no_grad():
            margin_d = margin.detach()
            stats: dict[str, Tensor] = {}
            if err_l is not None:
                stats.update({
                    "implicit_acc": tie_half_accuracy(margin_d),
                    "margin_mean": margin_d.mean(),
                    # population std: defined (zero) for a batch of one pair
                    "margin_std": margin_d.std(unbiased=False),
                })
            stats["mse_w"] = err_w.detach().mean()
            if err_l is not None:
                stats["mse_l"] = err_l.detach().mean()
            if ref_err_w is not None and ref_err_l is not None:
                stats["ref_mse_w"] = ref_err_w.detach().mean()
                stats["ref_mse_l"] = ref_err_l.detach().mean()
            stats.update({k: v.detach() for k, v in extra.items()})
            metrics = _to_floats(stats)
        return ObjectiveOutput(loss=loss, per_sample=per_sample, margin=margin, metrics=metrics)

    def _prepare_weight(self, weight: Tensor | float | None, like: Tensor) -> Tensor:
        if weight is None:
            return torch.ones_like(like)
        if not isinstance(weight, Tensor):
            return torch.full_like(like, float(weight))
        if weight.dim() == 0:
            return weight.float().to(like.device).expand_as(like)
        weight = _prepare(self.name, "weight", weight, like.shape[0])
        return weight.to(like.device)

    @abstractmethod
    def _compute(
        self,
        err_w: Tensor,
        err_l: Tensor | None,
        ref_err_w: Tensor | None,
        ref_err_l: Tensor | None,
        weight: Tensor,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Return ``(per_sample, margin, extra_metrics)``; all inputs are float32 ``(B,)`` (``err_l``
        None only when ``uses_rejected`` is False)."""

    def hparams(self) -> dict[str, float]:
        """The constructor hyperparameters (for logging)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


def _to_floats(stats: dict[str, Tensor]) -> dict[str, float]:
    if not stats:
        return {}
    values = torch.stack([v.reshape(()).float() for v in stats.values()]).cpu().tolist()
    return dict(zip(stats.keys(), (float(v) for v in values)))
