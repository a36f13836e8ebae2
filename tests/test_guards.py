"""Stability guards in the trainer: skipped non-finite steps, rollback to the last checkpoint
(weights and optimizer state exactly, lowered LR) after repeated failures or a loss spike, and
giving up after too many rollbacks."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffalign.train.checkpoint import load_checkpoint
from diffalign.train.driver import build_trainer
from diffalign.train.guards import OK, ROLLBACK, SATURATION_STEPS, SKIP, SPIKE_FLOOR_REL, StabilityGuard
from diffalign.train.loop import Trainer, TrainingDiverged

LR = 1e-3
GUARDED = ("guard.enabled=true", f"optim.lr={LR}", "optim.batch_size=2", "data.num_pairs=8")


class Faults:
    """Trainer hooks that corrupt the loss or the gradients on chosen calls.

    `loss_faults` / `grad_faults` map an optimizer step number to (multiplier, how many calls):
    the next `count` calls for that step are corrupted, later ones (e.g. after a rollback) are not.
    """

    def __init__(self, loss_faults=None, grad_faults=None) -> None:
        self.loss_faults = {k: list(v) for k, v in (loss_faults or {}).items()}
        self.grad_faults = dict(grad_faults or {})
        self.trainer: Trainer | None = None
        self.calls: list[tuple[int, bool, dict]] = []  # (step, corrupted, weights before the step)

    def on_before_backward(self, trainer, loss: torch.Tensor) -> torch.Tensor:
        step = trainer.step + 1
        fault = self.loss_faults.get(step)
        corrupt = bool(fault and fault[1] > 0)
        weights = {k: v.clone() for k, v in self.trainer.trainable_weights().items()}
        self.calls.append((step, corrupt, weights))
        if corrupt:
            fault[1] -= 1
            return loss * fault[0]
        return loss

    def on_after_backward(self, trainer, params) -> None:
        step = trainer.step + 1
        if self.grad_faults.get(step, 0) > 0:
            self.grad_faults[step] -= 1
            params[0].grad.view(-1)[0] = float("nan")


class Events:
    """Callback capturing, at each guard event, the trainer state right after it was handled."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.after: list[dict] = []
        self.metrics: list[dict] = []

    def on_event(self, trainer, event) -> None:
        self.events.append(dict(event))
        snap = {"weights": {k: v.clone() for k, v in trainer.trainable_weights().items()},
                "lr": trainer.engine.lr(), "step": trainer.step,
                "optim": copy.deepcopy(trainer.engine.optimizer.state_dict())}
        if event["kind"] == ROLLBACK:
            snap["checkpoint"] = load_checkpoint(event["restored"])
        self.after.append(snap)

    def on_step(self, trainer, metrics) -> None:
        self.metrics.append(dict(metrics))


def _make(tiny_cfg, *overrides, faults: Faults | None = None):
    rec = Events()
    faults = faults or Faults()
    trainer = build_trainer(tiny_cfg(*GUARDED, *overrides), callbacks=[faults, rec])
    faults.trainer = trainer
    return trainer, faults, rec


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _all_finite(trainer) -> bool:
    return all(torch.isfinite(v).all() for v in trainer.trainable_weights().values())


def test_nan_loss_step_is_skipped_and_counted(tiny_cfg):
    trainer, faults, rec = _make(tiny_cfg, "train.max_steps=5", "guard.max_bad_steps=3",
                                 faults=Faults(loss_faults={3: (float("nan"), 1)}))
    trainer.fit()
    assert trainer.step == 5 and len(rec.metrics) == 5
    assert [e["kind"] for e in rec.events] == [SKIP]
    assert rec.events[0]["step"] == 2 and "non-finite" in rec.events[0]["reason"]
    assert trainer.events == rec.events
    # the corrupted attempt of step 3 changed nothing: the retry starts from the same weights
    step3 = [c for c in faults.calls if c[0] == 3]
    assert [c[1] for c in step3] == [True, False]
    assert _equal(step3[0][2], step3[1][2])
    assert rec.metrics[-1]["guard/skipped_steps"] == 1.0
    assert rec.metrics[1]["guard/skipped_steps"] == 0.0  # counted from the skip on
    assert rec.metrics[-1]["guard/rollbacks"] == 0.0
    assert _all_finite(trainer)


def test_nan_gradient_is_skipped(tiny_cfg):
    trainer, faults, rec = _make(tiny_cfg, "train.max_steps=3", faults=Faults(grad_faults={2: 1}))
    trainer.fit()
    assert [e["kind"] for e in rec.events] == [SKIP]
    assert "gradient" in rec.events[0]["reason"]
    step2 = [c for c in faults.calls if c[0] == 2]
    assert len(step2) == 2 and _equal(step2[0][2], step2[1][2])
    assert trainer.guard.skipped == 1 and trainer.step == 3
    assert _all_finite(trainer)


