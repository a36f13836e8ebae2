"""Config checks that span fields: allowed values, ranges, and combinations. Each error names the
field and the allowed values; invalid configs fail here, before any model is built or worker started.
"""

from __future__ import annotations

import glob as globlib
import os
from pathlib import Path

from diffalign.config.schema import (
    DATA_KINDS,
    LATENT_SAMPLING,
    ONLINE_MODES,
    PREPARE_DTYPES,
    PREPARE_LATENTS,
    STYLE_PRESET_NAMES,
    ConfigError,
    RunConfig,
)
from diffalign.models.precision import MIXED_PRECISION, REFERENCE_DTYPES
from diffalign.objectives import OBJECTIVES, build_objective, objective_needs_reference
from diffalign.reference.names import DIVERGENCES, ON_EXCEED, STRATEGIES
from diffalign.specs import EVAL_ONLY_SCORERS, SCORER_NAMES, parse_scorers, parse_seeds, resolve_path


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


def validate(cfg: RunConfig, check_paths: bool = True) -> None:
    m, o, r, t, d = cfg.model, cfg.objective, cfg.reference, cfg.timesteps, cfg.data
    _choice(m.family, ("sd15", "sdxl"), "model.family")
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

    _choice(t.sampler, ("uniform", "skewed"), "timesteps.sampler")
    if not (0 < t.timestep_gamma <= 1):
        raise ConfigError(f"timesteps.timestep_gamma must be in (0, 1], got {t.timestep_gamma}")
    if t.num_bins < 1:
        raise ConfigError(f"timesteps.num_bins must be >= 1, got {t.num_bins}")
    _choice(t.reward_scale, ("constant", "inv_sqrt_snr"), "timesteps.reward_scale")

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

    ray = cfg.ray
    _choice(ray.backend, ("ddp", "deepspeed"), "ray.backend")
    _choice(ray.zero_stage, (0, 1, 2, 3), "ray.zero_stage")
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
