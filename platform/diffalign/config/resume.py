"""The fields a run may change when it resumes: the one list of them.

Resuming a run (`train.resume`, the default) continues the weights of its last checkpoint. A field
that changes what those weights are (the objective and its hyperparameters, optim, model, data,
reference, timesteps, seed, ...) must match the config the run was started with, or the record would
describe weights trained with other values: `diffalign.train.run_state.check_resume` refuses then.
The fields below change only how long the run goes on, how often it saves, evaluates, logs and
shows progress, where it is tracked and what resources it gets; every other field is result-changing.

An entry names a field (`train.max_steps`) or a whole section (`tracking`), as `RunConfig.flat()`
spells its keys.
"""

from __future__ import annotations

RESUME_SAFE_FIELDS: tuple[str, ...] = (
    # How long and how often: extending a run is a resume with a larger max_steps.
    "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
    "train.sample_every", "train.score_every", "train.log_every", "train.progress",
    "train.resume", "train.output_dir",  # resume=false never compares; a moved folder is the same run
    # Reading and memory knobs that leave every value the same.
    "data.num_workers", "data.cache_prompt_embeds", "data.on_error", "model.gradient_checkpointing",
    # The reference-mismatch probe runs before training and changes nothing it trains.
    "data.mismatch_probe", "data.mismatch_probe_n",
    # Where and what is tracked (periodic scores and sample grids are read-only).
    "tracking",
    # Ray resources and bookkeeping (the learner count, backend and sampler math are result-changing).
    "ray.address", "ray.max_failures", "ray.storage_path", "ray.placement_timeout_s", "ray.cpus_per_learner",
    "ray.reference_cpus", "ray.reference_gpus", "ray.object_store_mb", "ray.sampler.num_cpus",
    "ray.sampler.num_gpus", "ray.sampler.max_restarts",
    # Sections other recipes read (sweeps, pair building, evaluation, data preparation).
    "tune", "build", "eval", "prepare",
)


def resume_safe(key: str) -> bool:
    """Whether the flat key `section.field` may differ between a run and its resume."""
    return any(key == entry or key.startswith(entry + ".") for entry in RESUME_SAFE_FIELDS)
