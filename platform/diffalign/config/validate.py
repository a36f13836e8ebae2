"""Config checks that span fields: allowed values, ranges, and combinations. Each error names the
field and the allowed values; invalid configs fail here, before any model is built or worker started.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json
import math
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diffalign.config.schema import (
    DATA_KINDS,
    LATENT_SAMPLING,
    LEARNER_STRATEGIES,
    ONLINE_MODES,
    PREPARE_DTYPES,
    PREPARE_LATENTS,
    RAY_PLACEMENTS,
    STYLE_PRESET_NAMES,
    ConfigError,
    RunConfig,
)
from diffalign.models.families import (
    FAMILIES,
    FLOW_FAMILIES,
    PIPELINE_CLASS_NAMES,
    REQUIRED_COMPONENTS,
    SD3_T5_COMPONENTS,
)
from diffalign.models.precision import MIXED_PRECISION, REFERENCE_DTYPES
from diffalign.objectives import OBJECTIVES, build_objective, objective_needs_reference
from diffalign.reference.names import DIVERGENCES, ON_EXCEED, STRATEGIES
from diffalign.specs import EVAL_ONLY_SCORERS, SCORER_NAMES, parse_scorers, parse_seeds, resolve_path
from diffalign.timesteps import (
    FLOW_ONLY_REWARD_SCALES,
    MODE_SCALE_MAX,
    MODE_SCALE_MIN,
    REWARD_SCALES,
    TIMESTEP_SAMPLERS,
)

# ------------------------------------------------------------------ bounds of the numeric fields


@dataclass(frozen=True)
class Bound:
    """An interval of allowed values, closed unless `*_open`; None: unbounded on that side. In the error,
    `what` comes before the rule (what the value is) and `note` after it (what edge values mean)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""
    what: str = ""

    def holds(self, v: float) -> bool:
        if not math.isfinite(v):  # nan compares false both ways; inf is no setting
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def rule(self) -> str:
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            rule = f"in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
        elif self.lo is not None:
            rule = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        else:
            rule = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        rule = f"{self.what} {rule}" if self.what else rule
        return f"{rule} ({self.note})" if self.note else rule


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _at_least(lo: float, note: str = "") -> Bound:
    return Bound(lo=lo, note=note)


_POSITIVE = Bound(lo=0, lo_open=True)
_COUNT = _at_least(1)  # a number of things, a period or a size
_OFF_OR_PERIOD = _at_least(0, "0: off")
_RESOURCE = _at_least(0)  # Ray CPUs / GPUs: 0 asks for none
_SEED = _at_least(0)

