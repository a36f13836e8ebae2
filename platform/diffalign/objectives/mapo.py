"""MaPO: margin-aware preference optimization, reference free.

Hong et al., "Margin-aware Preference Optimization for Aligning Diffusion Models without
Reference", arXiv:2406.06424v2 (AAAI 2026), eq. 9-11, with m = L_MSE the per-sample error:

    L_MaPO   = L_MSE(c; x_0^w) + omega * L_margin(c; x_0^w, x_0^l)                     (9)
    L_margin = -log sigma( psi_beta(m_w) - psi_beta(m_l) )                               (10)
    psi_beta(m) = beta * psi(s * m),   psi(K) = K / (exp(K) - 1) in (0, 1]              (11)

Where beta sits. The paper calls beta "the hyperparameter of (11)" that "controls the temperature
of the score function", so that (10) is "minimized with less likelihood margin" as beta grows; it
states that the gradient of (10) "is proportional to beta" and weights (10) with omega "to cancel
out the proportional impact of beta"; its gradient analysis is written for beta = 1 and says the
amplification factor "scales proportionally with beta" otherwise. All of this holds exactly when
beta multiplies the score (as a scale inside psi, like the official snr_value, the factor would be
beta * f(beta * K), which decays with beta instead), and that is where the official code
(mapo-t2i/mapo, ``compute_loss``) puts its fixed factor T = num_train_timesteps = 1000::

    loss = mean(err_w) - beta_mapo * mean(logsigmoid(T * (psi(s*err_w) - psi(s*err_l))))
    T = 1000, s = snr_value = 0.5, beta_mapo = 0.1

The mapping used here, so that a config's ``beta`` is the paper's (Table 4) beta:

    beta          = T of the official code (the temperature of the score, eq. 11)
    snr_value     = s (fixed unit of the error inside psi; 0.5 as in the official code)
    margin_weight = omega = OFFICIAL_MARGIN_SCALE / beta,  OFFICIAL_MARGIN_SCALE = 0.1 * 1000 = 100

so the official code is exactly ``beta: 1000`` (the default; omega = 0.1), and an official run with
other flags is ``beta: 1000, snr_value: <snr_value>, margin_weight: <beta_mapo>`` (an explicit
``margin_weight`` is used as given). With z = beta * (psi(s*m_w) - psi(s*m_l)) the margin term's
gradient is

    d(omega * L_margin)/d m_w = 100 * sigma(-z) * (s/2) * f(s*m_w),   f from eq. 14, in (0, 1],

bounded by 100 * s/2 = 25 for every beta and 12.5 * f at a tie (z = 0), against 1 for the SFT
term: omega cancels beta's proportional effect. What beta changes is where the margin term fades:
sigma(-z) is small once the score gap exceeds a few 1/beta. Table 4 (best beta 8 preference,
32 culture, 64 safety and style, 1024 personalization; "the larger the reference mismatch, the
larger the optimal beta ... requiring less margin") then reads as the paper says: a large beta
satisfies the margin with a tiny gap and leaves mostly the SFT term ("matching the distribution
through L_MSE is more emphasized", its DreamBooth remark), while beta = 8 keeps the margin term
pushing over the whole range of typical score gaps (|z| < 1). The paper gives no conversion
between Table 4 and the official defaults; under this mapping the official Pick-a-Pic run
(beta 1000) sits near Table 4's personalization value, not its preference row.

Errors are per-element means (the official code's too). The optional per-sample ``weight``
(reward scale lambda(t)) multiplies beta inside the sigmoid (omega stays beta's); the SFT term is
unweighted.

psi is evaluated without ``0/0`` or overflow: a Taylor expansion for ``|s*m| < 1e-3`` and
``x * exp(-x) / -expm1(-x)`` otherwise, whose value and gradient stay finite for any error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Objective, check_non_negative, check_positive

__all__ = ["OFFICIAL_MARGIN_SCALE", "MaPOObjective", "amplification_factor", "mapo_score"]

_TAYLOR_EPS = 1e-3

#: omega * beta of the official code: beta_mapo (0.1) x num_train_timesteps (1000)
OFFICIAL_MARGIN_SCALE = 100.0


def _link(x: Tensor) -> Tensor:
    """psi(x) = x / (exp(x) - 1), stable for every real x, with finite gradients."""
    a = x.abs()
    small = a < _TAYLOR_EPS
    a_safe = torch.where(small, torch.ones_like(a), a)
    # psi(|x|) written with exp(-|x|) only (never overflows), then psi(x) = psi(|x|) + max(-x, 0)
    far = a_safe * torch.exp(-a_safe) / (-torch.expm1(-a_safe)) + torch.relu(-x)
    near = 1.0 - x / 2.0 + x * x / 12.0
    return torch.where(small, near, far)


def mapo_score(err: Tensor, snr_value: float = 0.5) -> Tensor:
    """The MaPO score psi(snr_value * err) = s*err / (exp(s*err) - 1), in (0, 1] for err >= 0."""
    return _link(snr_value * err)


def amplification_factor(err: Tensor, snr_value: float = 0.5) -> Tensor:
    """Gradient amplification factor of the MaPO score (Hong et al., gradient analysis, eq. 14).

    With K = snr_value * err, the chain rule gives ``grad psi(K) = -psi'(K) * (-grad K)`` where

        -psi'(K) = (exp(K) * (K - 1) + 1) / (exp(K) - 1)^2,

    which decreases strictly from 1/2 (K -> 0) to 0 (K -> inf). The paper states the factor as
    lying in (0, 1] with limit 1 at K -> 0, so this returns the normalised factor

        f(K) = 2 * (exp(K) * (K - 1) + 1) / (exp(K) - 1)^2,

    i.e. ``d psi(s * err) / d err = -(snr_value / 2) * f(snr_value * err)``: easy pairs (small
    error) keep the full gradient, hard or outlier pairs are attenuated. Computed in float64 and
    returned in the input dtype (float32 for integer input); for K < 0 the identity
    f(-K) = 2 - f(K) is used.
    """
    x = (snr_value * err).double()
    a = x.abs()
    small = a < 0.05
    a_safe = torch.where(small, torch.ones_like(a), a)
    em = torch.expm1(-a_safe)
    # 2 * e^{-a} * (a + expm1(-a)) / expm1(-a)^2 == 2 * (e^a (a - 1) + 1) / (e^a - 1)^2
    far = 2.0 * torch.exp(-a_safe) * (a_safe + em) / (em * em)
    near = 1.0 - a / 3.0 + a**3 / 90.0
    f_abs = torch.where(small, near, far)
    f = torch.where(x < 0, 2.0 - f_abs, f_abs)
    out_dtype = err.dtype if err.is_floating_point() else torch.float32
    return f.to(out_dtype)


class MaPOObjective(Objective):
    """MaPO with the paper's ``beta`` (default 1000, the official code), ``snr_value`` (0.5) and
    ``margin_weight`` (omega; None derives ``OFFICIAL_MARGIN_SCALE / beta``, 0.1 at the default)."""

    name = "mapo"
    needs_reference = False

    def __init__(
        self, beta: float = 1000.0, snr_value: float = 0.5, margin_weight: float | None = None
    ) -> None:
        self.beta = check_positive(self.name, "beta", beta)
        self.snr_value = check_positive(self.name, "snr_value", snr_value)
        if margin_weight is None:
            # omega cancels beta's proportional effect on the margin gradient (Hong et al., eq. 9)
            self.margin_weight = OFFICIAL_MARGIN_SCALE / self.beta
        else:
            self.margin_weight = check_non_negative(self.name, "margin_weight", margin_weight)

    def hparams(self) -> dict[str, float]:
        return {"beta": self.beta, "snr_value": self.snr_value, "margin_weight": self.margin_weight}

    def _compute(
        self,
        err_w: Tensor,
        err_l: Tensor,
        ref_err_w: Tensor | None,
        ref_err_l: Tensor | None,
        weight: Tensor,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        score_w = mapo_score(err_w, self.snr_value)
        score_l = mapo_score(err_l, self.snr_value)
        margin = self.beta * weight * (score_w - score_l)
        margin_loss = -self.margin_weight * F.logsigmoid(margin)
        per_sample = err_w + margin_loss
        extra = {
            "mapo_margin_loss": margin_loss.mean(),
            "score_w": score_w.mean(),
            "score_l": score_l.mean(),
        }
        return per_sample, margin, extra
