"""The config schema: one dataclass per YAML section.

A field's default is written here and only here; defaults that belong to a component below the
config (objective hyperparameters, timestep and reference-strategy defaults) are read from that
component, so they too exist once. Loading: `diffalign.config.load`; checks: `diffalign.config.validate`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from diffalign.objectives import build_objective, objective_hyperparameters
from diffalign.reference.names import (
    DEFAULT_DELTA,
    DEFAULT_DIVERGENCE,
    DEFAULT_DIVERGENCE_SAMPLES,
    DEFAULT_ON_EXCEED,
    DEFAULT_TAU,
)
from diffalign.timesteps import DEFAULT_GAMMA, DEFAULT_NUM_BINS


class ConfigError(ValueError):
    """An invalid configuration; the message names the field."""


@dataclass
class ModelConfig:
    family: str = "sd15"                 # sd15 | sdxl | sd3 | flux | qwenimage (flow transformers)
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
    # Flow families only (docs/flow_models.md). flow_shift: a static sigma shift; None = the family's
    # own (SD3 the scheduler's static shift 3.0, FLUX / Qwen-Image mu from the image sequence length).
    flow_shift: float | None = None
    flux_guidance: float | None = None   # FLUX guidance embedding; None = 3.5 on guidance-distilled models
    max_sequence_length: int | None = None  # T5 / VL text tokens; None = the pipeline's default
    t5: bool = True                      # SD3 / SD3.5 only: false runs without T5 (text_encoder_3)


@dataclass
class ObjectiveConfig:
    """`{name, ...hyperparameters}`: the hyperparameters are the keyword arguments of the objective's
    constructor (`diffalign.objectives`), which holds their defaults; only the ones set in the YAML or
    by `--set` are stored here. `cfg.objective.beta` reads a value, set or default."""

    name: str = "dpo"  # sft | dpo | mapo | xdpo
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # the ones set explicitly

    def params(self) -> dict[str, Any]:
        """Every constructor keyword of the objective: its defaults, then the set ones."""
        try:
            defaults = objective_hyperparameters(self.name)
        except ValueError:  # an unknown name is reported by validation, naming the field
            defaults = {}
        return {**defaults, **self.hyperparameters}

    def resolved(self) -> dict[str, Any]:
        """The values the run uses, as the built objective reports them (`hparams()`): derived ones
        included (MaPO's margin weight from beta, DPO's beta from `beta_dpo`). What MLflow records."""
        try:
            return {**self.params(), **build_objective(self.name, **self.hyperparameters).hparams()}
        except ValueError:  # invalid values are reported by validation, naming the field
            return self.params()

    def __getattr__(self, key: str) -> Any:
        # Only reached for names that are not dataclass fields: the hyperparameters.
        if key.startswith("__") or key in ("name", "hyperparameters"):
            raise AttributeError(key)
        values = self.resolved()
        if key not in values:
            raise AttributeError(f"objective {self.name!r} has no hyperparameter {key!r}; "
                                 f"accepted: {', '.join(values) or 'none'}")
        return values[key]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.hyperparameters}


@dataclass
class ReferenceConfig:
    strategy: str = "frozen"  # none | frozen | periodic | periodic_threshold
    tau: int = DEFAULT_TAU  # update period (Kang et al. search {16, 32, 64})
    delta: float = DEFAULT_DELTA  # KL(ref||init) bound (0.005 SD1.5, 0.002 SDXL)
    on_exceed: str = DEFAULT_ON_EXCEED  # freeze | reinit
    # Drift estimate of periodic_threshold (diffalign/reference/divergence.py): signed = Kang et al. eq. 8
    # (err_ref - err_init; goes negative as the model fits the chosen images), eps_mse = mean
    # ||eps_ref - eps_init||^2 (>= 0, the KL of the Gaussian reverse steps up to omega(t)).
    divergence: str = DEFAULT_DIVERGENCE  # signed | eps_mse
    # Bound for divergence=eps_mse; null: `delta` (both estimates agree in expectation when the
    # initial model is the MSE-optimal denoiser of the probe data; see divergence.py).
    delta_eps_mse: float | None = None
    # Chosen latents per rank in the fixed probe set (the first ones seen; fresh uniform t and noise
    # from a fixed generator); all ranks' probes are pooled, so the decision is the same on every rank.
    divergence_samples: int = DEFAULT_DIVERGENCE_SAMPLES
    placement: str = "colocated"  # colocated | actor
    # Precision of a full-UNet reference copy: auto = model.mixed_precision's dtype on GPU, fp32 on CPU;
    # bf16 / fp16 halve its memory (LoRA references are adapter tensors and ignore it).
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16


@dataclass
class TimestepConfig:
    sampler: str = "uniform"  # uniform | skewed | logit_normal | mode (the last two: SD3 / FLUX scripts)
    timestep_gamma: float = DEFAULT_GAMMA
    num_bins: int = DEFAULT_NUM_BINS
    reward_scale: str = "constant"  # constant | inv_sqrt_snr | sigma_sqrt | cosmap (last two: flow only)
    logit_mean: float = 0.0   # logit_normal: diffusers' SD3 / FLUX training-script defaults
    logit_std: float = 1.0
    mode_scale: float = 1.29  # mode


LATENT_SAMPLING = ("sample", "mean")


DATA_KINDS = ("synthetic", "pickapic", "hf_disk", "jsonl", "csv", "folder", "store")


@dataclass
class DataConfig:
    # store: a pair store made by recipes/prepare_data.py (data.path = its root, local or a URI).
    kind: str = "synthetic"  # synthetic | pickapic | hf_disk | jsonl | csv | folder | store
    path: str | None = None
    split: str = "train"  # the split read from a Hub snapshot's parquet folder or a saved DatasetDict
    num_pairs: int = 64  # synthetic only
    heldout_pairs: int = 32
    prompt: str | None = None  # folder: the identifier prompt ("a photo of sks dog")
    random_flip: bool = True
    center_crop: bool = True
    cache_latents: bool = True
    # sample: train on latent_dist.sample() and, cached too, a new flip every read (diffusers' DPO and
    # the official MaPO do; cached = uncached in distribution; the cache holds mean + std of both flips:
    # 4x the memory of `mean` with flips, diffalign/train/cache.py). mean: latent_dist.mean, and under
    # caching each pair's first-read flip for the whole run (deterministic latents, 1/4 the cache).
    latent_sampling: str = "sample"  # sample | mean
    # Text-encoder outputs once per unique prompt, kept on the training device (off when
    # model.train_text_encoder: the encoders then change every step).
    cache_prompt_embeds: bool = True
    max_samples: int | None = None
    on_error: str = "skip"  # skip | raise
    # Raw files (pickapic / hf_disk / jsonl / csv) are read lazily, a block of rows at a time: blocks of
    # at most `read_block_rows` rows; `shuffle_blocks` blocks are shuffled together (and held in
    # memory) at once. Each rank reads its own blocks (diffalign/train/data_order.py BlockOrder).
    read_block_rows: int = 256
    shuffle_blocks: int = 4
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
    # Ray learners with a URI train.output_dir: each worker's local scratch (the final weights before
    # they are uploaded, score images). None -> a folder under the system temp dir.
    local_dir: str | None = None


@dataclass
class GuardConfig:
    enabled: bool = True
    max_bad_steps: int = 3  # consecutive NaN/inf steps before rollback
    spike_sigmas: float = 6.0  # loss spike threshold in rolling std
    spike_window: int = 50
    spike_min_history: int = 20
    lr_factor: float = 0.5  # lr multiplier after a rollback
    max_rollbacks: int = 5
    # Ray learners: the local folder holding each worker's one rollback checkpoint (trainable weights,
    # optimizer and loop state). None -> a folder under the system temp dir.
    rollback_dir: str | None = None
    # Largest rollback checkpoint (MB) a Ray learner may keep there, estimated at worker start; a
    # bigger one fails the run naming this field. 0: no bound.
    rollback_max_mb: float = 0.0


@dataclass
class TrackingConfig:
    mlflow: bool = True
    tracking_uri: str | None = None  # None -> sqlite:///<output_dir>/mlflow.db
    experiment: str = "diffalign"
    run_name: str | None = None
    num_sample_prompts: int = 4
    sample_steps: int = 8
    # Periodic reward-model score (train.score_every > 0), see diffalign.train.reward_eval:
    scorers: str | None = None  # "name:path,..." as eval.scorers (e.g. "pickscore:/models/pickscore")
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
    # Longest wait of a sampler actor for the weight board to publish the policy version a request
    # needs (rank 0 publishes it after its step), and for that packet to arrive.
    board_timeout_s: float = 300.0


# ray.placement and ray.learner_strategy (Ray placement group strategies)
RAY_PLACEMENTS = ("separate", "colocated")
LEARNER_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


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
    # GPUs of each learner when use_gpu: a fraction <= 1 lets learners share a GPU, above 1 whole numbers
    gpus_per_learner: float = 1.0
    # The Ray Train workers' placement group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    learner_strategy: str = "PACK"
    # Side actors (samplers, reference actor): "separate" packs them in their own group wherever they
    # fit; "colocated" packs them all onto one node, preferring the learners' (actors/placement.py).
    placement: str = "separate"
    max_failures: int = 1
    storage_path: str | None = None  # None -> <output_dir>/ray
    reference_cpus: float = 1.0
    reference_gpus: float = 0.0
    object_store_mb: int = 256
    # Longest wait for the cluster to place a run's Ray Train learners (their placement group);
    # then the run fails naming what it asked for and what the cluster has, never waits forever.
    placement_timeout_s: float = 300.0
    sampler: SamplerPoolConfig = field(default_factory=SamplerPoolConfig)


ONLINE_MODES = ("async", "sync")


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


# The style presets of MaPO's Pick-Style / Pick-Safety (their prefixes: diffalign.curate.styles).
STYLE_PRESET_NAMES = ("cartoon", "pixel_art", "safety")


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
class EvalConfig:
    """recipes/evaluate.py: the policy's weights against the base model on seed-matched samples.
    With `probe_only`, it only runs the reference-mismatch probe of `data.mismatch_probe` /
    `data.mismatch_probe_n` on the config's dataset, before any training."""

    weights: str | None = None  # a LoRA folder, a UNet folder or a run folder
    prompts: str | None = None  # .txt .parquet .tsv .csv .json .jsonl; None: the tiny synthetic prompts
    max_prompts: int | None = None  # keep the first N prompts
    scorers: str | None = None  # NAME[:PATH],...: pickscore, clip, hpsv2, imagereward, aesthetic, dino
    seeds: str = "0,1"  # seeds shared by both models, e.g. 0,1 or 0-3
    references: str | None = None  # folder of reference images (the dino scorer)
    out: str | None = None  # output folder; None: <train.output_dir>/eval
    steps: int | None = None  # inference steps; None: 50 (pretrained model) or tracking.sample_steps
    guidance_scale: float | None = None  # None: 7.5 SD1.5, 5.0 SDXL
    batch_size: int = 8  # images per pipeline call
    grid_prompts: int = 16  # prompt rows drawn in grid.png
    save_images: bool = False  # also write each image to <out>/images
    device: str | None = None  # None: cuda if available, else cpu
    probe_only: bool = False  # only the reference-mismatch probe (data.mismatch_probe)


