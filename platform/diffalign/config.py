"""Typed run configuration: YAML -> dataclasses, validated before any worker starts.

Every field has its default here and only here; `--set section.field=value` overrides any of them.
Errors name the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from diffalign.objectives import OBJECTIVES, objective_needs_reference
from diffalign.reference import ON_EXCEED, REFERENCE_DTYPES, STRATEGIES


class ConfigError(ValueError):
    """An invalid configuration; the message names the field."""


@dataclass
class ModelConfig:
    family: str = "sd15"                 # sd15 | sdxl
    pretrained: str | None = None        # diffusers folder or hub id; None -> tiny random model
    vae: str | None = None               # optional VAE override (SDXL fp16-fix)
    resolution: int = 32
    tiny_seed: int = 0
    finetune: str = "lora"               # lora | full
    lora_rank: int = 8
    lora_alpha: float | None = None
    train_text_encoder: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"          # no | bf16 | fp16


@dataclass
class ObjectiveConfig:
    name: str = "dpo"                    # sft | dpo | mapo | xdpo
    beta: float | None = None  # None -> the objective's own default (dpo 5000, xdpo 1000, mapo 1000)
    margin_weight: float = 0.1  # MaPO weight of the margin term (official beta_mapo)
    snr_value: float = 0.5  # MaPO link-function temperature s
    eta: float = 0.05  # xDPO
    xdpo_gamma: float = 1.0 / 6.0  # xDPO (not the timestep gamma)
    n: float = 6.0  # xDPO

    def params(self) -> dict:
        p: dict = {}
        if self.beta is not None:
            p["beta"] = self.beta
        if self.name == "mapo":
            p.update(margin_weight=self.margin_weight, snr_value=self.snr_value)
        if self.name == "xdpo":
            p.update(eta=self.eta, gamma=self.xdpo_gamma, n=self.n)
        if self.name == "sft":
            p = {}
        return p


@dataclass
class ReferenceConfig:
    strategy: str = "frozen"  # none | frozen | periodic | periodic_threshold
    tau: int = 32  # update period (Kang et al. search {16, 32, 64})
    delta: float = 0.005  # KL(ref||init) bound (0.005 SD1.5, 0.002 SDXL)
    on_exceed: str = "freeze"  # freeze | reinit
    divergence_samples: int = 2  # chosen latents used for the estimate
    placement: str = "colocated"  # colocated | actor
    # Precision of a full-UNet reference copy: auto = model.mixed_precision's dtype on GPU, fp32 on CPU;
    # bf16 / fp16 halve its memory (LoRA references are adapter tensors and ignore it).
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16


@dataclass
class TimestepConfig:
    sampler: str = "uniform"  # uniform | skewed
    timestep_gamma: float = 0.9
    num_bins: int = 10
    reward_scale: str = "constant"  # constant | inv_sqrt_snr


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | pickapic | hf_disk | jsonl | csv | folder
    path: str | None = None
    num_pairs: int = 64  # synthetic only
    heldout_pairs: int = 32
    prompt: str | None = None  # folder: the identifier prompt ("a photo of sks dog")
    random_flip: bool = True
    center_crop: bool = True
    cache_latents: bool = True
    # Text-encoder outputs once per unique prompt, kept on the training device (off when
    # model.train_text_encoder: the encoders then change every step).
    cache_prompt_embeds: bool = True
    max_samples: int | None = None
    on_error: str = "skip"  # skip | raise
    # Threads decoding the next micro-batches while the step computes (0: read in the step);
    # unused with cached latents, where nothing is decoded.
    num_workers: int = 0
    # Reference-mismatch probe before offline training (MaPO Fig. 2): a CLIP or DINOv2 path / hub id.
    mismatch_probe: str | None = None  # None -> skipped
    mismatch_probe_n: int = 16  # pairs whose chosen images are compared with base-model samples


@dataclass
class OptimConfig:
    lr: float = 1e-4
    text_encoder_lr: float = 5e-6
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    batch_size: int = 8  # pairs per learner per micro-step
    grad_accum: int = 1


@dataclass
class TrainConfig:
    max_steps: int = 100
    seed: int = 0
    output_dir: str = "runs/default"
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 25
    sample_every: int = 0  # image grid every N steps (0: only at the end)
    score_every: int = 0  # reward-model score on fixed prompts/seeds every N steps (0: off)
    log_every: int = 1
    ema_decay: float | None = None
    resume: bool = True
    progress: bool = True


@dataclass
class GuardConfig:
    enabled: bool = True
    max_bad_steps: int = 3  # consecutive NaN/inf steps before rollback
    spike_sigmas: float = 6.0  # loss spike threshold in rolling std
    spike_window: int = 50
    spike_min_history: int = 20
    lr_factor: float = 0.5  # lr multiplier after a rollback
    max_rollbacks: int = 5


@dataclass
class TrackingConfig:
    mlflow: bool = True
    tracking_uri: str | None = None  # None -> sqlite:///<output_dir>/mlflow.db
    experiment: str = "diffalign"
    run_name: str | None = None
    num_sample_prompts: int = 4
    sample_steps: int = 8
    # Periodic reward-model score (train.score_every > 0), see diffalign.train.reward_eval:
    scorers: str | None = None  # "name:path,..." as recipes/evaluate.py --scorers (e.g. pickscore)
    score_prompts: str | None = None  # prompt file; None -> held-out prompts, else the tiny synthetic ones
    score_num_prompts: int = 4  # first N prompts are scored
    score_seeds: str = "0,1"  # one image per (prompt, seed), the same seeds at every evaluation
    score_steps: int | None = None  # inference steps; None -> 50 (pretrained model) or sample_steps


@dataclass
class SamplerPoolConfig:
    num: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    sync_every: int = 1  # learner -> sampler weight sync period (steps)
    probe_every: int = 4  # verify outputs on a probe batch every M syncs
    max_restarts: int = 3
    inference_steps: int = 8
    guidance_scale: float = 5.0


@dataclass
class RayConfig:
    enabled: bool = False
    # None -> RAY_ADDRESS if set (ray job submit), else a new local cluster; "auto" -> the `ray start` one
    address: str | None = None
    num_learners: int = 1
    backend: str = "ddp"  # ddp | deepspeed
    zero_stage: int = 2
    offload_optimizer: bool = False
    use_gpu: bool = False
    cpus_per_learner: float = 1.0
    max_failures: int = 1
    storage_path: str | None = None  # None -> <output_dir>/ray
    reference_cpus: float = 1.0
    reference_gpus: float = 0.0
    object_store_mb: int = 256
    sampler: SamplerPoolConfig = field(default_factory=SamplerPoolConfig)


@dataclass
class OnlineConfig:
    enabled: bool = False
    mode: str = "async"  # async | sync
    max_staleness: int = 2  # replay-buffer max age in policy versions
    buffer_size: int = 64
    samples_per_request: int = 4


@dataclass
class TuneConfig:
    num_samples: int = 4
    metric: str = "heldout/implicit_acc"
    mode: str = "max"
    grace_period: int = 2
    reduction_factor: int = 2
    report_every: int = 5
    search_space: dict = field(
        default_factory=dict
    )  # "objective.beta": {"loguniform": [lo, hi]} | {"choice": [...]}
    max_concurrent: int = 1


@dataclass
class BuildConfig:
    """recipes/build_pairs.py: Pick-Style / Pick-Safety pairs sampled from the base model (model section)
    on Ray sampler actors (ray.sampler: actors, inference_steps, guidance_scale)."""

    prompts: str | None = None  # captions: .txt .parquet .tsv .csv .json .jsonl; None: tiny ones
    max_prompts: int | None = None  # keep the first N captions
    preset: str = "cartoon"  # cartoon | pixel_art | safety (MaPO's style prefixes)
    # Models: a path or hub id; "tiny" builds a random one offline (CPU demos, tests).
    llm: str | None = None  # context-prompt LLM; None: the captions are the context prompts
    judge: str | None = None  # VLM judge; None: every pair is kept
    backend: str = "auto"  # auto | vllm | transformers; auto: vllm if installed and on a GPU
    device: str | None = None  # transformers backend; None -> cuda if available, else cpu
    vllm_kwargs: dict = field(default_factory=dict)  # vllm.LLM options, e.g. {gpu_memory_utilization: 0.3}
    threshold: float = 6.0  # keep pairs whose chosen image scores >= this (MaPO: above 5 of 10)
    min_gap: float | None = None  # and beats the rejected image by at least this much
    batch_size: int = 8  # pairs generated and judged per round
    images_per_request: int = 4  # prompts per sampler-actor request
    max_context_tokens: int = 96  # LLM answer length
    seed: int = 0  # the per-pair generation seeds derive from it
    out: str | None = None  # parquet path; None -> <train.output_dir>/pairs.parquet


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    build: BuildConfig = field(default_factory=BuildConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, object]:
        """`section.field` -> value, for MLflow params."""
        out: dict[str, object] = {}

        def walk(prefix: str, d: dict) -> None:
            for k, v in d.items():
                if isinstance(v, dict) and k != "search_space":
                    walk(f"{prefix}{k}.", v)
                else:
                    out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v

        walk("", self.to_dict())
        return out


# --------------------------------------------------------------------------- building from dicts


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
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, fpath)
        else:
            kwargs[name] = _coerce(value, hint, fpath)
    return cls(**kwargs)


def _coerce(value, hint, path: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is typing.Any:
            return None
        raise ConfigError(f"{path}: may not be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
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


def _parse_scalar(text: str):
    return yaml.safe_load(text) if text != "" else ""


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
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, validate_paths: bool = True
) -> RunConfig:
    """Reads a YAML config, applies overrides, validates. Raises ConfigError naming the field."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
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


