"""Supervised fine-tuning on the chosen images only.

The standard denoising objective (Ho et al., 2020, "Denoising Diffusion Probabilistic Models",
eq. 14) on the chosen image of each pair, with per-element mean errors:

    L_SFT = E_{x_0^w, eps, t} || eps - eps_theta(x_t^w, t) ||^2,     loss = mean(err_w)

Unweighted, like the SFT term of MaPO (eq. 9; the official code's ``model_losses_w.mean()``) and
Kang et al.'s SFT baseline ("we exclusively use the preferred images", Sec. 4 Baseline Methods).
The step's ``weight`` is Kang et al.'s *reward* scale lambda(t): it multiplies the implicit reward
inside the sigmoid (eq. 6; "As lambda(t) controls the implicit regularization via beta", Sec. 3
Boosting with Timestep-Aware Optimization), and SFT has no reward or beta to scale, so it is
ignored here exactly as MaPO's SFT term ignores it. (Their eq. 2 writes a
weighting lambda(t) into the DDPM loss too; a timestep weighting of a plain denoising loss, such
as min-SNR, is a different choice from the reward scale and is not what `timesteps.reward_scale`
configures.)

``rejected_diagnostic`` (default False): also run the policy over the rejected images to report
the margin ``err_l - err_w`` (positive when the chosen image is denoised better) and the
``implicit_acc`` / ``margin_*`` / ``mse_l`` metrics. It never enters the loss, so by default the
step skips the rejected half: one forward over B images instead of 2B.
"""

from __future__ import annotations

from torch import Tensor

from .base import Objective

__all__ = ["SFTObjective"]


class SFTObjective(Objective):
    """``loss = mean(err_w)``; no reference. ``rejected_diagnostic`` adds the rejected-image margin."""

    name = "sft"
    needs_reference = False

    def __init__(self, rejected_diagnostic: bool = False) -> None:
        if not isinstance(rejected_diagnostic, bool):
            raise ValueError(f"sft: hyperparameter 'rejected_diagnostic' must be true or false, "
                             f"got {rejected_diagnostic!r}")
        self.rejected_diagnostic = rejected_diagnostic
        self.uses_rejected = rejected_diagnostic

    def hparams(self) -> dict[str, bool]:
        return {"rejected_diagnostic": self.rejected_diagnostic}

    def _compute(
        self,
        err_w: Tensor,
        err_l: Tensor | None,
        ref_err_w: Tensor | None,
        ref_err_l: Tensor | None,
        weight: Tensor,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        per_sample = err_w
        # Diagnostic only (no gradient reaches err_l through the loss).
        margin = err_l - err_w if err_l is not None else err_w.new_zeros(0)
        return per_sample, margin, {}