# Every int / float field of the schema (`section.field`, nested sections too): its allowed interval,
# checked first by `validate` so a bad number fails at load naming the field, before it can become a
# ZeroDivisionError or an IndexError steps into a run. None is allowed where the field is Optional.
# The objective's hyperparameters are checked by the objective constructors (`_validate_objective`).
# tests/test_config_bounds.py fails when a numeric field has no entry here.
NUMERIC_BOUNDS: dict[str, Bound] = {
    "model.resolution": _at_least(8, "a multiple of 8"),
    "model.tiny_seed": _SEED,
    "model.lora_rank": _COUNT,
    "model.lora_alpha": _POSITIVE,
    "model.flow_shift": _POSITIVE,
    "model.flux_guidance": _at_least(0),
    "model.max_sequence_length": _COUNT,
    "timesteps.logit_mean": Bound(-10, 10, what="a logit-normal mean"),
    "timesteps.logit_std": _POSITIVE,
    "timesteps.mode_scale": Bound(MODE_SCALE_MIN, MODE_SCALE_MAX, note="where the mode map is monotone"),
    "reference.tau": _COUNT,
    "reference.delta": _POSITIVE,
    "reference.delta_eps_mse": _POSITIVE,
    "reference.divergence_samples": _COUNT,
    "timesteps.timestep_gamma": Bound(0, 1, lo_open=True),
    # The SD1.5 / SDXL schedulers (and the tiny models) have 1000 training timesteps.
    "timesteps.num_bins": Bound(1, 1000, note="bins of the 1000 training timesteps"),
    "data.num_pairs": _COUNT,
    "data.heldout_pairs": _at_least(0, "0: no held-out set"),
    "data.max_samples": _COUNT,
    "data.read_block_rows": _COUNT,
    "data.shuffle_blocks": _COUNT,
    "data.num_workers": _at_least(0, "0: read in the step"),
    "data.mismatch_probe_n": _COUNT,
    "optim.lr": _POSITIVE,
    "optim.text_encoder_lr": _POSITIVE,
    "optim.weight_decay": _at_least(0),
    "optim.betas": Bound(0, 1, hi_open=True, note="Adam's moment decays"),
    "optim.eps": _POSITIVE,
    "optim.grad_clip": _at_least(0, "0: no clipping"),
    "optim.warmup_steps": _at_least(0),
    "optim.batch_size": _COUNT,
    "optim.grad_accum": _COUNT,
    "train.max_steps": _COUNT,
    "train.seed": _SEED,
    "train.checkpoint_every": _COUNT,
    "train.keep_checkpoints": _at_least(0, "0: keep all"),
    "train.eval_every": _OFF_OR_PERIOD,
    "train.sample_every": _at_least(0, "0: only at the end"),
    "train.score_every": _OFF_OR_PERIOD,
    "train.log_every": _COUNT,
    "train.ema_decay": Bound(0, 1, lo_open=True, hi_open=True),
    "guard.max_bad_steps": _COUNT,
    "guard.spike_sigmas": _POSITIVE,
    "guard.spike_window": _at_least(2),
    "guard.spike_min_history": _at_least(2, "a standard deviation needs 2 losses"),
    "guard.lr_factor": Bound(0, 1, lo_open=True),
    "guard.max_rollbacks": _at_least(0, "0: give up at the first rollback"),
    "guard.rollback_max_mb": _at_least(0, "0: no bound"),
    "tracking.num_sample_prompts": _COUNT,
    "tracking.sample_steps": _COUNT,
    "tracking.score_num_prompts": _COUNT,
    "tracking.score_steps": _COUNT,
    "ray.num_learners": _COUNT,
    "ray.zero_stage": Bound(0, 3),
    "ray.cpus_per_learner": _POSITIVE,
    "ray.gpus_per_learner": _RESOURCE,
    "ray.max_failures": _at_least(-1, "-1: retry without limit, as Ray Train's FailureConfig"),
    "ray.reference_cpus": _RESOURCE,
    "ray.reference_gpus": _RESOURCE,
    "ray.object_store_mb": _at_least(75, "Ray's smallest object store"),
    "ray.placement_timeout_s": _POSITIVE,
    "ray.sampler.num": _at_least(0),
    "ray.sampler.num_cpus": _RESOURCE,
    "ray.sampler.num_gpus": _RESOURCE,
    "ray.sampler.sync_every": _COUNT,
    "ray.sampler.probe_every": _COUNT,
    "ray.sampler.max_restarts": _at_least(0),
    "ray.sampler.inference_steps": _COUNT,
    "ray.sampler.guidance_scale": _at_least(0),
    "ray.sampler.board_timeout_s": _POSITIVE,
    "online.max_staleness": _at_least(0),
    "online.buffer_size": _COUNT,
    "online.samples_per_request": _COUNT,
    "tune.num_samples": _COUNT,
    "tune.grace_period": _COUNT,
    "tune.reduction_factor": _at_least(2, "ASHA keeps 1/reduction_factor of the trials per rung"),
    "tune.report_every": _COUNT,
    "tune.max_concurrent": _COUNT,
    "build.max_prompts": _COUNT,
    "build.threshold": Bound(0, 10, what="a judge score"),
    "build.min_gap": _at_least(0),
    "build.batch_size": _COUNT,
    "build.images_per_request": _COUNT,
    "build.max_context_tokens": _COUNT,
    "build.seed": _SEED,
    "eval.max_prompts": _COUNT,
    "eval.steps": _COUNT,
    "eval.guidance_scale": _at_least(0),
    "eval.batch_size": _COUNT,
    "eval.grid_prompts": _COUNT,
    "prepare.shard_rows": _COUNT,
    "prepare.prompt_shard_rows": _COUNT,
    "prepare.num_actors": _COUNT,
    "prepare.gpus_per_actor": _RESOURCE,
    "prepare.cpus_per_actor": _POSITIVE,
    "prepare.batch_size": _COUNT,
}


