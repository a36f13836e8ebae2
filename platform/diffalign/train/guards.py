"""Stability guards: skip non-finite steps, roll back on repeated failures or loss spikes, and tell a
saturated loss from a divergence.

A step whose loss or gradients hold NaN/inf is skipped (no optimizer update) and counted. After
`max_bad_steps` consecutive bad steps, or a loss spike, the loop restores the last good checkpoint
(weights and optimizer state exactly) and multiplies the learning rate by `lr_factor`. A run never
continues with NaN weights.

A spike is a loss above `mean + spike_sigmas * max(std, floor)` of a rolling window of good losses,
where the floor is the larger of `SPIKE_FLOOR_ABS` and `SPIKE_FLOOR_REL` times the loss's own scale
(`scale`: the mean of the run's first `min_history` good losses, about log 2 for the logistic
preference losses, about 1 for a denoising MSE). Without the floor a window of (near) zeros has a
std of ~0 and any nonzero loss after it is "6 sigma".

Saturation. A logistic preference loss (-logsigmoid of a margin) is ~0 on every pair whose margin is
large, and so is its gradient: when the loss has been below `SATURATED_LOSS` (and the gradient norm,
where the loop reports it, below `SATURATED_GRAD_NORM`) for `SATURATION_STEPS` consecutive steps, the
objective has nothing left to learn (its margins are huge: beta or the learning rate is too high for
the data). The guard then warns once (`saturation` holds the note, for the tracker) and stops
treating a jump of the loss as a divergence: after a saturated stretch the window holds zeros and no
scale, and the loss of a pair the model gets wrong is about the size of the (huge) margins, so a
jump measures the margins, not a blow-up. Non-finite losses and gradients are still skipped and
rolled back.

Counters. `rollbacks` is the rollback budget of this process (`guard.max_rollbacks`): a rollback keeps
it (the same attempt goes on), a resume from a checkpoint starts it at 0 - the checkpoint is a state
the guards accepted and keeps the lowered learning rate, and giving up was a verdict on the earlier
attempt; inheriting its count made a rerun give up at its first spike, without training.
`total_rollbacks` counts every rollback of the run, across resumes (saved in checkpoints).
"""

from __future__ import annotations

import logging
import math
from collections import deque

import torch

from diffalign.config import GuardConfig

OK, SKIP, ROLLBACK = "ok", "skip", "rollback"

log = logging.getLogger(__name__)

#: The std floor of the spike test: absolute, and relative to the loss's scale (see the module doc).
SPIKE_FLOOR_ABS = 1e-3
SPIKE_FLOOR_REL = 0.1
#: A step is saturated when its loss (and gradient norm, if known) is below these ...
SATURATED_LOSS = 1e-6
SATURATED_GRAD_NORM = 1e-8
#: ... and the objective is, after this many consecutive saturated steps.
SATURATION_STEPS = 10


def grads_finite(params) -> bool:
    for p in params:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return False
    return True


def saturation_note(steps: int) -> str:
    """What a saturated loss means and what to change."""
    return (
        f"the loss has saturated: below {SATURATED_LOSS:g} (gradient norm ~0) for {steps} consecutive "
        "steps. The objective has nothing left to learn - its margins are so large that -logsigmoid "
        "and its gradient are ~0 - so further steps change the weights only through weight decay and "
        "optimizer momentum. Lower objective.beta or optim.lr (or train.max_steps)."
    )


