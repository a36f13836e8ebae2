"""Stability guards: skip non-finite steps, roll back on repeated failures or loss spikes.

A step whose loss or gradients hold NaN/inf is skipped (no optimizer update) and counted. After
`max_bad_steps` consecutive bad steps, or a loss above mean + `spike_sigmas`·std of a rolling
window of good losses, the loop restores the last good checkpoint (weights and optimizer state
exactly) and multiplies the learning rate by `lr_factor`. A run never continues with NaN weights.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from diffalign.config import GuardConfig

OK, SKIP, ROLLBACK = "ok", "skip", "rollback"


def grads_finite(params) -> bool:
    for p in params:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return False
    return True


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
        self.rollbacks = 0
        self.last_reason = ""

    def is_spike(self, loss: float) -> bool:
        if len(self.history) < self.min_history:
            return False
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        return loss > mean + self.spike_sigmas * max(std, 1e-8)

    def check(self, loss: float, grads_ok: bool) -> str:
        """Verdict for one optimizer step: ok, skip (do not apply) or rollback."""
        if not self.enabled:
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
            self.last_reason = (
                f"loss spike {loss:.4g} > {self.spike_sigmas} sigma of the last {len(self.history)}"
            )
            return ROLLBACK
        self.consecutive_bad = 0
        self.history.append(loss)
        return OK

    def after_rollback(self) -> None:
        self.rollbacks += 1
        self.consecutive_bad = 0

    def state_dict(self) -> dict:
        return {
            "history": list(self.history),
            "consecutive_bad": self.consecutive_bad,
            "skipped": self.skipped,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict, keep_counters: bool = False) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.consecutive_bad = 0
        if not keep_counters:
            self.skipped, self.rollbacks = state["skipped"], state["rollbacks"]
