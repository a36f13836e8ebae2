"""Learners the cluster cannot place fail after ray.placement_timeout_s, naming what they asked for and
what the cluster has; they never wait (or let Ray Train retry) forever."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from diffalign.config import ConfigError, load_config

TIMEOUT_S = 3  # the bound under test: small, so the test stays short


def test_placement_timeout_is_a_validated_config_field(tiny_cfg):
    assert load_config(None, []).ray.placement_timeout_s == 300
    assert tiny_cfg("ray.placement_timeout_s=7.5").ray.placement_timeout_s == 7.5
    with pytest.raises(ConfigError, match=r"ray\.placement_timeout_s must be > 0"):
        tiny_cfg("ray.placement_timeout_s=0")


def test_sweep_concurrency_fits_the_learners_of_every_running_trial(tiny_cfg):
    from diffalign.actors.sweep import concurrent_trials

    cfg = tiny_cfg("tune.max_concurrent=4", "ray.num_learners=2")
    assert concurrent_trials(cfg, {"CPU": 16.0}) == 4
    assert concurrent_trials(cfg, {"CPU": 4.0}) == 1  # 2 x (2 learners + the trial driver) > 4 CPUs
    assert concurrent_trials(cfg, {"CPU": 2.0}) == 1  # never 0: check_fits refuses what never fits
    gpu = tiny_cfg("tune.max_concurrent=8", "ray.use_gpu=true")
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 3.0}) == 3


def test_is_placement_timeout_sees_through_wrappers():
    from diffalign.actors.learner import is_placement_timeout
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    assert is_placement_timeout(ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)))
    try:
        raise RuntimeError("trial failed") from ControllerError(WorkerGroupStartupTimeoutError(num_workers=1))
    except RuntimeError as e:
        assert is_placement_timeout(e)
    assert not is_placement_timeout(ControllerError(ValueError("bad worker")))
    assert not is_placement_timeout(None)


@pytest.mark.slow
def test_a_learner_larger_than_the_cluster_fails_at_once_naming_the_resources(tiny_cfg, ray_local):
    from diffalign.actors.learner import train_with_ray

    total = ray_local.cluster_resources()["CPU"]
    cfg = tiny_cfg("ray.enabled=true", f"ray.cpus_per_learner={total + 4:g}",
                   f"ray.placement_timeout_s={TIMEOUT_S}")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"does not fit the cluster \(CPU: need {total + 4:g}, "
                                          rf"cluster has {total:g}\)"):
        train_with_ray(cfg)
    assert time.monotonic() - t0 < TIMEOUT_S


@pytest.mark.slow
def test_learners_that_cannot_be_placed_fail_within_the_bound(tiny_cfg, ray_local, tmp_path):
    """The sweep hang: something (here a placement group, there a leaked one) holds the CPUs the run's
    learners need. Ray Train would retry the worker-group startup forever ("max allowed: inf")."""
    from diffalign.actors.learner import PlacementTimeoutError, train_with_ray
    from diffalign.actors.sweep import run_sweep
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    total = ray_local.cluster_resources()["CPU"]
    hold = placement_group([{"CPU": total - 1}])
    ray_local.get(hold.ready(), timeout=60)
    try:
        cfg = tiny_cfg("ray.enabled=true", "ray.num_learners=1", "ray.cpus_per_learner=2",
                       f"ray.placement_timeout_s={TIMEOUT_S}", "tracking.mlflow=true")
        t0 = time.monotonic()
        with pytest.raises(PlacementTimeoutError) as info:
            train_with_ray(cfg)
        elapsed = time.monotonic() - t0
        message = str(info.value)
        assert f"ray.placement_timeout_s={TIMEOUT_S} s" in message
        assert 'asked for 1 learner(s) x {"CPU": 2} (CPU 2 in all)' in message
        assert f"the cluster has CPU 1 free of {total:g}" in message
        # The bound, plus Ray Train's controller start-up and shutdown on 2 shared cores.
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + 60, elapsed
        # The MLflow record of the run that never started is not left RUNNING.
        from diffalign.tracking import read_record, tracking_uri
        from mlflow.tracking import MlflowClient

        record = read_record(cfg)
        if record:
            assert MlflowClient(tracking_uri(cfg)).get_run(record["run_id"]).info.status == "FAILED"

        # A sweep whose trials cannot place their learners fails too, naming them, instead of looping.
        sweep = load_config(Path(__file__).resolve().parents[1] / "configs/tiny/sweep.yaml", [
            f"train.output_dir={tmp_path}/sweep", "train.max_steps=2", "tune.num_samples=1",
            "ray.cpus_per_learner=2", f"ray.placement_timeout_s={TIMEOUT_S}", "data.num_pairs=8",
            "data.heldout_pairs=4"])
        t0 = time.monotonic()
        with pytest.raises(PlacementTimeoutError, match=r"1 of 1 sweep trials failed: Ray Train learners "
                                                        r"of run .* could not be placed"):
            run_sweep(sweep)
        assert time.monotonic() - t0 < TIMEOUT_S + 90
    finally:
        remove_placement_group(hold)
    # Nothing the runs created is left holding resources.
    pending = [pg for pg in placement_group_table().values() if pg["state"] not in ("REMOVED",)
               and pg["placement_group_id"] != hold.id.hex()]
    assert not pending, pending
