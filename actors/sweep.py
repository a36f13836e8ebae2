"""Ray Tune sweeps over objective / reference hyperparameters with ASHA and MLflow.

Each trial is a Ray Train run: a driver function fits `train_with_ray` (a `TorchTrainer` with
`ray.num_learners` workers) with Tune's `TuneReportCallback` (Train V2 cannot be passed to a
`Tuner` directly). The learner reports the validation metric (held-out implicit accuracy by
default) every `tune.report_every` steps, so ASHA can stop bad trials early. Every trial is one
MLflow run (the Tuner's MLflowLoggerCallback) in the configured store; its Ray Train run, its
checkpoints and its run records (`ray/<run name>/diffalign/`) live in the trial's own folder.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

from diffalign.config import ConfigError, RunConfig, apply_overrides, config_from_dict, copy_dict

log = logging.getLogger(__name__)

SPACES = ("loguniform", "uniform", "choice", "randint")
DRIVER_CPUS = 0.01  # a trial's driver function; its Ray Train workers request their own CPUs


def search_space(cfg: RunConfig) -> dict:
    from ray import tune

    space = {}
    for key, spec in cfg.tune.search_space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACES:
            raise ConfigError(f"tune.search_space.{key} must be one of {{{', '.join(SPACES)}: [...]}}")
        kind, args = next(iter(spec.items()))
        space[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    if not space:
        raise ConfigError("tune.search_space is empty: e.g. {objective.beta: {loguniform: [100, 5000]}}")
    # Validate one sample of the space now, before any trial starts.
    trial_config(cfg, {k: (v.sample() if hasattr(v, "sample") else v) for k, v in space.items()}, "probe")
    return space


def trial_config(cfg: RunConfig, params: dict, trial_dir: str) -> RunConfig:
    data = apply_overrides(copy_dict(cfg.to_dict()), [f"{k}={json.dumps(v)}" for k, v in params.items()])
    train, every = data["train"], cfg.tune.report_every
    train["output_dir"] = str(Path(trial_dir))
    data["ray"]["storage_path"] = str(Path(trial_dir) / "ray")  # its Ray Train run stays in the trial folder
    data["tracking"]["mlflow"] = False  # the Tuner's MLflowLoggerCallback logs each trial
    train["progress"] = False
    # The learner reports to Ray Train every log_every steps and at each checkpoint, and every report
    # is one Tune iteration that must carry the metric: evaluate, log and checkpoint on one grid.
    train["eval_every"] = train["log_every"] = every
    train["checkpoint_every"] = every * math.ceil(train["checkpoint_every"] / every)
    return config_from_dict(data, check_paths=False)


def _trial(params: dict, base: dict) -> None:
    """One Tune trial: a Ray Train run whose reports reach Tune through TuneReportCallback."""
    from diffalign.actors.learner import train_with_ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(config_from_dict(base, check_paths=False), params, tune.get_context().get_trial_dir())
    train_with_ray(cfg, run_callbacks=[TuneReportCallback()], save_weights=False)


def concurrent_trials(cfg: RunConfig, cluster: dict[str, float]) -> int:
    """tune.max_concurrent, lowered until the learners of every running trial fit the cluster at once.
    A trial whose learners queue behind another trial's would otherwise fail once
    ray.placement_timeout_s has passed; Tune keeps the trials it does not start yet pending instead."""
    from diffalign.actors.resources import total_resources

    need = total_resources(cfg)
    need["CPU"] = need.get("CPU", 0.0) + DRIVER_CPUS
    fits = min((int(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0), default=1)
    return max(1, min(cfg.tune.max_concurrent, fits))


def run_sweep(cfg: RunConfig) -> dict:
    import ray
    from diffalign.actors.cluster import ensure_ray
    from diffalign.actors.learner import PlacementTimeoutError, absolute_local_paths
    from diffalign.tracking import tracking_uri, use_experiment
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    cfg = copy.deepcopy(cfg)
    absolute_local_paths(cfg)  # a trial runs in its own folder: a relative data.path must not move
    t = cfg.tune
    space = search_space(cfg)
    ensure_ray(cfg)
    concurrent = concurrent_trials(cfg, ray.cluster_resources())
    if concurrent < t.max_concurrent:
        log.warning("tune.max_concurrent=%d lowered to %d: the learners of more trials at once do not "
                    "fit the cluster (%s)", t.max_concurrent, concurrent, ray.cluster_resources())
    max_reports = math.ceil(cfg.train.max_steps / t.report_every)  # the last step reports too
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_reports, grace_period=t.grace_period,
                              reduction_factor=t.reduction_factor)
    out = Path(cfg.train.output_dir).resolve()
    import mlflow

    # Created here with its artifact location in the sweep folder (MLflowLoggerCallback's would be ./mlruns).
    use_experiment(mlflow, cfg.tracking.experiment, tracking_uri(cfg))
    tuner = tune.Tuner(
        # The trial driver only waits on its Ray Train run: it takes next to no CPU (Tune refuses an
        # empty request), the run's learners take ray.cpus_per_learner each, so trials queue for
        # learner CPUs instead of holding CPUs their own learners need.
        tune.with_resources(tune.with_parameters(_trial, base=cfg.to_dict()), {"cpu": DRIVER_CPUS}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, scheduler=scheduler,
                                    num_samples=t.num_samples, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(
            name="sweep", storage_path=str(out / "tune"),
            callbacks=[MLflowLoggerCallback(tracking_uri=tracking_uri(cfg),
                                            experiment_name=cfg.tracking.experiment, save_artifact=False)],
        ),
    )
    results = tuner.fit()
    unplaced = [str(r.error) for r in results if r.error is not None and
                "could not be placed within ray.placement_timeout_s" in str(r.error)]
    if unplaced:  # a lost trial would make the best config a guess: fail, naming what it waited for
        message = next(line for line in unplaced[0].splitlines() if "could not be placed" in line)
        raise PlacementTimeoutError(f"{len(unplaced)} of {len(results)} sweep trials failed: "
                                    f"{message.split('PlacementTimeoutError: ')[-1].strip()}")
    best = results.get_best_result()
    summary = {
        "best_params": best.config, "best_metric": best.metrics.get(t.metric), "metric": t.metric,
        "num_trials": len(results), "trials": [
            {"params": r.config, t.metric: (r.metrics or {}).get(t.metric),
             "iterations": (r.metrics or {}).get("training_iteration"), "path": r.path} for r in results
        ],
    }
    (out / "best.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
