"""The one driver and the defaults in one place: the Trainer is constructed only by
`build_trainer`, every runtime goes through it, and each default of a component is the config's."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffalign.config import (
    ConfigError,
    GuardConfig,
    OnlineConfig,
    ReferenceConfig,
    SamplerPoolConfig,
    TimestepConfig,
    config_from_dict,
    load_config,
)
from diffalign.objectives import XDPOObjective
from diffalign.train.driver import Runtime, build_trainer

ROOT = Path(__file__).resolve().parents[1]


def _calls_to(name: str, roots: list[Path]) -> list[str]:
    """`file:line` of every call of `name(...)` or `x.name(...)` under `roots`."""
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    f = node.func
                    called = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                    if called == name:
                        found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def test_the_trainer_is_constructed_in_exactly_one_library_place():
    calls = _calls_to("Trainer", [ROOT / "platform", ROOT / "actors", ROOT / "recipes"])
    assert len(calls) == 1 and calls[0].startswith("platform/diffalign/train/driver.py"), calls


def test_the_call_finder_sees_a_construction(tmp_path):
    # Negative control for the test above: constructions in a function or through a module are found.
    (tmp_path / "x.py").write_text("import m\nfrom m import Trainer\n\ndef f(cfg):\n    return Trainer(cfg)\n"
                                   "\nt = m.Trainer(None)\n")
    assert sorted(_calls_to("Trainer", [tmp_path])) == [f"{tmp_path.name}/x.py:5", f"{tmp_path.name}/x.py:7"]


def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def test_component_defaults_are_the_config_defaults():
    from diffalign.reference import build_reference
    from diffalign.timesteps import SkewedTimesteps, build_timestep_sampler
    from diffalign.train.guards import StabilityGuard

    g = GuardConfig()
    assert (_default(StabilityGuard, "max_bad_steps"), _default(StabilityGuard, "spike_sigmas"),
            _default(StabilityGuard, "window"), _default(StabilityGuard, "min_history"),
            _default(StabilityGuard, "enabled")) == (g.max_bad_steps, g.spike_sigmas, g.spike_window,
                                                     g.spike_min_history, g.enabled)
    t = TimestepConfig()
    for fn in (SkewedTimesteps, build_timestep_sampler):
        assert (_default(fn, "gamma"), _default(fn, "num_bins")) == (t.timestep_gamma, t.num_bins)
    r = ReferenceConfig()
    assert (_default(build_reference, "tau"), _default(build_reference, "delta"),
            _default(build_reference, "on_exceed")) == (r.tau, r.delta, r.on_exceed)


def test_online_defaults_are_the_config_defaults():
    pytest.importorskip("ray")
    from diffalign.actors.online import OnlineSyncCallback, OnPolicyPairs

    on, s = OnlineConfig(), SamplerPoolConfig()
    assert (_default(OnPolicyPairs, "mode"), _default(OnPolicyPairs, "max_staleness"),
            _default(OnPolicyPairs, "buffer_size"), _default(OnPolicyPairs, "samples_per_request"),
            _default(OnPolicyPairs, "sync_every"), _default(OnlineSyncCallback, "sync_every")) == (
        on.mode, on.max_staleness, on.buffer_size, on.samples_per_request, s.sync_every, s.sync_every)


# ------------------------------------------------------------------ the objective section


def test_objective_hyperparameters_default_to_the_constructor_and_reach_it(tiny_cfg):
    cfg = tiny_cfg("objective.name=xdpo", "objective.max_exponent=7.5", "objective.beta=300")
    defaults = inspect.signature(XDPOObjective).parameters
    assert cfg.objective.gamma == defaults["gamma"].default and cfg.objective.max_exponent == 7.5
    assert cfg.objective.hyperparameters == {"max_exponent": 7.5, "beta": 300.0}
    flat = cfg.flat()  # MLflow records every value the run used, defaults included
    assert flat["objective.gamma"] == defaults["gamma"].default and flat["objective.max_exponent"] == 7.5
    trainer = build_trainer(cfg)
    objective = trainer.setup.step.objective
    assert isinstance(objective, XDPOObjective)
    assert (objective.max_exponent, objective.beta) == (7.5, 300.0)
    # The YAML form round-trips: only the values that were set are written.
    assert cfg.to_dict()["objective"] == {"name": "xdpo", "max_exponent": 7.5, "beta": 300.0}
    again = config_from_dict(cfg.to_dict())
    assert again.objective.params() == cfg.objective.params()


@pytest.mark.parametrize("overrides, field", [
    (["objective.name=dpo", "objective.margin_weight=0.2"], "objective.margin_weight"),
    (["objective.name=sft", "objective.beta=10"], "objective.beta"),
    (["objective.name=xdpo", "objective.xdpo_gamma=0.2"], "objective.xdpo_gamma"),
    (["objective.name=mapo", "objective.snr_value=-1"], "objective.snr_value"),
    (["objective.name=xdpo", "objective.n=abc"], "objective.n"),
])
def test_objective_section_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*overrides, "reference.strategy=none" if "sft" in overrides[0] or "mapo" in
                           overrides[0] else "reference.strategy=frozen"])
    assert field in str(err.value)


def test_a_hyperparameter_set_to_null_is_dropped():
    cfg = load_config(ROOT / "configs/tiny/mapo.yaml",
                      ["objective.name=dpo", "objective.margin_weight=null", "reference.strategy=frozen",
                       "objective.beta=700"])
    assert cfg.objective.hyperparameters == {"beta": 700.0}


def test_style_preset_names_are_the_curate_presets():
    from diffalign.config.schema import STYLE_PRESET_NAMES
    from diffalign.curate.styles import STYLE_PRESETS

    assert set(STYLE_PRESET_NAMES) == set(STYLE_PRESETS)


# ------------------------------------------------------------------ runtime and callbacks


def test_runtime_fields_reach_the_trainer_and_callbacks_replace_hooks(tiny_cfg, tmp_path):
    class ZeroLoss:
        """Zeroes every micro-batch loss: no gradient, so AdamW only decays the weights."""

        def __init__(self) -> None:
            self.after = 0

        def on_before_backward(self, trainer, loss):
            return loss * 0.0

        def on_after_backward(self, trainer, params):
            self.after += 1
            assert all(p.grad is None or not p.grad.any() for p in params)

    cfg = tiny_cfg("train.max_steps=2", "optim.weight_decay=0")
    cb = ZeroLoss()
    trainer = build_trainer(cfg, Runtime(device="cpu", callbacks=[cb], checkpoint_dir=tmp_path / "ck"))
    before = {k: v.clone() for k, v in trainer.trainable_weights().items()}
    trainer.fit()
    assert cb.after == 2 and trainer.checkpoint_dir == tmp_path / "ck"
    after = trainer.trainable_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no gradient, no decay: unchanged
    # Negative control: without the callback the same run moves the weights.
    plain = build_trainer(cfg, device="cpu", checkpoint_dir=tmp_path / "ck2")
    plain.fit()
    assert any(not torch.equal(before[k], v) for k, v in plain.trainable_weights().items())


def test_recipe_common_changes_no_environment_at_import():
    code = ("import os, sys; sys.path.insert(0, 'recipes'); before = dict(os.environ); import _common; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "DS_ACCELERATOR")}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