# prepare.latents / prepare.dtype of recipes/prepare_data.py (diffalign.data.store.STORE_DTYPES).
PREPARE_LATENTS = ("moments", "mean")
PREPARE_DTYPES = ("bfloat16", "float32")


@dataclass
class PrepareConfig:
    """recipes/prepare_data.py: the pair store (diffalign.data.store) of the data section's source for the
    model section's VAE and text encoders, made once on Ray Data actors and read by every run with
    `data.kind=store data.path=<prepare.output>`. A killed prepare resumes where it stopped."""

    output: str | None = None  # store root: a folder or a URI (s3://...); required by the recipe
    shard_rows: int = 1024  # source rows per pair shard (its valid pairs are one file)
    prompt_shard_rows: int = 4096  # unique prompts per text-embedding shard
    encode: bool = True  # VAE latents + prompt embeddings; false: a validated store of the encoded images
    latents: str = "moments"  # moments: mean and std (what data.latent_sampling=sample needs) | mean
    dtype: str = "bfloat16"  # bfloat16 | float32: latents and embeddings as stored
    embeddings: bool = True  # text-encoder outputs once per unique prompt (with encode only)
    num_actors: int = 1  # Ray Data actors, each holding the VAE and the text encoders
    gpus_per_actor: float = 0.0  # a fraction shares a GPU
    cpus_per_actor: float = 1.0
    batch_size: int = 16  # images per VAE batch (and prompts per text-encoder batch)
    report: str | None = None  # the bad-input report (JSON); None -> <output>/report.json


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def to_dict(self) -> dict:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["objective"] = self.objective.to_dict()
        return out

    def flat(self) -> dict[str, object]:
        """`section.field` -> value, for MLflow params."""
        out: dict[str, object] = {}

        def walk(prefix: str, d: dict) -> None:
            for k, v in d.items():
                if isinstance(v, dict) and k != "search_space":
                    walk(f"{prefix}{k}.", v)
                else:
                    out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v

        data = self.to_dict()
        # MLflow records the hyperparameters the run used, defaults included.
        data["objective"] = {"name": self.objective.name, **self.objective.resolved()}
        walk("", data)
        return out


