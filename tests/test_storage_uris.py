"""Storage URIs end to end for Ray runs: `ray.storage_path` and `train.output_dir` on s3:// (the loopback
moto server of tests/s3_server.py), MLflow on a real tracking server whose artifacts go to S3
(tests/mlflow_server.py), run records read back from shared storage, bounded rollback checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffalign.config import ConfigError
from diffalign.data import uri
from mlflow_server import mlflow_server  # noqa: F401 - the fixture

# --------------------------------------------------------------------------- config checks


def test_a_uri_output_dir_needs_ray_learners(tiny_cfg):
    with pytest.raises(ConfigError, match=r"train\.output_dir='s3://runs/x' is a URI.*ray\.enabled=true"):
        tiny_cfg("train.output_dir=s3://runs/x")
    cfg = tiny_cfg("train.output_dir=s3://runs/x", "ray.enabled=true")  # MLflow off in tiny_cfg: accepted
    assert cfg.train.output_dir == "s3://runs/x"


@pytest.mark.parametrize("tracking", [(), ("tracking.tracking_uri=sqlite:///tmp/m.db",)])
def test_a_uri_output_dir_refuses_a_sqlite_tracking_store(tiny_cfg, tracking):
    with pytest.raises(ConfigError, match=r"tracking\.tracking_uri=.*cannot live on object storage"):
        tiny_cfg("train.output_dir=s3://runs/x", "ray.enabled=true", "tracking.mlflow=true", *tracking)
    # Control: an MLflow server is what such a run logs to.
    cfg = tiny_cfg("train.output_dir=s3://runs/x", "ray.enabled=true", "tracking.mlflow=true",
                   "tracking.tracking_uri=http://127.0.0.1:5000")
    assert cfg.tracking.tracking_uri == "http://127.0.0.1:5000"


@pytest.mark.parametrize("field", ["train.local_dir", "guard.rollback_dir"])
def test_worker_folders_must_be_local(tiny_cfg, tmp_path, field):
    with pytest.raises(ConfigError, match=rf"{field.replace('.', r'[.]')}='s3://b/x' must be a local folder"):
        tiny_cfg(f"{field}=s3://b/x")
    assert tiny_cfg(f"{field}={tmp_path}/w")  # a local one is fine


def test_rollback_bound_is_a_numeric_field_checked_at_load(tiny_cfg):
    with pytest.raises(ConfigError, match=r"guard\.rollback_max_mb must be >= 0"):
        tiny_cfg("guard.rollback_max_mb=-1")


# --------------------------------------------------------------------------- rollback checkpoints


def _checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_rollback_estimate_matches_a_real_checkpoint_and_the_bound_names_the_field(tiny_cfg, tmp_path):
    from diffalign.actors.learner import RollbackTooLarge, check_rollback_size, rollback_checkpoint_bytes
    from diffalign.train.driver import build_trainer

    cfg = tiny_cfg("guard.enabled=true", "optim.batch_size=2", "data.num_pairs=8")
    trainer = build_trainer(cfg, checkpoint_dir=tmp_path / "rb")
    estimate = rollback_checkpoint_bytes(trainer)  # before any step: Adam's moments do not exist yet
    trainer.train_step()
    real = _checkpoint_bytes(trainer.save())  # after a step: weights, both moments, loop state
    print({"estimate_mb": estimate / 2**20, "checkpoint_mb": real / 2**20})
    assert 0.97 * real <= estimate <= 1.03 * real  # file headers and pickling aside, the same bytes
    assert estimate > 2.5 * sum(v.numel() * v.element_size() for v in trainer.trainable_weights().values())

    below = estimate / 2**20 * 0.9
    with pytest.raises(RollbackTooLarge, match=rf"guard\.rollback_max_mb={below:g}: one rollback checkpoint"):
        check_rollback_size(tiny_cfg("guard.enabled=true", f"guard.rollback_max_mb={below}"), trainer)
    assert issubclass(RollbackTooLarge, ConfigError)
    check_rollback_size(tiny_cfg("guard.enabled=true", f"guard.rollback_max_mb={estimate / 2**20 * 1.1}"),
                        trainer)
    check_rollback_size(tiny_cfg("guard.enabled=true", "guard.rollback_max_mb=0"), trainer)  # no bound
    # Guards off: no rollback target is ever written, so nothing to bound.
    check_rollback_size(tiny_cfg("guard.enabled=false", f"guard.rollback_max_mb={below}"), trainer)


def test_a_worker_keeps_one_rollback_checkpoint(tiny_cfg, tmp_path):
    from diffalign.actors.learner import OneRollbackCheckpoint
    from diffalign.train.checkpoint import list_checkpoints
    from diffalign.train.driver import build_trainer

    cfg = tiny_cfg("guard.enabled=true", "train.keep_checkpoints=3", "optim.batch_size=2", "data.num_pairs=8")
    folder = tmp_path / "rb"
    kept = build_trainer(cfg, checkpoint_dir=folder, callbacks=[OneRollbackCheckpoint(folder)])
    control = build_trainer(cfg, checkpoint_dir=tmp_path / "control")  # the loop alone keeps 3
    for trainer in (kept, control):
        for _ in range(3):
            trainer.train_step()
            trainer.save()
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-3"]
    assert len(list_checkpoints(tmp_path / "control")) == 3


# --------------------------------------------------------------------------- records on S3 (no Ray)


def test_storage_path_keeps_a_uri_and_resolves_a_local_path(tiny_cfg, tmp_path, monkeypatch):
    from diffalign.actors.learner import records_dir, storage_path

    assert storage_path(tiny_cfg("train.output_dir=s3://runs/out", "ray.enabled=true")) == "s3://runs/out/ray"
    assert storage_path(tiny_cfg("ray.storage_path=s3://runs/r?region=x")) == "s3://runs/r?region=x"
    monkeypatch.chdir(tmp_path)
    assert storage_path(tiny_cfg("ray.storage_path=rel/ray")) == str(tmp_path / "rel" / "ray")
    assert records_dir(tiny_cfg("ray.storage_path=s3://runs/r"), "run") == "s3://runs/r/run/diffalign"


def test_step_logs_and_run_name_on_s3(s3_server, tiny_cfg):
    from diffalign.actors.learner import StepLog, effective_steps, read_step_log, run_name

    bucket = s3_server.make_bucket("records")
    folder = f"{bucket}/ray/run/diffalign"
    first, second = StepLog(folder, "aaaa"), None
    first.add({"event": "start", "restored_step": 0})
    for s in (1, 2, 3):
        first.add({"event": "step", "step": s})
    first.flush()
    second = StepLog(folder, "0000")  # named after the first: read after it, whatever its attempt id
    second.add({"event": "start", "restored_step": 2})
    second.flush()
    second.add({"event": "step", "step": 3})
    second.add({"event": "step", "step": 4})
    second.flush()  # rewritten whole: S3 cannot append
    assert uri.list_files(folder) == [f"{folder}/steps-00001-aaaa.jsonl", f"{folder}/steps-00002-0000.jsonl"]
    log = read_step_log(folder)
    assert [r.get("step", "start") for r in log] == ["start", 1, 2, 3, "start", 3, 4]
    assert effective_steps(log) == [1, 2, 3, 4]
    assert read_step_log(f"{bucket}/nothing/here") == []

    cfg = tiny_cfg(f"ray.storage_path={bucket}/ray", "train.resume=false", "tracking.run_name=run")
    assert run_name(cfg) != "run"  # s3://records/ray/run exists: a fresh run gets a new name
    assert run_name(tiny_cfg(f"ray.storage_path={bucket}/ray", "tracking.run_name=run")) == "run"  # resume
    assert run_name(tiny_cfg(f"ray.storage_path={bucket}/ray", "train.resume=false",
                             "tracking.run_name=other")) == "other"


def test_mlflow_run_record_on_s3(s3_server, tiny_cfg):
    from diffalign import tracking

    bucket = s3_server.make_bucket("record")
    cfg = tiny_cfg(f"train.output_dir={bucket}/out", "ray.enabled=true")
    assert tracking.record_path(cfg) == f"{bucket}/out/mlflow_run.json"
    assert tracking.read_record(cfg) == {}
    tracking.write_record(cfg, {"run_id": "r1", "status": "RUNNING", "weights": None})
    assert json.loads(uri.read_bytes(f"{bucket}/out/mlflow_run.json"))["run_id"] == "r1"
    tracking.prepare_record(cfg, resuming=True)  # Ray resumes the run: the record stays
    assert tracking.read_record(cfg)["run_id"] == "r1"
    tracking.prepare_record(cfg, resuming=False)  # a new run: a new MLflow run
    assert tracking.read_record(cfg) == {} and not uri.exists(f"{bucket}/out/mlflow_run.json")
    assert tracking.published_weights(cfg, Path("/scratch/rank-0/unet")) == f"{bucket}/out/unet"


# --------------------------------------------------------------------------- Ray Train on S3


def _s3_state_dict(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(uri.read_bytes(uri.join(folder, "diffusion_pytorch_model.safetensors")))


@pytest.mark.slow
def test_ray_run_on_s3_restores_from_s3_checkpoint_and_publishes_there(
        ray_local, s3_server, mlflow_server, tiny_cfg, tmp_path, monkeypatch):  # noqa: F811
    from diffalign.actors.learner import (
        FINAL_JSON,
        FaultInjection,
        effective_steps,
        read_step_log,
        train_with_ray,
    )
    from diffalign.data.demo_files import write_demo_store
    from diffalign.models.build import build_policy
    from diffalign.train.driver import build_trainer
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # a path made from a URI by mistake would appear here ("s3:/...")
    bucket = s3_server.make_bucket("roundtrip")
    store = f"{bucket}/store"
    write_demo_store(store, build_policy(tiny_cfg())[0], pairs=24, resolution=32, shard_rows=8)
    common = ("data.kind=store", f"data.path={store}", "data.heldout_pairs=4", "objective.name=dpo",
              "optim.batch_size=2", "train.checkpoint_every=2", "guard.enabled=true")
    out_dir = f"{bucket}/out"
    cfg = tiny_cfg(*common, "ray.enabled=true", f"train.output_dir={out_dir}", "tracking.mlflow=true",
                   f"tracking.tracking_uri={mlflow_server.uri}", "tracking.experiment=storage-uris",
                   f"train.local_dir={tmp_path}/scratch", f"guard.rollback_dir={tmp_path}/rollback",
                   "guard.rollback_max_mb=64")

    # Rank 0 (the one learner, which also logs to MLflow) dies after step 3; its step-2 checkpoint
    # is on S3, and the restarted worker resumes from it.
    out = train_with_ray(cfg, fault=FaultInjection(kill_at_step=3, rank=0))

    # The uninterrupted reference: the same config trained in this process, 4 steps, on the same store.
    ref = build_trainer(tiny_cfg(*common, f"train.output_dir={tmp_path}/reference"),
                        checkpoint_dir=tmp_path / "reference-ckpt")
    ref_losses = [ref.train_step()["loss"] for _ in range(4)]

    # The summary, read from S3 by the driver, is complete.
    assert out["step"] == 4 and out["ranks_in_sync"] and out["optimizer_steps"] == 4
    assert out["weights"] == f"{out_dir}/unet" and out["mlflow_run_id"]
    assert out["step_log"].startswith(f"{out_dir}/ray/")
    assert uri.is_file(uri.join(out["step_log"], FINAL_JSON))
    log = read_step_log(out["step_log"])
    starts = [r for r in log if r["event"] == "start"]
    assert len(starts) == 2 and starts[1]["restored_step"] == 2 and starts[1]["optimizer_steps"] == 2
    assert effective_steps(log) == [1, 2, 3, 4]
    again = {r["step"]: r for r in log if r["event"] == "step" and r["attempt"] == starts[1]["attempt"]}
    assert [again[s]["loss"] for s in (3, 4)] == ref_losses[2:]

    # The final weights on S3 (diffusers UNet folder) are the uninterrupted run's, tensor for tensor.
    assert uri.is_file(f"{out_dir}/unet/config.json")
    published = _s3_state_dict(f"{out_dir}/unet")
    reference = ref.setup.bundle.unet.state_dict()
    assert published.keys() == reference.keys()
    assert all(torch.equal(published[k], reference[k]) for k in reference)
    assert out["rank_fingerprints"][0] == again[4]["fingerprint"]

    # Ray Train's checkpoints are objects in the bucket (the restore read them from there).
    stored_run = uri.list_files(f"{out_dir}/ray", recursive=True)
    ckpts = [f for f in stored_run if f.endswith("/weights.safetensors")]
    assert len(ckpts) >= 2 and any("checkpoint_" in f for f in ckpts), ckpts
    assert uri.is_file(f"{out_dir}/samples/final.png")  # the final sample grid
    record = json.loads(uri.read_bytes(f"{out_dir}/mlflow_run.json"))
    assert record == {"run_id": out["mlflow_run_id"], "status": "FINISHED", "weights": f"{out_dir}/unet"}

    # One MLflow run, continued by the restarted worker, FINISHED; its artifacts are in the S3 bucket
    # behind the tracking server.
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("storage-uris").experiment_id])
    assert [r.info.run_id for r in runs] == [out["mlflow_run_id"]] and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(out["mlflow_run_id"], "loss")) == [1, 2, 3, 3, 4]
    stored = uri.list_files(mlflow_server.artifacts, recursive=True)
    run_files = [f for f in stored if f"/{out['mlflow_run_id']}/artifacts/" in f]
    assert any(f.endswith("weights/unet/diffusion_pytorch_model.safetensors") for f in run_files), stored
    assert any(f.endswith("samples/step_000004.png") for f in run_files), run_files

    # Nothing of the run on the driver's disk: no local output dir, scratch and rollback folders emptied.
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir()), list(tmp_path.iterdir())
    for folder in ("scratch", "rollback"):
        assert not [p for p in (tmp_path / folder).rglob("*") if p.is_file()], folder


@pytest.mark.slow
def test_ray_learners_read_an_s3_parquet_and_refuse_a_large_rollback(ray_local, s3_server, tiny_cfg,
                                                                     tmp_path):
    from diffalign.actors.learner import read_step_log, train_with_ray
    from diffalign.data.demo_files import write_pickapic_parquet

    bucket = s3_server.make_bucket("parquet")
    write_pickapic_parquet(tmp_path / "pairs.parquet", 16, image_size=32, row_group_size=8)
    uri.write_bytes_atomic(f"{bucket}/pickapic/train-0.parquet", (tmp_path / "pairs.parquet").read_bytes())
    data = ("data.kind=pickapic", f"data.path={bucket}/pickapic/*.parquet", "data.heldout_pairs=0",
            "optim.batch_size=2", "train.max_steps=2", "train.checkpoint_every=2", "ray.enabled=true",
            f"ray.storage_path={bucket}/ray")
    out = train_with_ray(tiny_cfg(*data, f"train.output_dir={tmp_path}/run"))
    assert out["step"] == 2 and out["metrics"]["loss"] > 0
    # Both steps trained on rows read from S3 (the learner's records are on S3 too).
    assert [r["step"] for r in read_step_log(out["step_log"]) if r["event"] == "step"] == [1, 2]
    assert out["step_log"].startswith(f"{bucket}/ray/")

    # The same run with a rollback bound below one checkpoint fails naming the field, before a step.
    with pytest.raises(ConfigError, match=r"guard\.rollback_max_mb=0\.01: one rollback checkpoint"):
        train_with_ray(tiny_cfg(*data, f"train.output_dir={tmp_path}/refused", "guard.enabled=true",
                                "guard.rollback_max_mb=0.01", "ray.max_failures=0"))


def test_target_images_folder_on_s3_reads_like_a_local_one(s3_server, tmp_path):
    """Online runs take their target images (data.path) from object storage too: the same items as
    the local folder, and an unreadable object named and left out as locally."""
    from diffalign.data.files import ImageFolderDataset
    from PIL import Image

    local = tmp_path / "targets"
    local.mkdir()
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (24, 20), color).save(local / f"{i}.png")
    (local / "bad.jpg").write_bytes(b"not a jpeg")
    bucket = s3_server.make_bucket("targets")
    uri.copy(local, f"{bucket}/subject")
    a = ImageFolderDataset(local, "a photo of sks dog", resolution=16, seed=3)
    b = ImageFolderDataset(f"{bucket}/subject", "a photo of sks dog", resolution=16, seed=3)
    assert len(a) == len(b) == 3 and a.issues.total == b.issues.total == 1
    assert f"{bucket}/subject/bad.jpg" in b.issues.report()
    for x, y in zip(a, b):
        assert x["prompt"] == y["prompt"] and torch.equal(x["image"], y["image"])
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataset(f"{bucket}/missing", "a photo of sks dog", resolution=16)


def test_waiting_for_an_mlflow_server_is_bounded_and_names_it():
    import socket
    import time

    from diffalign.tracking import wait_for_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port}.*tracking\.tracking_uri.*within 2 s"):
        wait_for_server(f"http://127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - t0 < 15


def test_waiting_for_a_live_mlflow_server_returns(mlflow_server):  # noqa: F811
    from diffalign.tracking import wait_for_server

    wait_for_server(mlflow_server.uri, timeout_s=5)


@pytest.mark.slow
def test_online_personalization_on_s3_targets_output_and_mlflow_server(
        ray_local, s3_server, mlflow_server, tiny_cfg, tmp_path, monkeypatch):  # noqa: F811
    """The README's cluster personalization command on the tiny model: target images, Ray storage and
    the output dir on S3, MLflow on the server; the recipe's held-out grid callback on rank 0."""
    import sys

    import ray.cloudpickle
    from diffalign.actors.learner import train_with_ray
    from mlflow.tracking import MlflowClient
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import mapo_personalize
    from mapo_personalize import GridOnRankZero, HeldoutGrid

    # As when the recipe runs as __main__: its callback classes travel by value to the workers.
    ray.cloudpickle.register_pickle_by_value(mapo_personalize)

    monkeypatch.chdir(tmp_path)
    bucket = s3_server.make_bucket("personalize")
    for i in range(3):
        Image.new("RGB", (32, 32), (200, 20 * i, 10)).save(tmp_path / f"t{i}.png")
        uri.copy(tmp_path / f"t{i}.png", f"{bucket}/targets/t{i}.png")
    out_dir = f"{bucket}/runs/personalize"
    cfg = tiny_cfg("model.finetune=lora", "model.lora_rank=4", "objective.name=mapo",
                   "reference.strategy=none", "data.kind=folder", f"data.path={bucket}/targets",
                   "data.prompt=a photo of sks thing",
                   "online.enabled=true", "online.max_staleness=2", "ray.sampler.num=1",
                   "ray.sampler.inference_steps=2", "optim.batch_size=2", "train.max_steps=3",
                   "train.checkpoint_every=3", "ray.enabled=true", f"train.output_dir={out_dir}",
                   f"ray.storage_path={bucket}/ray", "tracking.mlflow=true",
                   f"tracking.tracking_uri={mlflow_server.uri}", "tracking.experiment=personalize-s3",
                   f"train.local_dir={tmp_path}/scratch")
    grid = HeldoutGrid(cfg.data.prompt, out_dir)
    out = train_with_ray(cfg, callbacks_factory=GridOnRankZero(grid))

    assert out["step"] == 3 and out["weights"] == f"{out_dir}/lora"
    assert out["metrics"]["online/staleness_max"] <= 2 and 0 <= out["metrics"]["online/sync_share"] <= 1
    assert any(f.endswith(".safetensors") for f in uri.list_files(f"{out_dir}/lora"))
    assert uri.read_bytes(grid.path)[:8] == b"\x89PNG\r\n\x1a\n"  # the held-out grid, on S3
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("personalize-s3").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())