def test_consecutive_bad_steps_roll_back_exactly(tiny_cfg):
    factor = 0.25
    trainer, faults, rec = _make(
        tiny_cfg, "train.max_steps=6", "guard.max_bad_steps=2", f"guard.lr_factor={factor}",
        "train.checkpoint_every=2", "train.keep_checkpoints=5",
        faults=Faults(loss_faults={4: (float("nan"), 2)}),
    )
    trainer.fit()
    assert [e["kind"] for e in rec.events] == [SKIP, ROLLBACK]
    event, snap = rec.events[1], rec.after[1]
    assert event["restored"].endswith("checkpoint-2") and event["restored_step"] == 2
    assert "consecutive" in event["reason"]
    assert event["lr_factor"] == pytest.approx(factor)
    weights, state = snap["checkpoint"]
    assert snap["step"] == 2
    assert _equal(snap["weights"], weights)
    # the optimizer moments are the checkpoint's, bit for bit
    saved = state["engine"]["optimizer"]["state"]
    now = snap["optim"]["state"]
    assert set(saved) == set(now) and saved
    for i in saved:
        assert torch.equal(now[i]["exp_avg"], saved[i]["exp_avg"])
        assert torch.equal(now[i]["exp_avg_sq"], saved[i]["exp_avg_sq"])
        assert torch.equal(torch.as_tensor(now[i]["step"]), torch.as_tensor(saved[i]["step"]))
    # the weights that were current before the rollback (after step 3) are not the restored ones
    before = [c for c in faults.calls if c[0] == 4][0][2]
    assert not _equal(before, weights)
    assert snap["lr"] == pytest.approx(LR * factor)
    # the run goes on at the lowered LR to max_steps
    assert trainer.step == 6
    assert rec.metrics[-1]["lr"] == pytest.approx(LR * factor)
    assert rec.metrics[-1]["guard/rollbacks"] == 1.0 and rec.metrics[-1]["guard/skipped_steps"] == 2.0
    assert [e["kind"] for e in trainer.events] == [SKIP, ROLLBACK]
    assert _all_finite(trainer)


def test_loss_spike_rolls_back(tiny_cfg):
    factor = 0.5
    # The SFT loss is a plain denoising error (~1) that does not collapse towards 0 the way a DPO loss
    # can, so x1e6 is a spike whatever the batch.
    trainer, faults, rec = _make(
        tiny_cfg, "train.max_steps=9", "guard.spike_min_history=5", "guard.spike_sigmas=6",
        "train.checkpoint_every=3", f"guard.lr_factor={factor}", "objective.name=sft",
        "reference.strategy=none",
        faults=Faults(loss_faults={8: (1e6, 1)}),
    )
    trainer.fit()
    losses = [m["loss"] for m in rec.metrics]
    assert all(0.01 < x < 10.0 for x in losses), losses
    assert [e["kind"] for e in rec.events] == [ROLLBACK]
    event, snap = rec.events[0], rec.after[0]
    assert "spike" in event["reason"]
    assert event["restored"].endswith("checkpoint-6")
    weights, state = snap["checkpoint"]
    assert _equal(snap["weights"], weights)
    for i, s in state["engine"]["optimizer"]["state"].items():
        assert torch.equal(snap["optim"]["state"][i]["exp_avg"], s["exp_avg"])
    assert snap["lr"] == pytest.approx(LR * factor)
    assert trainer.step == 9 and trainer.guard.rollbacks == 1 and trainer.guard.skipped == 0
    assert _all_finite(trainer)


def test_too_many_rollbacks_raise(tiny_cfg):
    always = {s: (float("nan"), 100) for s in range(1, 10)}
    trainer, faults, rec = _make(tiny_cfg, "train.max_steps=6", "guard.max_bad_steps=1",
                                 "guard.max_rollbacks=2", faults=Faults(loss_faults=always))
    with pytest.raises(TrainingDiverged, match="rollbacks") as info:
        trainer.fit()
    assert "non-finite" in str(info.value)
    assert [e["kind"] for e in rec.events] == [ROLLBACK, ROLLBACK]
    assert trainer.guard.rollbacks == 2
    assert _all_finite(trainer)


def test_disabled_guard_lets_everything_through():
    guard = StabilityGuard(enabled=False)
    assert guard.check(float("nan"), False) == "ok"
    on = StabilityGuard(max_bad_steps=2, min_history=3, spike_sigmas=3)
    assert [on.check(x, True) for x in (1.0, 1.1, 0.9)] == ["ok"] * 3
    assert on.check(1.05, True) == "ok"
    assert on.check(50.0, True) == ROLLBACK
    assert on.check(float("inf"), True) == SKIP
    assert on.check(1.0, False) == ROLLBACK


# ------------------------------------------------------------------ saturation and the spike floor


def _fed(guard: StabilityGuard, losses, grad_norm=None) -> list[str]:
    return [guard.check(x, True, grad_norm) for x in losses]


