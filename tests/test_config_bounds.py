"""Config errors that say where: YAML syntax errors name the file, line and column; an empty or
non-mapping config file is refused naming it; every numeric field (found by walking the schema's
dataclasses, nested sections included) has a bound checked at load, so 0, -1 or "abc" either trains
or fails in `load_config` naming the field - never a ZeroDivisionError or an IndexError steps into a
run. The objective's hyperparameters (found from the objective constructors) are walked the same way.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest
from diffalign.config import ConfigError, RunConfig, load_config
from diffalign.config.validate import NUMERIC_BOUNDS
from diffalign.objectives import OBJECTIVES, objective_hyperparameters, objective_needs_reference

# ------------------------------------------------------------------ YAML files


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("objective:\n  name: dpo\n  beta: [500\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "line 4, column 6" in msg, msg  # where the parser gave up (1-based)
    assert "line 3, column 9" in msg  # and where the unclosed [ started
    assert "train:" in msg  # the offending line is quoted


def test_tab_indentation_is_a_config_error(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("train:\n\tmax_steps: 3\n")
    with pytest.raises(ConfigError, match=r"tabs\.yaml: invalid YAML at line 2, column 1"):
        load_config(path)


def test_bad_yaml_in_an_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"override objective\.beta=\[1,"):
        load_config(None, ["objective.beta=[1,"])


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_config_file_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="is empty") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_explicit_empty_mapping_means_defaults(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    assert load_config(path) == load_config(None)


@pytest.mark.parametrize("text, kind", [("- model\n- train\n", "list"), ("dpo\n", "str"), ("3\n", "int")])
def test_non_mapping_config_file_is_refused(tmp_path, text, kind):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"expected a mapping of sections.*got a {kind}") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_config_directory_or_binary_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    binary = tmp_path / "weights.safetensors"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match="weights.safetensors cannot be read as YAML text"):
        load_config(binary)


# ------------------------------------------------------------------ numeric bounds


def _numeric(hint) -> bool:
    if hint in (int, float):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return len(inner) == 1 and _numeric(inner[0])
    return origin is tuple and bool(args) and all(a in (int, float) for a in args)


def _walk(cls, prefix=""):
    """(dotted path, type hint) of every numeric field of `cls` and its nested dataclass sections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _walk(hint, f"{prefix}{f.name}.")
        elif _numeric(hint):
            yield f"{prefix}{f.name}", hint


NUMERIC = dict(_walk(RunConfig))
BASE = ["train.max_steps=2", "train.progress=false", "train.eval_every=0", "data.num_pairs=4",
        "data.heldout_pairs=2", "optim.batch_size=2", "tracking.mlflow=false", "model.finetune=full",
        "guard.enabled=false", "train.checkpoint_every=1000"]


def test_the_walk_finds_nested_and_optional_fields():
    for path in ("ray.sampler.num", "ray.sampler.guidance_scale", "train.ema_decay", "model.lora_alpha",
                 "optim.betas", "data.read_block_rows", "data.shuffle_blocks", "prepare.gpus_per_actor"):
        assert path in NUMERIC
    assert len(NUMERIC) > 80


def test_every_numeric_field_has_one_bound():
    missing = sorted(set(NUMERIC) - set(NUMERIC_BOUNDS))
    stale = sorted(set(NUMERIC_BOUNDS) - set(NUMERIC))
    assert not missing, f"add a bound to diffalign.config.validate.NUMERIC_BOUNDS for: {missing}"
    assert not stale, f"NUMERIC_BOUNDS names fields the schema no longer has: {stale}"


def _get(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny model shared by every step below (a full fine-tune: no adapters to stack), and the
    base config."""
    from diffalign.models.build import build_policy

    out = tmp_path_factory.mktemp("bounds")
    base = [f"train.output_dir={out}/run", *BASE]
    cfg = load_config(None, base)
    bundle, _ = build_policy(cfg)
    return base, cfg, bundle


def _one_step(cfg: RunConfig, bundle, fresh_model: bool) -> dict:
    from diffalign.train.driver import build_trainer
    from diffalign.train.setup import build_setup

    setup = build_setup(cfg, "cpu") if fresh_model else build_setup(cfg, "cpu", bundle=bundle)
    trainer = build_trainer(cfg, setup=setup, device="cpu")
    try:
        metrics = trainer.train_step()
    finally:
        trainer.close()
    assert metrics and math.isfinite(metrics["loss"]), metrics
    return metrics


def _values(hint) -> tuple:
    if typing.get_origin(hint) is tuple:
        n = len(typing.get_args(hint))
        return ("[" + ", ".join(["0"] * n) + "]", "[" + ", ".join(["-1"] * n) + "]", "abc", "0")
    return ("0", "-1", "abc")


@pytest.mark.parametrize("path", sorted(NUMERIC))
def test_numeric_field_loads_and_trains_or_fails_at_load_naming_it(path, tiny):
    base, base_cfg, bundle = tiny
    for value in _values(NUMERIC[path]):
        try:
            cfg = load_config(None, [*base, f"{path}={value}"])
        except ConfigError as e:
            assert path in str(e), f"{path}={value}: the error does not name the field: {e}"
            continue
        assert value != "abc", f"{path}=abc loaded"
        if _get(cfg, path) == _get(base_cfg, path):
            continue  # the base value: every other test trains with it
        _one_step(cfg, bundle, fresh_model=path.startswith("model."))


HYPERPARAMETERS = [(name, key) for name in OBJECTIVES
                   for key, default in objective_hyperparameters(name).items()
                   if not isinstance(default, bool)]


@pytest.mark.parametrize("name, key", HYPERPARAMETERS)
def test_objective_hyperparameter_loads_and_trains_or_fails_at_load_naming_it(name, key, tiny):
    base, _, bundle = tiny
    strategy = "frozen" if objective_needs_reference(name) else "none"
    for value in ("0", "-1", "abc"):
        try:
            cfg = load_config(None, [*base, f"objective.name={name}", f"reference.strategy={strategy}",
                                     f"objective.{key}={value}"])
        except ConfigError as e:
            assert f"objective.{key}" in str(e), f"objective.{key}={value}: {e}"
            continue
        assert value != "abc"
        _one_step(cfg, bundle, fresh_model=False)


@pytest.mark.parametrize("override, message", [
    ("train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("data.num_pairs=0", "data.num_pairs must be >= 1, got 0"),
    ("data.heldout_pairs=-1", "data.heldout_pairs must be >= 0 (0: no held-out set), got -1"),
    ("optim.lr=nan", "optim.lr must be > 0, got nan"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1] must be in [0, 1)"),
    ("train.ema_decay=1", "train.ema_decay must be in (0, 1), got 1.0"),
    ("guard.spike_min_history=1", "guard.spike_min_history must be >= 2"),
    ("ray.max_failures=-2", "ray.max_failures must be >= -1"),
    ("guard.spike_window=10", "guard.spike_min_history=20 exceeds guard.spike_window=10"),
])
def test_bound_errors_say_the_rule(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_optional_numeric_fields_accept_null():
    optional = [p for p, h in NUMERIC.items() if type(None) in typing.get_args(h)]
    assert "train.ema_decay" in optional and "model.lora_alpha" in optional
    cfg = load_config(None, [f"{p}=null" for p in optional])
    assert all(_get(cfg, p) is None for p in optional)
