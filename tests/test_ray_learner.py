"""Ray learner (Ray Train + DDP), worker-failure recovery, the reference actor, resources."""

from __future__ import annotations

import math
import time

import pytest
import torch
from diffalign.actors.learner import (
    FaultInjection,
    effective_steps,
    read_step_log,
    restore_worker_checkpoint,
    write_worker_checkpoint,
)
from diffalign.actors.resources import check_fits, placement_bundles, total_resources, validate_resources
from diffalign.config import ConfigError
from diffalign.models.weights import state_fingerprint
from diffalign.train.driver import build_trainer

TWO_LEARNERS = ("ray.num_learners=2", "train.checkpoint_every=2", "optim.batch_size=2", "data.num_pairs=16")


@pytest.fixture
def one_thread():
    """The learner and the reference actor compute with the same thread count (Ray workers get
    OMP_NUM_THREADS=1): CPU kernels may round differently with another number of threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- no Ray needed

def test_effective_steps_drops_work_redone_after_a_restore():
    records = [{"event": "start", "restored_step": 0}] + [{"event": "step", "step": s} for s in (1, 2, 3)]
    records += [{"event": "start", "restored_step": 2}] + [{"event": "step", "step": s} for s in (3, 4)]
    assert effective_steps(records) == [1, 2, 3, 4]
    assert effective_steps(records[:4] + [{"event": "start", "restored_step": 0}]) == []


def test_worker_checkpoint_resumes_exactly(tiny_cfg, tmp_path):
    cfg = tiny_cfg("optim.batch_size=2", "data.num_pairs=8")
    a = build_trainer(cfg, checkpoint_dir=tmp_path / "a")
    a.train_step()
    folder = write_worker_checkpoint(a, tmp_path / "ckpt", rank=0, world_size=1)
    assert {p.name for p in folder.iterdir()} == {"weights.safetensors", "state.pt", "rank-0.pt"}
    losses = [a.train_step()["loss"] for _ in range(2)]
    b = build_trainer(cfg, checkpoint_dir=tmp_path / "b")
    restore_worker_checkpoint(b, folder, rank=0)
    assert b.step == 1
    assert [b.train_step()["loss"] for _ in range(2)] == losses
    assert state_fingerprint(b.trainable_weights()) == state_fingerprint(a.trainable_weights())


def test_mlflow_record_of_a_failed_or_fresh_ray_run(tiny_cfg):
    from diffalign import tracking
    from diffalign.tracking import tracking_uri
    from mlflow.tracking import MlflowClient

    cfg = tiny_cfg("tracking.mlflow=true")
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    run_id = client.create_run(client.create_experiment("ray-run")).info.run_id  # rank 0's open run
    tracking.write_record(cfg, {"run_id": run_id, "status": "RUNNING", "weights": None})
    tracking.mark_failed(cfg)  # the driver, when the fit raised (the worker group died for good)
    assert client.get_run(run_id).info.status == "FAILED" and tracking.read_record(cfg)["status"] == "FAILED"
    tracking.prepare_record(cfg, resuming=True)  # Ray resumes the same run: keep going with it
    assert tracking.read_record(cfg)["run_id"] == run_id
    tracking.prepare_record(cfg, resuming=False)  # a new Ray run: a new MLflow run
    assert tracking.read_record(cfg) == {}


def test_placement_bundles_and_validation(tiny_cfg):
    cfg = tiny_cfg("ray.num_learners=2", "ray.cpus_per_learner=1.5", "reference.placement=actor",
                   "ray.reference_cpus=0.5")
    assert placement_bundles(cfg) == [{"CPU": 1.5}, {"CPU": 1.5}, {"CPU": 0.5}]
    assert total_resources(cfg) == {"CPU": 3.5}
    check_fits(cfg, {"CPU": 4.0})
    with pytest.raises(ConfigError, match="CPU: need 3.5"):
        check_fits(cfg, {"CPU": 2.0})
    assert placement_bundles(tiny_cfg("objective.name=mapo", "reference.strategy=none",
                                      "reference.placement=actor")) == [{"CPU": 1.0}]
    gpu = tiny_cfg("ray.use_gpu=true", "ray.num_learners=2", "reference.placement=actor",
                   "ray.reference_gpus=0.5")
    assert placement_bundles(gpu) == [{"CPU": 1.0, "GPU": 1.0}] * 2 + [{"CPU": 1.0, "GPU": 0.5}]
    shared = tiny_cfg("ray.use_gpu=true", "ray.num_learners=2", "ray.gpus_per_learner=0.5")
    assert placement_bundles(shared) == [{"CPU": 1.0, "GPU": 0.5}] * 2  # two learners on one GPU
    assert placement_bundles(tiny_cfg("ray.gpus_per_learner=0.5")) == [{"CPU": 1.0}]  # CPU run: no GPU
    for bad, field in [(("ray.cpus_per_learner=0",), "ray.cpus_per_learner"),
                       (("ray.use_gpu=true", "ray.reference_gpus=1.5"), "ray.reference_gpus"),
                       (("ray.reference_gpus=0.5",), "ray.reference_gpus"),
                       (("ray.sampler.num_cpus=-1",), "ray.sampler.num_cpus")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            validate_resources(tiny_cfg(*bad))


# --------------------------------------------------------------------------- reference actor

def _trainer(cfg, placement: str):
    from diffalign.actors.reference_actor import RemoteReference, spawn_reference_actor

    if placement == "colocated":
        return build_trainer(cfg), None
    actor = spawn_reference_actor(cfg)
    return build_trainer(cfg, reference=RemoteReference(actor, cfg)), actor


@pytest.mark.parametrize("strategy,finetune", [("frozen", "lora"), ("periodic", "full")])
def test_reference_actor_gives_identical_losses(ray_local, tiny_cfg, one_thread, strategy, finetune):
    cfg = tiny_cfg(f"reference.strategy={strategy}", "reference.tau=2", f"model.finetune={finetune}",
                   "optim.batch_size=2", "data.num_pairs=8")
    runs = {}
    for placement in ("colocated", "actor"):
        trainer, actor = _trainer(cfg, placement)
        runs[placement] = [(m["loss"], m["ref_mse_w"], m["ref_mse_l"], m["ref/version"])
                           for m in (trainer.train_step() for _ in range(3))]
        if actor is not None:
            ray_local.kill(actor)
    assert runs["actor"] == runs["colocated"]
    assert runs["actor"][-1][3] == (1.0 if strategy == "periodic" else 0.0)  # updated at step 2


def test_killed_reference_actor_comes_back_with_same_state(ray_local, tiny_cfg, one_thread):
    cfg = tiny_cfg("reference.strategy=periodic", "reference.tau=1", "optim.batch_size=2", "data.num_pairs=8")
    trainer, actor = _trainer(cfg, "actor")
    for _ in range(2):
        trainer.train_step()
    before = ray_local.get(actor.info.remote())
    assert before["version"] == 2 and before["step"] == 2 and not before["restored"]
    probe = trainer._micro_batch(0)
    res = trainer.setup.step(trainer.engine.forward_module, probe, torch.Generator().manual_seed(0))
    ref_before = res.out.metrics["ref_mse_w"]

    ray_local.kill(actor, no_restart=False)
    after, deadline = before, time.monotonic() + 180
    while after["pid"] == before["pid"] and time.monotonic() < deadline:  # the kill is asynchronous
        try:
            after = ray_local.get(actor.info.remote(), timeout=120)
        except ray_local.exceptions.RayActorError:
            time.sleep(0.5)
    assert after["pid"] != before["pid"] and after["restored"]
    for key in ("version", "step", "frozen", "reference_fingerprint"):
        assert after[key] == before[key], key
    res = trainer.setup.step(trainer.engine.forward_module, probe, torch.Generator().manual_seed(0))
    assert res.out.metrics["ref_mse_w"] == ref_before
    assert trainer.train_step()["ref/version"] == 3  # and it keeps serving and updating
    ray_local.kill(actor)


# --------------------------------------------------------------------------- Ray Train learners

@pytest.mark.slow
def test_two_ddp_learners_with_reference_actor(ray_local, tiny_cfg):
    from diffalign.actors.learner import train_with_ray

    # Guards on: every rank keeps its own rollback target and sees the same (rank-mean) loss.
    cfg = tiny_cfg(*TWO_LEARNERS, "reference.placement=actor", "reference.strategy=periodic",
                   "reference.tau=2", "guard.enabled=true")
    out = train_with_ray(cfg)
    assert out["step"] == 4 and math.isfinite(out["metrics"]["loss"])
    assert out["metrics"]["ref/version"] == 2.0  # the actor updated at steps 2 and 4
    assert out["ranks_in_sync"] and len(out["rank_fingerprints"]) == 2
    assert out["checkpoint"] is not None
    fresh = build_trainer(tiny_cfg(*TWO_LEARNERS, "reference.strategy=periodic", "reference.tau=2"))
    fresh.restore(out["checkpoint"])
    assert fresh.step == 4 and fresh.setup.reference.version == 2
    assert state_fingerprint(fresh.trainable_weights()) == out["rank_fingerprints"][0]


@pytest.mark.slow
def test_killed_learner_resumes_exactly(ray_local, tiny_cfg):
    from diffalign.actors.learner import train_with_ray

    cfg = tiny_cfg(*TWO_LEARNERS, "tracking.mlflow=true")
    out = train_with_ray(cfg, fault=FaultInjection(kill_at_step=4, rank=1))
    assert out["step"] == 4 and out["ranks_in_sync"]
    log = read_step_log(out["step_log"])
    starts = [r for r in log if r["event"] == "start"]
    assert len(starts) == 2, log
    # Restarted from the step-2 checkpoint with the optimizer state of 2 steps.
    assert starts[1]["restored_step"] == 2 and starts[1]["optimizer_steps"] == 2
    assert effective_steps(log) == [1, 2, 3, 4]
    first = {r["step"]: r for r in log if r["event"] == "step" and r["attempt"] == starts[0]["attempt"]}
    again = {r["step"]: r for r in log if r["event"] == "step" and r["attempt"] == starts[1]["attempt"]}
    assert sorted(first) == [1, 2, 3, 4] and sorted(again) == [3, 4]
    for step in (3, 4):  # the redone steps reproduce the lost ones bit for bit
        assert again[step]["loss"] == first[step]["loss"]
        assert again[step]["fingerprint"] == first[step]["fingerprint"]
    assert out["rank_fingerprints"][0] == first[4]["fingerprint"]
    # Rank 0 of the restarted group continued the same MLflow run: one run, every step logged (the
    # redone steps twice, with the same loss), the final weights, status FINISHED.
    from diffalign.tracking import tracking_uri
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [out["mlflow_run_id"]] and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(out["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 3, 4, 4]
    assert all(m.value == first[m.step]["loss"] for m in history)
    assert out["weights"].endswith("unet") and client.list_artifacts(out["mlflow_run_id"], "weights/unet")
