"""Config loading, `--set` overrides and validation errors that name the offending field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from diffalign.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def _load(*overrides: str, validate_paths: bool = True) -> RunConfig:
    return load_config(None, list(overrides), validate_paths=validate_paths)


def _error(*overrides: str, validate_paths: bool = True) -> str:
    with pytest.raises(ConfigError) as info:
        _load(*overrides, validate_paths=validate_paths)
    return str(info.value)


def test_defaults_validate():
    cfg = _load()
    assert isinstance(cfg, RunConfig)
    assert cfg.objective.name == "dpo" and cfg.reference.strategy == "frozen"


# ------------------------------------------------------------------ unknown keys and types


def test_unknown_top_level_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"modle": {"family": "sd15"}}))
    with pytest.raises(ConfigError, match="modle"):
        load_config(path)


def test_unknown_nested_key_names_the_dotted_path():
    msg = _error("objective.betta=10")
    assert "objective.betta" in msg
    assert "beta" in msg  # the allowed keys are listed


def test_unknown_deeply_nested_key():
    msg = _error("ray.sampler.nmu=2")
    assert "ray.sampler.nmu" in msg


@pytest.mark.parametrize(
    "override, field",
    [("train.max_steps=abc", "train.max_steps"), ("optim.batch_size=2.5", "optim.batch_size"),
     ("optim.lr=fast", "optim.lr"), ("train.progress=maybe", "train.progress"),
     ("optim.betas=[0.9]", "optim.betas"), ("model.family=null", "model.family"),
     ("optim.lr=true", "optim.lr"), ("train.max_steps=false", "train.max_steps"),
     ("train.max_steps='2.5'", "train.max_steps"), ("objective.beta=inf_", "objective.beta")],
)
def test_wrong_types_name_the_field(override, field):
    assert field in _error(override)


def test_section_that_is_not_a_mapping():
    assert "model" in _error("model=3")


def test_config_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------ value checks


@pytest.mark.parametrize("beta", ["0", "-1", "-0.5"])
def test_beta_must_be_positive(beta):
    assert "objective.beta" in _error(f"objective.beta={beta}")


@pytest.mark.parametrize("tau", ["0", "-3"])
def test_tau_at_least_one(tau):
    assert "reference.tau" in _error(f"reference.tau={tau}")


@pytest.mark.parametrize("delta", ["0", "-0.001"])
def test_delta_positive(delta):
    assert "reference.delta" in _error(f"reference.delta={delta}")


@pytest.mark.parametrize("gamma", ["0", "1.5", "-0.2"])
def test_timestep_gamma_outside_unit_interval(gamma):
    assert "timesteps.timestep_gamma" in _error(f"timesteps.timestep_gamma={gamma}")


@pytest.mark.parametrize("gamma", ["1.0", "1", "0.5", "0.01"])
def test_timestep_gamma_inside_unit_interval(gamma):
    assert _load(f"timesteps.timestep_gamma={gamma}").timesteps.timestep_gamma == float(gamma)


def test_pickapic_needs_a_path():
    msg = _error("data.kind=pickapic")
    assert "data.path" in msg and "pickapic" in msg


def test_data_path_must_exist(tmp_path):
    missing = tmp_path / "absent.parquet"
    msg = _error("data.kind=pickapic", f"data.path={missing}")
    assert "data.path" in msg and str(missing) in msg
    # the same config is accepted when paths are not checked, and when the path exists
    assert _load("data.kind=pickapic", f"data.path={missing}", validate_paths=False).data.path == str(missing)
    missing.write_bytes(b"")
    assert _load("data.kind=pickapic", f"data.path={missing}").data.kind == "pickapic"


@pytest.mark.parametrize("objective", ["dpo", "xdpo"])
def test_reference_objective_without_reference(objective):
    msg = _error(f"objective.name={objective}", "reference.strategy=none")
    assert "reference.strategy" in msg and objective in msg


@pytest.mark.parametrize("strategy", ["frozen", "periodic", "periodic_threshold"])
def test_mapo_with_a_reference_strategy(strategy):
    msg = _error("objective.name=mapo", f"reference.strategy={strategy}")
    assert "reference.strategy" in msg and "mapo" in msg


def test_reference_free_objectives_accept_none():
    for name in ("mapo", "sft"):
        assert _load(f"objective.name={name}", "reference.strategy=none").objective.name == name


@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("model.family=sd2", "model.family", ["sd15", "sdxl", "sd3", "flux", "qwenimage"]),
        ("model.finetune=half", "model.finetune", ["lora", "full"]),
        ("model.mixed_precision=fp8", "model.mixed_precision", ["no", "bf16", "fp16"]),
        ("objective.name=ppo", "objective.name", ["sft", "dpo", "mapo", "xdpo"]),
        ("reference.strategy=ema", "reference.strategy",
         ["none", "frozen", "periodic", "periodic_threshold"]),
        ("reference.on_exceed=stop", "reference.on_exceed", ["freeze", "reinit"]),
        ("timesteps.sampler=beta", "timesteps.sampler", ["uniform", "skewed", "logit_normal", "mode"]),
        ("timesteps.reward_scale=snr", "timesteps.reward_scale",
         ["constant", "inv_sqrt_snr", "sigma_sqrt", "cosmap"]),
        ("data.kind=zip", "data.kind", ["synthetic", "pickapic", "folder"]),
        ("ray.backend=horovod", "ray.backend", ["ddp", "deepspeed"]),
    ],
)
def test_bad_enum_lists_allowed_values(override, field, allowed):
    msg = _error(override)
    assert field in msg
    for value in allowed:
        assert value in msg


# ------------------------------------------------------------------ overrides and flattening


def test_overrides_parse_numbers_bools_and_null(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"objective": {"name": "dpo", "beta": 5000}, "train": {"max_steps": 10}}))
    cfg = load_config(path, ["objective.beta=2000", "train.max_steps=7", "train.progress=false",
                             "train.ema_decay=0.99", "model.lora_alpha=null", "optim.lr=3e-4",
                             "train.output_dir=runs/x"])
    assert cfg.objective.beta == 2000.0 and isinstance(cfg.objective.beta, float)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.progress is False
    assert cfg.train.ema_decay == pytest.approx(0.99)
    assert cfg.model.lora_alpha is None
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.output_dir == "runs/x"
    assert load_config(path, ["train.max_steps='12'"]).train.max_steps == 12  # a quoted whole number is fine
    # later overrides win over earlier ones and over the file
    assert load_config(path, ["objective.beta=1", "objective.beta=3"]).objective.beta == 3.0
    assert load_config(path).objective.beta == 5000.0


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="section.field=value"):
        _load("objective.beta")


def test_flat_gives_dotted_keys():
    flat = _load("objective.beta=123").flat()
    assert flat["objective.beta"] == 123.0
    assert flat["model.family"] == "sd15"
    assert flat["ray.sampler.num"] == 1  # nested sections flatten all the way down
    assert "optim.betas" in flat and "model" not in flat
    assert all("." in key for key in flat)


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").glob("**/*.yaml")) if (REPO / "configs").is_dir() else []
    if not configs:
        pytest.skip("no YAML under configs/")
    for path in configs:
        cfg = load_config(path, validate_paths=False)
        assert isinstance(cfg, RunConfig), path
