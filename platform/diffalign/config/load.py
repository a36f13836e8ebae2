"""Loading a config: YAML -> dataclasses, `--set section.field=value` overrides, saving.

Types are checked as the dataclasses declare them (an int field refuses 2.5); the objective section's
hyperparameters are checked against the objective constructor's signature. `validate` runs last.
A config file that is not valid YAML, is empty or is not a mapping of sections fails as a ConfigError
naming the file (and the line and column of a syntax error), so recipes print it without a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path

import yaml

from diffalign.config.schema import ConfigError, ObjectiveConfig, RunConfig
from diffalign.config.validate import validate
from diffalign.objectives import OBJECTIVES, objective_hyperparameters


def _build(cls, data: dict, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join((path + '.' if path else '') + k for k in unknown)}; "
            f"allowed in {path or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        fpath = f"{path}.{name}" if path else name
        hint = hints[name]
        if hint is ObjectiveConfig:
            kwargs[name] = _build_objective(value or {}, fpath)
        elif dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, fpath)
        else:
            kwargs[name] = _coerce(value, hint, fpath)
    return cls(**kwargs)


def _build_objective(data: dict, path: str) -> ObjectiveConfig:
    """`{name, ...hyperparameters}`, each checked against the objective constructor's signature."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    name = _coerce(data.pop("name", ObjectiveConfig.name), str, f"{path}.name")
    if name not in OBJECTIVES:
        raise ConfigError(f"{path}.name={name!r} is not allowed; choose one of: {', '.join(OBJECTIVES)}")
    accepted = objective_hyperparameters(name)
    hints = typing.get_type_hints(OBJECTIVES[name].__init__)
    params = {}
    for key, value in data.items():
        if value is None:  # `--set objective.x=null` unsets a hyperparameter
            continue
        if key not in accepted:
            raise ConfigError(
                f"{path}.{key} is not a hyperparameter of objective {name!r}; accepted: "
                f"{', '.join(accepted) or 'none'} (set {path}.{key}=null to drop it)"
            )
        params[key] = _coerce(value, hints.get(key, float), f"{path}.{key}")
    return ObjectiveConfig(name=name, hyperparameters=params)


def _coerce(value, hint, path: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is typing.Any:
            return None
        raise ConfigError(f"{path}: may not be null")
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint in (int, float):
        try:
            if isinstance(value, bool):  # YAML true/false is not a number
                raise ValueError
            num = float(value)
            if hint is int:
                if not num.is_integer():  # 2.5 or "2.5" for an int field is an error, not 2
                    raise ValueError
                return value if isinstance(value, int) else int(num)
            return num
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}") from None
    if hint is str:
        if isinstance(value, bool):
            # YAML 1.1 reads `no` / `yes` as booleans; for text fields (mixed_precision: no) keep the word.
            return "yes" if value else "no"
        return str(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, path) for v, a in zip(value, args))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    return value


def _parse_scalar(text: str, key: str = ""):
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise _yaml_error(f"override {key}={text}", e) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies `a.b.c=value` strings (value parsed as YAML) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = _parse_scalar(raw, key.strip())
    return data


def _yaml_error(source: str, e: yaml.YAMLError, text: str | None = None) -> ConfigError:
    """`source`: line L, column C: what the YAML parser found (1-based, as editors count), the line
    itself, and where the construct it was parsing started."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is None:
        return ConfigError(f"{source}: invalid YAML: {problem}")
    msg = f"{source}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None:
        msg += f" ({context} started at line {cmark.line + 1}, column {cmark.column + 1})"
    lines = (text or "").splitlines()
    if 0 <= mark.line < len(lines):
        msg += f"\n    {lines[mark.line]}\n    {' ' * mark.column}^"
    return ConfigError(msg)


def read_config_file(path: str | os.PathLike) -> dict:
    """The YAML mapping of a config file. A syntax error, an empty file or one that is not a mapping of
    sections is a ConfigError naming the file (and the line and column of a syntax error)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; pass a YAML file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be read as YAML text: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(str(p), e, text) from None
    if data is None:
        # An empty file would silently train the all-defaults config: never what was meant.
        raise ConfigError(f"config file {p} is empty; it must hold sections such as model:, objective:, "
                          "train: (a file holding only {} means all defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of sections (model:, objective:, train:, "
                          f"...), got a {type(data).__name__}: {str(data)[:80]!r}")
    return data


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, validate_paths: bool = True
) -> RunConfig:
    """Reads a YAML config, applies overrides, validates. Raises ConfigError naming the field."""
    data: dict = {}
    if path is not None:
        data = read_config_file(path)
    data = apply_overrides(data, overrides or [])
    cfg = _build(RunConfig, data, "")
    validate(cfg, check_paths=validate_paths)
    return cfg


def config_from_dict(data: dict, check_paths: bool = True) -> RunConfig:
    cfg = _build(RunConfig, copy_dict(data), "")
    validate(cfg, check_paths=check_paths)
    return cfg


def copy_dict(d: dict) -> dict:
    return json.loads(json.dumps(d))


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