def test_spike_floor_follows_the_scale_of_the_loss():
    # A window of (near-)constant small losses has std ~0: without a floor any bump is "6 sigma".
    guard = StabilityGuard(spike_sigmas=6, window=5, min_history=5)
    assert _fed(guard, [0.69] * 5 + [1e-4] * 5) == [OK] * 10
    assert guard.scale == pytest.approx(0.69)  # the loss's scale: its first min_history good losses
    # the floor is SPIKE_FLOOR_REL of that scale: 1e-4 + 6 * 0.069
    assert guard.spike_threshold() == pytest.approx(1e-4 + 6 * SPIKE_FLOOR_REL * 0.69)
    assert guard.check(0.05, True) == OK  # 500x the window, a tenth of the loss's scale: not a spike
    assert guard.check(5.0, True) == ROLLBACK and "spike" in guard.last_reason
    assert guard.saturation is None  # 1e-4 is small, not saturated


def test_a_jump_after_a_saturated_stretch_is_not_a_divergence(caplog):
    guard = StabilityGuard(spike_sigmas=6, min_history=5)
    with caplog.at_level(logging.WARNING, logger="diffalign.train.guards"):
        assert _fed(guard, [0.69, 0.5, 0.3, 0.1, 0.05] + [0.0] * (SATURATION_STEPS - 1)) == [OK] * 14
        assert guard.saturation is None and not guard.saturated
        assert guard.check(0.0, True) == OK  # the SATURATION_STEPS-th step at ~0: saturated
        assert guard.saturated and "Lower objective.beta or optim.lr" in guard.saturation
        # The loss of a pair the saturated model gets wrong: huge against a window of zeros, trained on.
        assert guard.check(2369.0, True) == OK and not guard.saturated
        assert guard.rollbacks == 0
        assert _fed(guard, [0.0] * (2 * SATURATION_STEPS)) == [OK] * (2 * SATURATION_STEPS)
        assert guard.check(float("nan"), True) == SKIP  # non-finite is still caught when saturated
    warnings = [r for r in caplog.records if "the loss has saturated" in r.getMessage()]
    assert len(warnings) == 1  # once per run, though it saturated twice


def test_saturation_needs_a_vanishing_gradient_where_the_loop_reports_it():
    guard = StabilityGuard(min_history=5)
    _fed(guard, [1e-8] * 2 * SATURATION_STEPS, grad_norm=1e-3)
    assert not guard.saturated and guard.saturation is None
    _fed(guard, [1e-8] * SATURATION_STEPS, grad_norm=0.0)
    assert guard.saturated and guard.saturation is not None
    # without a gradient norm (grad_norm=None), the loss alone decides: a -logsigmoid loss below 1e-6
    # has a gradient ~1e-6 of an unsaturated one
    alone = StabilityGuard(min_history=5)
    _fed(alone, [0.0] * SATURATION_STEPS)
    assert alone.saturated


def test_disabled_guard_still_notes_saturation():
    guard = StabilityGuard(enabled=False)
    assert _fed(guard, [0.0] * SATURATION_STEPS) == [OK] * SATURATION_STEPS
    assert guard.saturation is not None


def test_guard_state_round_trips_scale_and_saturation():
    guard = StabilityGuard(min_history=3)
    _fed(guard, [0.6, 0.7, 0.8] + [0.0] * 4)
    other = StabilityGuard(min_history=3)
    other.load_state_dict(guard.state_dict())
    assert other.scale == pytest.approx(0.7) and other.saturated_steps == 4
    assert list(other.history) == list(guard.history)


def test_a_resume_after_giving_up_gets_a_new_rollback_budget(tiny_cfg):
    """A run that gave up after guard.max_rollbacks rollbacks left checkpoints holding its rollback
    count; resuming it used to inherit the count and give up at its first failure, without training."""
    common = ("train.max_steps=8", "guard.max_bad_steps=1", "guard.max_rollbacks=1",
              "train.checkpoint_every=2", "train.keep_checkpoints=10")
    # Step 3 fails once (rolled back to checkpoint-2), step 5 always: the second rollback is one too many.
    first, _, rec = _make(tiny_cfg, *common, faults=Faults(loss_faults={3: (float("nan"), 1),
                                                                        5: (float("nan"), 100)}))
    with pytest.raises(TrainingDiverged, match="1 rollbacks already"):
        first.fit()
    first.close()
    assert [e["kind"] for e in rec.events] == [ROLLBACK] and first.step == 4
    _, state = load_checkpoint(first.checkpoint_dir / "checkpoint-4")
    assert state["guard"]["rollbacks"] == 1  # what the resumed run finds
    # The same command again: resumed from checkpoint-4; step 5 fails once more and is rolled back
    # (the budget is this attempt's), then the run trains to the end at the lowered learning rate.
    again, _, rec2 = _make(tiny_cfg, *common, faults=Faults(loss_faults={5: (float("nan"), 1)}))
    again.fit()
    again.close()
    assert again.step == 8 and [e["kind"] for e in rec2.events] == [ROLLBACK]
    assert rec2.events[0]["restored"].endswith("checkpoint-4")
    assert again.guard.rollbacks == 1 and again.guard.total_rollbacks == 2
    assert rec2.metrics[-1]["lr"] == pytest.approx(LR * 0.5 * 0.5)  # both attempts' lowered rates
    _, state = load_checkpoint(again.checkpoint_dir / "checkpoint-8")
    assert state["guard"]["earlier_rollbacks"] == 1 and state["guard"]["rollbacks"] == 1