def _numeric(hint) -> bool:
    """int / float, Optional of one, or a tuple of them (optim.betas)."""
    if hint in (int, float):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):
        inner = [a for a in args if a is not type(None)]
        return len(inner) == 1 and _numeric(inner[0])
    return origin is tuple and bool(args) and all(a in (int, float) for a in args)


def numeric_fields(cls=RunConfig, prefix: str = "") -> Iterator[str]:
    """The dotted paths of every numeric field of `cls` and its nested sections, in schema order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from numeric_fields(hint, f"{prefix}{f.name}.")
        elif _numeric(hint):
            yield f"{prefix}{f.name}"


def _validate_bounds(cfg: RunConfig) -> None:
    for path in numeric_fields():
        bound = NUMERIC_BOUNDS.get(path)
        if bound is None:  # a new field without a bound: tests/test_config_bounds.py says which
            continue
        node = cfg
        for part in path.split("."):
            node = getattr(node, part)
        values = node if isinstance(node, tuple) else (node,)
        for i, v in enumerate(values):
            if v is None:  # an Optional field left unset (load refuses None where it is not Optional)
                continue
            if not bound.holds(v):
                name = f"{path}[{i}]" if isinstance(node, tuple) else path
                raise ConfigError(f"{name} must be {bound.rule()}, got {v!r}")


def _choice(value, allowed, path: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _positive(value, path: str, strict: bool = True) -> None:
    if value is None:
        return
    if (value <= 0) if strict else (value < 0):
        raise ConfigError(f"{path} must be {'>' if strict else '>='} 0, got {value}")


def _validate_scoring(cfg: RunConfig, check_paths: bool) -> None:
    """train.score_every with tracking.scorers / score_*: the periodic reward-model score."""
    every, t = cfg.train.score_every, cfg.tracking
    if every < 0:
        raise ConfigError(f"train.score_every must be >= 0 (0: off), got {every}")
    if not every and not t.scorers:
        return
    if not t.scorers:
        raise ConfigError(f'train.score_every={every} needs tracking.scorers, e.g. "clip:/models/clip"')
    if not every:
        raise ConfigError(
            "tracking.scorers is set but train.score_every=0; set train.score_every > 0 "
            "to score during training, or remove tracking.scorers"
        )
    try:
        spec = parse_scorers(t.scorers)
    except ValueError as e:
        raise ConfigError(f"tracking.scorers: {e}") from None
    # dino scores similarity to reference images, which a training run does not have.
    allowed = tuple(sorted(n for n in SCORER_NAMES if n not in EVAL_ONLY_SCORERS))
    for name, path in spec.items():
        _choice(name, allowed, "tracking.scorers")
        if path is not None and check_paths:
            try:
                resolve_path(path, None, f"tracking.scorers {name}")
            except FileNotFoundError as e:
                raise ConfigError(str(e)) from None
    if t.score_prompts and check_paths and not Path(t.score_prompts).is_file():
        raise ConfigError(f"tracking.score_prompts: prompt file {t.score_prompts!r} does not exist")
    try:
        parse_seeds(t.score_seeds)
    except ValueError as e:
        raise ConfigError(f"tracking.score_seeds={t.score_seeds!r}: expected e.g. 0,1 or 0-3 ({e})") from None
    if t.score_num_prompts < 1:
        raise ConfigError(f"tracking.score_num_prompts must be >= 1, got {t.score_num_prompts}")
    if t.score_steps is not None and t.score_steps < 1:
        raise ConfigError(f"tracking.score_steps must be >= 1, got {t.score_steps}")


def _local_model_exists(path: str, field_name: str) -> None:
    """A path that looks local must exist; hub ids are checked when they are loaded."""
    try:
        resolve_path(path, None, field_name)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


def _validate_objective(cfg: RunConfig) -> None:
    """The objective's own checks, run on the configured values one hyperparameter at a time so
    the error names the field."""
    o = cfg.objective
    for key, value in o.hyperparameters.items():
        try:
            build_objective(o.name, **{key: value})
        except ValueError as e:
            raise ConfigError(f"objective.{key}={value!r}: {e}") from None
    try:
        build_objective(o.name, **o.hyperparameters)
    except ValueError as e:
        fields = ", ".join(f"objective.{k}" for k in o.hyperparameters)
        raise ConfigError(f"objective ({fields}): {e}") from None


def _validate_build(cfg: RunConfig, check_paths: bool) -> None:
    b = cfg.build
    _choice(b.preset, STYLE_PRESET_NAMES, "build.preset")
    _choice(b.backend, ("auto", "vllm", "transformers"), "build.backend")
    if b.prompts and check_paths and not Path(b.prompts).is_file():
        raise ConfigError(f"build.prompts: prompt file {b.prompts!r} does not exist")
    for name in ("llm", "judge"):
        value = getattr(b, name)
        if value and value != "tiny" and check_paths:
            _local_model_exists(value, f"build.{name}")
    if not 0 <= b.threshold <= 10:
        raise ConfigError(f"build.threshold must be a judge score in [0, 10], got {b.threshold}")
    _positive(b.min_gap, "build.min_gap", strict=False)
    for name in ("batch_size", "images_per_request", "max_context_tokens", "max_prompts"):
        value = getattr(b, name)
        if value is not None and value < 1:
            raise ConfigError(f"build.{name} must be >= 1, got {value}")


def _validate_drift_probe(cfg: RunConfig) -> None:
    """The drift estimate of periodic_threshold: estimator, bound, probe set (reference/divergence.py)."""
    r, o = cfg.reference, cfg.optim
    _choice(r.divergence, DIVERGENCES, "reference.divergence")
    _positive(r.delta_eps_mse, "reference.delta_eps_mse")
    if r.strategy != "periodic_threshold":
        return
    if r.divergence_samples < 2:
        raise ConfigError(f"reference.divergence_samples must be >= 2 for a standard error, got "
                          f"{r.divergence_samples}")
    seen = r.tau * o.batch_size * o.grad_accum  # chosen latents a rank has seen by the first check
    if r.divergence_samples > seen:
        raise ConfigError(
            f"reference.divergence_samples={r.divergence_samples} exceeds the {seen} chosen latents a rank "
            f"sees before the first check (reference.tau * optim.batch_size * optim.grad_accum); lower it")


def _validate_pretrained(cfg: RunConfig) -> None:
    """A local `model.pretrained` folder must be a pipeline of `model.family` holding every component
    training loads: a missing text encoder fails here, before any model is built or worker started."""
    m = cfg.model
    path = m.pretrained
    if not path or "://" in path:
        return
    p = Path(path).expanduser()
    looks_local = p.is_absolute() or path.startswith(".") or path.count("/") > 1
    if not p.exists():
        if looks_local or "/" not in path:
            raise ConfigError(f"model.pretrained: {path!r} is neither a folder nor a hub id (owner/name)")
        return  # a hub id: checked when it is downloaded
    index = p / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"model.pretrained: {path} has no model_index.json "
                          "(not a diffusers pipeline folder)")
    entries = json.loads(index.read_text())
    named = entries.get("_class_name")
    if named != PIPELINE_CLASS_NAMES[m.family]:
        raise ConfigError(f"model.family={m.family} expects a {PIPELINE_CLASS_NAMES[m.family]} folder, but "
                          f"model.pretrained {path} holds a {named}")
    need = dict(REQUIRED_COMPONENTS[m.family])
    if m.family == "sd3" and m.t5:
        need.update(SD3_T5_COMPONENTS)
    for name, what in need.items():
        entry = entries.get(name)
        if not entry or entry[0] is None or not (p / name).is_dir():
            raise ConfigError(f"model.pretrained: {path} has no {name}/ ({what}) that "
                              f"model.family={m.family} needs")


def _validate_family(cfg: RunConfig) -> None:
    """Options of one family set on another, and what the flow transformers need, fail at load."""
    m = cfg.model
    flow = m.family in FLOW_FAMILIES
    for name in ("flow_shift", "max_sequence_length"):
        if getattr(m, name) is not None and not flow:
            raise ConfigError(f"model.{name} is for the flow families ({', '.join(FLOW_FAMILIES)}); "
                              f"model.family={m.family}")
    if m.flux_guidance is not None and m.family != "flux":
        raise ConfigError(f"model.flux_guidance is a FLUX.1 option (its guidance embedding); "
                          f"model.family={m.family}")
    if not m.t5 and m.family != "sd3":
        raise ConfigError(f"model.t5=false (run without T5) is an SD3 / SD3.5 option; model.family={m.family}"
                          + (" needs its T5 encoder" if m.family == "flux" else ""))
    if flow and m.train_text_encoder:
        raise ConfigError(f"model.train_text_encoder is not supported for model.family={m.family}: its "
                          "text encoders (T5 / VL) stay frozen and their embeddings are cached")
    if m.family in ("flux", "qwenimage") and m.resolution % 16:
        raise ConfigError(f"model.resolution must be a multiple of 16 for model.family={m.family} (8x VAE, "
                          f"then 2x2 latent packing), got {m.resolution}")
    if flow and m.vae is not None:
        raise ConfigError(f"model.vae (a VAE override) is for sd15 / sdxl; model.family={m.family} loads "
                          "its own 16-channel VAE")


def validate(cfg: RunConfig, check_paths: bool = True) -> None:
    _validate_bounds(cfg)  # first: the checks below combine fields and assume each is in range
    m, o, r, t, d = cfg.model, cfg.objective, cfg.reference, cfg.timesteps, cfg.data
    _choice(m.family, FAMILIES, "model.family")
    _validate_family(cfg)
    if check_paths:
        _validate_pretrained(cfg)
    _choice(m.finetune, ("lora", "full"), "model.finetune")
    _choice(m.mixed_precision, MIXED_PRECISION, "model.mixed_precision")
    if m.resolution < 8 or m.resolution % 8:
        raise ConfigError(f"model.resolution must be a positive multiple of 8, got {m.resolution}")
    if m.finetune == "lora" and m.lora_rank < 1:
        raise ConfigError(f"model.lora_rank must be >= 1, got {m.lora_rank}")
    if m.train_text_encoder and m.finetune != "lora":
        raise ConfigError("model.train_text_encoder is only supported with model.finetune=lora")

    _choice(o.name, tuple(OBJECTIVES), "objective.name")
    _validate_objective(cfg)

    _choice(r.strategy, STRATEGIES, "reference.strategy")
    _choice(r.on_exceed, ON_EXCEED, "reference.on_exceed")
    _choice(r.placement, ("colocated", "actor"), "reference.placement")
    _choice(r.dtype, REFERENCE_DTYPES, "reference.dtype")
    if r.tau < 1:
        raise ConfigError(f"reference.tau must be >= 1, got {r.tau}")
    _positive(r.delta, "reference.delta")
    if r.divergence_samples < 1:
        raise ConfigError(f"reference.divergence_samples must be >= 1, got {r.divergence_samples}")
    _validate_drift_probe(cfg)
    needs = objective_needs_reference(o.name)
    if needs and r.strategy == "none":
        raise ConfigError(
            f"objective.name={o.name} needs a reference model but reference.strategy=none; "
            "use reference.strategy in frozen | periodic | periodic_threshold, or objective mapo/sft"
        )
    if not needs and r.strategy != "none":
        raise ConfigError(
            f"objective.name={o.name} does not use a reference model; set reference.strategy=none "
            f"(got {r.strategy}) so no reference copy is built"
        )

    _choice(t.sampler, TIMESTEP_SAMPLERS, "timesteps.sampler")
    if not (0 < t.timestep_gamma <= 1):
        raise ConfigError(f"timesteps.timestep_gamma must be in (0, 1], got {t.timestep_gamma}")
    if t.num_bins < 1:
        raise ConfigError(f"timesteps.num_bins must be >= 1, got {t.num_bins}")
    _choice(t.reward_scale, REWARD_SCALES, "timesteps.reward_scale")
    if t.reward_scale in FLOW_ONLY_REWARD_SCALES and m.family not in FLOW_FAMILIES:
        raise ConfigError(f"timesteps.reward_scale={t.reward_scale} is a flow-matching loss weighting "
                          f"(diffusers' weighting_scheme); model.family={m.family} is a UNet")

    _choice(d.kind, DATA_KINDS, "data.kind")
    _choice(d.on_error, ("skip", "raise"), "data.on_error")
    _choice(d.latent_sampling, LATENT_SAMPLING, "data.latent_sampling")
    if d.kind != "synthetic":
        if not d.path:
            raise ConfigError(f"data.path is required for data.kind={d.kind}")
        if check_paths and "://" not in d.path and not Path(d.path).exists():
            # A glob (Hub snapshot shards: data/train-*.parquet) must match a file; stdlib glob, since
            # diffalign.config must not import diffalign.data (whose uri.glob the readers use).
            if not any(c in d.path for c in "*?["):
                raise ConfigError(f"data.path does not exist: {d.path}")
            if not any(os.path.isfile(p) for p in globlib.iglob(os.path.expanduser(d.path), recursive=True)):
                raise ConfigError(f"data.path matches no file: {d.path}")
    if d.kind == "folder" and not d.prompt:
        raise ConfigError(
            "data.prompt (the identifier prompt, e.g. 'a photo of sks dog') is required for data.kind=folder"
        )
    if d.read_block_rows < 1:
        raise ConfigError(f"data.read_block_rows must be >= 1, got {d.read_block_rows}")
    if d.shuffle_blocks < 1:
        raise ConfigError(f"data.shuffle_blocks must be >= 1, got {d.shuffle_blocks}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 (0: read in the step), got {d.num_workers}")
    if d.mismatch_probe_n < 1:
        raise ConfigError(f"data.mismatch_probe_n must be >= 1, got {d.mismatch_probe_n}")
    if d.mismatch_probe and check_paths:
        _local_model_exists(d.mismatch_probe, "data.mismatch_probe")
    if d.kind == "store" and d.mismatch_probe:
        raise ConfigError("data.mismatch_probe compares source images with samples: point it at the raw "
                          "pairs (data.kind=pickapic ...), not at a pair store (data.kind=store)")
    if d.kind == "store" and cfg.online.enabled:
        raise ConfigError("online.enabled needs data.kind=folder (the user's target images), "
                          "not a pair store")

    op = cfg.optim
    _positive(op.lr, "optim.lr")
    _positive(op.text_encoder_lr, "optim.text_encoder_lr")
    if op.batch_size < 1 or op.grad_accum < 1:
        raise ConfigError("optim.batch_size and optim.grad_accum must be >= 1")
    _positive(op.grad_clip, "optim.grad_clip", strict=False)
    tr = cfg.train
    if tr.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1, got {tr.max_steps}")
    if tr.checkpoint_every < 1:
        raise ConfigError(f"train.checkpoint_every must be >= 1, got {tr.checkpoint_every}")
    if tr.ema_decay is not None and not (0 < tr.ema_decay < 1):
        raise ConfigError(f"train.ema_decay must be in (0, 1), got {tr.ema_decay}")
    _validate_scoring(cfg, check_paths)
    g = cfg.guard
    if g.max_bad_steps < 1 or not (0 < g.lr_factor <= 1) or g.spike_sigmas <= 0:
        raise ConfigError("guard: max_bad_steps >= 1, 0 < lr_factor <= 1 and spike_sigmas > 0 are required")
    if g.spike_min_history > g.spike_window:  # the window would never hold enough losses: no spike test
        raise ConfigError(f"guard.spike_min_history={g.spike_min_history} exceeds guard.spike_window="
                          f"{g.spike_window}: the loss-spike test would never run")

    ray = cfg.ray
    _choice(ray.backend, ("ddp", "deepspeed"), "ray.backend")
    _choice(ray.zero_stage, (0, 1, 2, 3), "ray.zero_stage")
    _choice(ray.placement, RAY_PLACEMENTS, "ray.placement")
    _choice(ray.learner_strategy, LEARNER_STRATEGIES, "ray.learner_strategy")
    if ray.use_gpu and ray.gpus_per_learner == 0:
        raise ConfigError("ray.gpus_per_learner must be > 0 with ray.use_gpu=true (set ray.use_gpu=false "
                          "for CPU learners)")
    if ray.gpus_per_learner > 1 and not float(ray.gpus_per_learner).is_integer():
        raise ConfigError(f"ray.gpus_per_learner={ray.gpus_per_learner}: a fraction of a GPU must be <= 1; "
                          "above one GPU use whole numbers")
    if ray.num_learners < 1:
        raise ConfigError(f"ray.num_learners must be >= 1, got {ray.num_learners}")
    if ray.sampler.num < 0 or ray.sampler.sync_every < 1:
        raise ConfigError("ray.sampler.num must be >= 0 and ray.sampler.sync_every >= 1")
    for name in ("num_cpus", "num_gpus"):
        _positive(getattr(ray.sampler, name), f"ray.sampler.{name}", strict=False)
    on = cfg.online
    _choice(on.mode, ONLINE_MODES, "online.mode")
    if on.enabled:
        if o.name not in ("mapo", "dpo", "xdpo", "sft"):
            raise ConfigError(f"online.enabled needs objective.name in mapo|dpo|xdpo|sft (got {o.name})")
        if d.kind != "folder":
            raise ConfigError("online.enabled needs data.kind=folder (the user's target images)")
        if on.max_staleness < 0:
            raise ConfigError(f"online.max_staleness must be >= 0, got {on.max_staleness}")
    _choice(cfg.tune.mode, ("min", "max"), "tune.mode")
    for name, least in (
        ("num_samples", 1),
        ("report_every", 1),
        ("max_concurrent", 1),
        ("grace_period", 1),
        ("reduction_factor", 2),
    ):  # ASHA keeps 1/reduction_factor of the trials per rung
        if getattr(cfg.tune, name) < least:
            raise ConfigError(f"tune.{name} must be >= {least}, got {getattr(cfg.tune, name)}")
    _validate_build(cfg, check_paths)
    _validate_eval(cfg, check_paths)
    _validate_prepare(cfg)
    _validate_storage(cfg)


def _is_uri(value: str | None) -> bool:
    # As diffalign.data.uri.is_uri (diffalign.config must not import diffalign.data).
    return isinstance(value, str) and "://" in value


def _validate_storage(cfg: RunConfig) -> None:
    """Where a run writes: a URI train.output_dir (s3://, gs://, ...) only for Ray learners, whose
    workers publish into it; what must stay local; a tracking store that can live beside it."""
    t = cfg.train
    for path, value in (("train.local_dir", t.local_dir), ("guard.rollback_dir", cfg.guard.rollback_dir)):
        if value is not None and (_is_uri(value) or not str(value).strip()):
            raise ConfigError(f"{path}={value!r} must be a local folder (each worker's own scratch), "
                              "not a URI or an empty string")
    if not _is_uri(t.output_dir):
        return
    if not cfg.ray.enabled:
        raise ConfigError(
            f"train.output_dir={t.output_dir!r} is a URI, which only Ray learners (ray.enabled=true) can "
            "train into: a one-process run keeps its checkpoints and lock as local files. Use a local "
            "folder, or set ray.enabled=true")
    uri = cfg.tracking.tracking_uri
    if cfg.tracking.mlflow and (not uri or uri.startswith("sqlite:")):
        raise ConfigError(
            f"tracking.tracking_uri={uri!r} with train.output_dir={t.output_dir!r}: a sqlite store "
            "(the default, under train.output_dir) cannot live on object storage. Point "
            "tracking.tracking_uri at an MLflow server (http://host:5000, started with --serve-artifacts "
            "--artifacts-destination s3://...), or set tracking.mlflow=false")


def _validate_eval(cfg: RunConfig, check_paths: bool) -> None:
    """The eval section (recipes/evaluate.py). Every config carries it, so eval.weights and eval.scorers
    are required by the recipe, not here."""
    e = cfg.eval
    for name in ("batch_size", "grid_prompts", "max_prompts", "steps"):
        value = getattr(e, name)
        if value is not None and value < 1:
            raise ConfigError(f"eval.{name} must be >= 1, got {value}")
    try:
        parse_seeds(e.seeds)
    except ValueError as err:
        raise ConfigError(f"eval.seeds={e.seeds!r}: expected e.g. 0,1 or 0-3 ({err})") from None
    if e.scorers:
        try:
            spec = parse_scorers(e.scorers)
        except ValueError as err:
            raise ConfigError(f"eval.scorers: {err}") from None
        for name, path in spec.items():
            _choice(name, SCORER_NAMES, "eval.scorers")
            if path is not None and check_paths:
                _local_model_exists(path, f"eval.scorers {name}")
        if "dino" in spec and not e.references:
            raise ConfigError("eval.scorers=dino compares with reference images: set eval.references=<dir>")
    if e.probe_only and not cfg.data.mismatch_probe:
        raise ConfigError(
            "eval.probe_only=true needs data.mismatch_probe=<CLIP or DINOv2 path or hub id> "
            "(and data.mismatch_probe_n pairs)"
        )
    if not check_paths:
        return
    if e.weights and not Path(e.weights).exists():
        raise ConfigError(f"eval.weights: {e.weights!r} does not exist")
    if e.prompts and not Path(e.prompts).is_file():
        raise ConfigError(f"eval.prompts: prompt file {e.prompts!r} does not exist")
    if e.references and not Path(e.references).is_dir():
        raise ConfigError(f"eval.references: image folder {e.references!r} does not exist")


def _validate_prepare(cfg: RunConfig) -> None:
    """The prepare section (recipes/prepare_data.py). Every config carries it, so prepare.output is
    required by the recipe, not here."""
    p = cfg.prepare
    for name in ("output", "report"):
        value = getattr(p, name)
        if value is not None and not str(value).strip():
            raise ConfigError(f"prepare.{name} must be a path or a URI, got {value!r}")
    for name in ("shard_rows", "prompt_shard_rows", "num_actors", "batch_size"):
        value = getattr(p, name)
        if value < 1:
            raise ConfigError(f"prepare.{name} must be >= 1, got {value}")
    _choice(p.latents, PREPARE_LATENTS, "prepare.latents")
    _choice(p.dtype, PREPARE_DTYPES, "prepare.dtype")
    if not p.cpus_per_actor > 0:
        raise ConfigError(f"prepare.cpus_per_actor must be > 0, got {p.cpus_per_actor}")
    g = p.gpus_per_actor
    if not g >= 0:
        raise ConfigError(f"prepare.gpus_per_actor must be >= 0, got {g}")
    if g > 1 and not float(g).is_integer():
        raise ConfigError(f"prepare.gpus_per_actor={g}: a fraction of a GPU must be <= 1; above one GPU use "
                          "whole numbers")