class StabilityGuard:
    # Defaults are the config's (GuardConfig): written once, there.
    def __init__(self, max_bad_steps: int = GuardConfig.max_bad_steps,
                 spike_sigmas: float = GuardConfig.spike_sigmas, window: int = GuardConfig.spike_window,
                 min_history: int = GuardConfig.spike_min_history,
                 enabled: bool = GuardConfig.enabled) -> None:
        self.max_bad_steps, self.spike_sigmas = max_bad_steps, spike_sigmas
        self.min_history, self.enabled = min_history, enabled
        self.history: deque[float] = deque(maxlen=window)
        self.consecutive_bad = 0
        self.skipped = 0
        self.rollbacks = 0  # this process's rollbacks: the budget of guard.max_rollbacks
        self.earlier_rollbacks = 0  # those of earlier attempts (before a resume)
        self.scale: float | None = None  # the loss's scale: mean of the first min_history good losses
        self._first: list[float] = []
        self.saturated_steps = 0  # consecutive saturated good steps
        self.saturation: str | None = None  # the note, once the loss has saturated (warned once)
        self.last_reason = ""

    @property
    def total_rollbacks(self) -> int:
        return self.earlier_rollbacks + self.rollbacks

    @property
    def saturated(self) -> bool:
        return self.saturated_steps >= SATURATION_STEPS

    def spike_threshold(self) -> float | None:
        """The loss above which a good step is a spike; None while the window is too short."""
        if len(self.history) < max(self.min_history, 1):
            return None
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        scale = self.scale if self.scale is not None else max(abs(x) for x in self.history)
        return mean + self.spike_sigmas * max(std, SPIKE_FLOOR_ABS, SPIKE_FLOOR_REL * scale)

    def is_spike(self, loss: float) -> bool:
        threshold = self.spike_threshold()
        return threshold is not None and loss > threshold

    def _observe(self, loss: float, grad_norm: float | None) -> None:
        """Counts saturated steps; warns once when the loss has saturated."""
        low_grad = grad_norm is None or grad_norm < SATURATED_GRAD_NORM
        if 0 <= loss < SATURATED_LOSS and low_grad:
            self.saturated_steps += 1
        else:
            self.saturated_steps = 0
        if self.saturated and self.saturation is None:
            self.saturation = saturation_note(self.saturated_steps)
            log.warning("%s", self.saturation)

    def _accept(self, loss: float, grad_norm: float | None) -> str:
        self.consecutive_bad = 0
        self.history.append(loss)
        if self.scale is None:
            self._first.append(loss)
            if len(self._first) >= max(self.min_history, 1):
                self.scale = sum(abs(x) for x in self._first) / len(self._first)
        self._observe(loss, grad_norm)
        return OK

    def check(self, loss: float, grads_ok: bool, grad_norm: float | None = None) -> str:
        """Verdict for one optimizer step: ok, skip (do not apply) or rollback. `grad_norm` (optional):
        the step's global gradient norm, for the saturation test (without it, the loss alone)."""
        if not self.enabled:
            if math.isfinite(loss) and grads_ok:
                self._observe(loss, grad_norm)  # the saturation note needs no guard
            return OK
        if not math.isfinite(loss) or not grads_ok:
            self.skipped += 1
            self.consecutive_bad += 1
            self.last_reason = "non-finite loss" if not math.isfinite(loss) else "non-finite gradients"
            if self.consecutive_bad >= self.max_bad_steps:
                self.last_reason = f"{self.consecutive_bad} consecutive non-finite steps"
                return ROLLBACK
            return SKIP
        if self.is_spike(loss):
            if self.saturated:
                # Not a divergence: a wrong pair of a saturated objective (module doc). Trained on.
                log.info("loss %.4g after %d saturated steps: the saturated objective's margins, not a "
                         "divergence; no rollback", loss, self.saturated_steps)
                return self._accept(loss, grad_norm)
            self.last_reason = (
                f"loss spike {loss:.4g} > {self.spike_sigmas} sigma of the last {len(self.history)}"
            )
            return ROLLBACK
        return self._accept(loss, grad_norm)

    def after_rollback(self) -> None:
        self.rollbacks += 1
        self.consecutive_bad = 0

    def state_dict(self) -> dict:
        return {
            "history": list(self.history),
            "consecutive_bad": self.consecutive_bad,
            "skipped": self.skipped,
            "rollbacks": self.rollbacks,
            "earlier_rollbacks": self.earlier_rollbacks,
            "scale": self.scale,
            "first": list(self._first),
            "saturated_steps": self.saturated_steps,
        }

    def load_state_dict(self, state: dict, keep_counters: bool = False) -> None:
        """`keep_counters`: a rollback (the same attempt goes on, counters as they are); else a resume,
        whose rollback budget starts again (the module doc says why)."""
        self.history.clear()
        self.history.extend(state["history"])
        self.consecutive_bad = 0
        self.scale = state.get("scale")
        self._first = list(state.get("first", []))
        self.saturated_steps = int(state.get("saturated_steps", 0))
        if not keep_counters:
            self.skipped = state["skipped"]
            self.earlier_rollbacks = int(state.get("earlier_rollbacks", 0)) + int(state["rollbacks"])
            self.rollbacks = 0
            if self.earlier_rollbacks:
                log.info("resumed after %d rollback(s) of earlier attempts (their lowered learning rate "
                         "kept); this attempt may roll back guard.max_rollbacks times again",
                         self.earlier_rollbacks)