# --------------------------------------------------------------------------- validation


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
    # Lazy: the eval package imports this module.
    from diffalign.eval.evaluate import parse_scorers, parse_seeds
    from diffalign.eval.scorers import SCORERS, resolve_path

    try:
        spec = parse_scorers(t.scorers)
    except ValueError as e:
        raise ConfigError(f"tracking.scorers: {e}") from None
    # dino scores similarity to reference images, which a training run does not have.
    allowed = tuple(sorted(n for n in SCORERS if n != "dino"))
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
    from diffalign.eval.scorers import resolve_path  # lazy: the eval package imports this module

    try:
        resolve_path(path, None, field_name)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


def _validate_build(cfg: RunConfig, check_paths: bool) -> None:
    b = cfg.build
    from diffalign.build.styles import STYLE_PRESETS

    _choice(b.preset, tuple(STYLE_PRESETS), "build.preset")
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


def validate(cfg: RunConfig, check_paths: bool = True) -> None:
    m, o, r, t, d = cfg.model, cfg.objective, cfg.reference, cfg.timesteps, cfg.data
    _choice(m.family, ("sd15", "sdxl"), "model.family")
    _choice(m.finetune, ("lora", "full"), "model.finetune")
    _choice(m.mixed_precision, ("no", "bf16", "fp16"), "model.mixed_precision")
    if m.resolution < 8 or m.resolution % 8:
        raise ConfigError(f"model.resolution must be a positive multiple of 8, got {m.resolution}")
    if m.finetune == "lora" and m.lora_rank < 1:
        raise ConfigError(f"model.lora_rank must be >= 1, got {m.lora_rank}")
    if m.train_text_encoder and m.finetune != "lora":
        raise ConfigError("model.train_text_encoder is only supported with model.finetune=lora")

    _choice(o.name, tuple(OBJECTIVES), "objective.name")
    _positive(o.beta, "objective.beta")
    _positive(o.snr_value, "objective.snr_value")
    _positive(o.margin_weight, "objective.margin_weight", strict=False)
    _positive(o.eta, "objective.eta", strict=False)
    _positive(o.xdpo_gamma, "objective.xdpo_gamma", strict=False)
    _positive(o.n, "objective.n")

    _choice(r.strategy, STRATEGIES, "reference.strategy")
    _choice(r.on_exceed, ON_EXCEED, "reference.on_exceed")
    _choice(r.placement, ("colocated", "actor"), "reference.placement")
    _choice(r.dtype, REFERENCE_DTYPES, "reference.dtype")
    if r.tau < 1:
        raise ConfigError(f"reference.tau must be >= 1, got {r.tau}")
    _positive(r.delta, "reference.delta")
    if r.divergence_samples < 1:
        raise ConfigError(f"reference.divergence_samples must be >= 1, got {r.divergence_samples}")
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

    _choice(d.kind, ("synthetic", "pickapic", "hf_disk", "jsonl", "csv", "folder"), "data.kind")
    _choice(d.on_error, ("skip", "raise"), "data.on_error")
    if d.kind != "synthetic":
        if not d.path:
            raise ConfigError(f"data.path is required for data.kind={d.kind}")
        if check_paths and "://" not in d.path and not Path(d.path).exists():
            raise ConfigError(f"data.path does not exist: {d.path}")
    if d.kind == "folder" and not d.prompt:
        raise ConfigError(
            "data.prompt (the identifier prompt, e.g. 'a photo of sks dog') is required for data.kind=folder"
        )
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 (0: read in the step), got {d.num_workers}")
    if d.mismatch_probe_n < 1:
        raise ConfigError(f"data.mismatch_probe_n must be >= 1, got {d.mismatch_probe_n}")
    if d.mismatch_probe and check_paths:
        _local_model_exists(d.mismatch_probe, "data.mismatch_probe")

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
    _choice(on.mode, ("async", "sync"), "online.mode")
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
