"""Diffusion-DPO.

Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024,
eq. 14:

    L(theta) = - E log sigma( -beta T omega(lambda_t) * (
                    ||eps^w - eps_theta(x_t^w, t)||^2 - ||eps^w - eps_ref(x_t^w, t)||^2
                  - ( ||eps^l - eps_theta(x_t^l, t)||^2 - ||eps^l - eps_ref(x_t^l, t)||^2 ) ) )

With per-element mean errors this is the loss of the original Wallace et al. code
(SalesforceAIResearch/DiffusionDPO ``train.py``, ``--beta_dpo 5000`` in its launchers)::

    model_diff = err_w - err_l
    ref_diff   = ref_err_w - ref_err_l
    inside     = -0.5 * beta * (model_diff - ref_diff)
    loss       = mean(-logsigmoid(inside))

Current diffusers' SD1.5 script (``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``)
writes the same loss without the 0.5, ``-logsigmoid(beta_dpo * (ref_diff - model_diff))``, default
``--beta_dpo 2500``: equal losses need beta = 2 * beta_dpo, so its default is Wallace et al.'s 5000.
Its SDXL script (``train_diffusion_dpo_sdxl.py``) keeps the 0.5 form, default 5000: there
``--beta_dpo`` is ``beta`` here. Pass ``beta`` for the 0.5 form or ``beta_dpo`` for the form without
it (not both), so a run of either script ports with one line.

``beta`` (default 5000, Wallace et al.'s value) absorbs T and the constant weighting. The optional
per-sample ``weight`` is the timestep-dependent reward scale lambda(t) of Kang et al., "Rethinking
Direct Preference Optimization in Diffusion Models" (AAAI 2026), eq. 6, which multiplies beta:
``inside = -0.5 * beta * weight * (model_diff - ref_diff)``.

DPO with reference updates (Kang et al.) is this objective in this convention: they reproduce
Diffusion-DPO with its reported hyperparameters and ablate "reducing beta from 5,000 to 1,000".
xDPO (``xdpo.py``) uses the same 0.5 form (its Appendix C).

The margin is ``inside`` itself (the implicit reward difference), so ``implicit_acc`` is the
fraction of pairs with ``inside > 0``, as in both implementations.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import Objective, check_positive

__all__ = ["DPOObjective"]


class _Default(float):
    """The default beta, told apart (by ``is``) from 5000 passed explicitly, so that ``beta: 5000`` with
    ``beta_dpo`` is refused while ``objective_hyperparameters`` still shows the number 5000."""


_DEFAULT_BETA = _Default(5000.0)


class DPOObjective(Objective):
    """Diffusion-DPO with temperature ``beta`` (default 5000, Wallace et al.'s code) or, in diffusers'
    convention, ``beta_dpo`` (beta = 2 * beta_dpo)."""

    name = "dpo"
    needs_reference = True

    def __init__(self, beta: float = _DEFAULT_BETA, beta_dpo: float | None = None) -> None:
        if beta_dpo is not None:
            if beta is not _DEFAULT_BETA:
                raise ValueError(
                    f"{self.name}: hyperparameters 'beta' ({beta}, Wallace et al.: 0.5 * beta) and "
                    f"'beta_dpo' ({beta_dpo}, diffusers: beta = 2 * beta_dpo) are mutually exclusive; "
                    "set one of them"
                )
            beta = 2.0 * check_positive(self.name, "beta_dpo", beta_dpo)
        self.beta = check_positive(self.name, "beta", beta)

    def hparams(self) -> dict[str, float]:
        return {"beta": self.beta}

    def _compute(
        self,
        err_w: Tensor,
        err_l: Tensor,
        ref_err_w: Tensor | None,
        ref_err_l: Tensor | None,
        weight: Tensor,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        assert ref_err_w is not None and ref_err_l is not None
        model_diff = err_w - err_l
        ref_diff = ref_err_w - ref_err_l
        inside = -0.5 * self.beta * weight * (model_diff - ref_diff)
        per_sample = -F.logsigmoid(inside)
        extra = {
            "reward_w": (-0.5 * self.beta * (err_w - ref_err_w)).mean(),
            "reward_l": (-0.5 * self.beta * (err_l - ref_err_l)).mean(),
        }
        return per_sample, inside, extra
