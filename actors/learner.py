"""The learner: Ray Train `TorchTrainer` workers that each run the plain loop (`diffalign.train.loop`)
under DDP or DeepSpeed, with checkpoints that Ray Train persists and restores after a failure.

Checkpoint layout (one Ray checkpoint = the merged folders every worker reports):
    weights.safetensors, state.pt    rank 0: trainable weights + loop state (diffalign format,
                                     loadable by `Trainer.restore` / `load_checkpoint`)
    rank-<r>.pt                      every rank: its RNG and guard state (data order and noise are
                                     per rank, so exact resume needs each rank's own generator)
    deepspeed/ds/...                 DeepSpeed only: every rank's ZeRO shard (optimizer state)

Rank 0 also appends to `<output_dir>/ray_steps.jsonl` (one line per attempt start and per
completed step) and writes `<output_dir>/ray_final.json` at the end, since Ray's `Result.metrics`
only holds metrics that came with a checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffalign.config import RunConfig
from diffalign.models.weights import state_fingerprint
from diffalign.train.checkpoint import rng_state, save_checkpoint, set_rng_state
from diffalign.train.engine import TorchEngine, build_optimizer
from diffalign.train.protocols import Callback

log = logging.getLogger(__name__)

STEP_LOG = "ray_steps.jsonl"
FINAL_JSON = "ray_final.json"


@dataclass
class FaultInjection:
    """For tests: worker `rank` calls `os._exit(1)` after optimizer step `kill_at_step`, once per
    marker file (the restarted worker sees the marker and carries on)."""

    kill_at_step: int
    rank: int = 1
    marker: str | None = None    # None -> <output_dir>/.fault_injected

    def marker_path(self, cfg: RunConfig) -> Path:
        return Path(self.marker or Path(cfg.train.output_dir) / ".fault_injected")


# --------------------------------------------------------------------------- worker side

def worker_run_config(cfg: RunConfig, rank: int) -> RunConfig:
    """The config a worker runs: Ray owns resume (its checkpoint), only rank 0 shows progress."""
    cfg = copy.deepcopy(cfg)
    cfg.train.resume = False
    cfg.train.progress = cfg.train.progress and rank == 0
    return cfg


def build_engine(cfg: RunConfig, setup, runtime):
    """DDP-wrapped `TorchEngine` or `DeepSpeedEngineAdapter`, from cfg.ray.backend (a `Runtime`
    engine factory: the worker's world size and device come from `runtime`)."""
    world_size = runtime.world_size
    if cfg.model.train_text_encoder and (world_size > 1 or cfg.ray.backend == "deepspeed"):
        raise ValueError("model.train_text_encoder is not supported by the Ray learner with DeepSpeed or "
                         "ray.num_learners > 1 (only the UNet is wrapped for gradient all-reduce)")
    if cfg.ray.backend == "deepspeed" and cfg.ray.zero_stage == 3:
        # ZeRO-3 shards the parameters themselves: checkpoints, EMA and reference updates read full
        # trainable weights on each rank, which would need a gather this learner does not do.
        raise ValueError("ray.zero_stage=3 is not supported by the learner; use ray.zero_stage 0, 1 or 2")
    params = [p for g in setup.param_groups for p in g["params"]]
    optimizer = build_optimizer(setup.param_groups, cfg.optim)
    unet = setup.bundle.unet
    if cfg.ray.backend == "deepspeed":
        from diffalign.actors.deepspeed_engine import DeepSpeedEngineAdapter

        return DeepSpeedEngineAdapter(unet, params, optimizer, cfg, world_size)
    forward = unet
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Every trainable parameter (full UNet or LoRA adapters) is used in each forward.
        device = torch.device(runtime.device or "cpu")
        forward = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=False)
    return TorchEngine(unet, params, optimizer, cfg.optim, cfg.train.max_steps, forward_module=forward)


def write_worker_checkpoint(trainer, root: str | Path, rank: int, world_size: int) -> Path:
    """Writes this worker's part of the checkpoint of `trainer.step` under `root`; returns its folder."""
    root = Path(root)
    folder = root / f"checkpoint-{trainer.step}"
    if rank == 0:
        save_checkpoint(root, trainer.step, trainer.trainable_weights(), trainer.state(), keep=0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"step": trainer.step, "rank": rank, "world_size": world_size,
                "rng": rng_state(trainer.generator), "guard": trainer.guard.state_dict()},
               folder / f"rank-{rank}.pt")
    if getattr(trainer.engine, "sharded", False):
        trainer.engine.save_sharded(folder)
    return folder


def restore_worker_checkpoint(trainer, folder: str | Path, rank: int) -> None:
    """Exact restore of one worker from a merged checkpoint folder."""
    folder = Path(folder)
    trainer.restore(folder)  # weights, engine (replicated part), reference, EMA, step, guard
    rank_file = folder / f"rank-{rank}.pt"
    if rank_file.exists():
        own = torch.load(rank_file, weights_only=False)
        set_rng_state(own["rng"], trainer.generator)
        trainer.guard.load_state_dict(own["guard"])
    else:
        log.warning("checkpoint %s has no state for rank %d (world size changed?): using rank 0's RNG",
                    folder, rank)
    if getattr(trainer.engine, "sharded", False):
        trainer.engine.load_sharded(folder)


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


class GlobalLoss(Callback):
    """Trainer callback for several ranks: the loss the loop sees (guards, metrics) becomes the mean
    over ranks, so every rank reaches the same skip / rollback verdict and the replicas never
    diverge. The gradient is still that of the rank's own loss (DDP / DeepSpeed average it)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def on_before_backward(self, trainer, loss: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        mean = (mean / self.world_size).to(loss.dtype)
        return loss + (mean - loss.detach())


class RayReporter(Callback):
    """Trainer callback: reports metrics to Ray Train every `log_every` steps and a checkpoint every
    `checkpoint_every` steps (and at the last step). Every rank reports the same number of times."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, attempt: str,
                 fault: FaultInjection | None = None) -> None:
        self.cfg, self.rank, self.world_size, self.attempt, self.fault = cfg, rank, world_size, attempt, fault
        self.step_log = Path(cfg.train.output_dir) / STEP_LOG

    def on_start(self, trainer) -> None:
        # The loop keeps a guard rollback target on rank 0 only; every rank needs one.
        if self.rank != 0 and self.cfg.guard.enabled:
            trainer.save()

    def on_step(self, trainer, metrics: dict) -> None:
        import ray.train

        step, t = trainer.step, self.cfg.train
        if self.rank != 0 and self.cfg.guard.enabled and step % t.checkpoint_every == 0:
            trainer.save()  # rank 0's loop does the same right after the callbacks
        if self.rank == 0:
            record = {"event": "step", "attempt": self.attempt, "step": step, "loss": metrics.get("loss")}
            if self.fault is not None:  # test runs: weights per step, to compare attempts exactly
                record["fingerprint"] = state_fingerprint(trainer.trainable_weights())
            _append_jsonl(self.step_log, record)
        self._maybe_fail(step)
        due_ckpt = step % t.checkpoint_every == 0 or step == t.max_steps
        if not (due_ckpt or step % t.log_every == 0):
            return
        report = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        report["step"] = step
        if not due_ckpt:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory(prefix="diffalign-ckpt-") as tmp:
            folder = write_worker_checkpoint(trainer, tmp, self.rank, self.world_size)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))

    def _maybe_fail(self, step: int) -> None:
        f = self.fault
        if f is None or f.rank != self.rank or f.kill_at_step != step:
            return
        marker = f.marker_path(self.cfg)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed rank {self.rank} after step {step}\n")
        # Die after Ray has committed the checkpoints reported so far, so the test knows which
        # one the restart resumes from (a crash can otherwise beat the controller's bookkeeping).
        try:
            from ray.train import CheckpointConsistencyMode, get_all_reported_checkpoints

            get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=60)
        except Exception as exc:  # noqa: BLE001 - dying anyway; the run is still exact, only older
            log.warning("could not wait for committed checkpoints before the injected failure: %s", exc)
        os._exit(1)


class RankFingerprints(Callback):
    """Trainer callback: at the end of training, every rank's weight fingerprint (a collective), so
    the run can show its replicas never diverged. Before the final save, so loading EMA weights for
    the save cannot look like ranks out of sync."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.fingerprints: list[str] = []

    def on_end(self, trainer, summary: dict) -> None:
        import torch.distributed as dist

        fingerprint = state_fingerprint(trainer.trainable_weights())
        self.fingerprints = [fingerprint]
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            self.fingerprints = [None] * self.world_size
            dist.all_gather_object(self.fingerprints, fingerprint)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: the one driver's build and fit-and-save, with this worker's
    rank, engine, reference client and Ray reporting; restored from Ray's checkpoint if there is one."""
    import ray.train
    from diffalign.actors.deepspeed_engine import optimizer_step_count
    from diffalign.train.driver import Runtime, build_trainer, fit_and_save

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    cfg = worker_run_config(config["cfg"], rank)
    device = torch.device("cpu")
    if cfg.ray.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    attempt = uuid.uuid4().hex[:8]

    reference = None
    if config.get("reference_actor") is not None:
        from diffalign.actors.reference_actor import RemoteReference

        reference = RemoteReference(config["reference_actor"], cfg, driver=rank == 0)
    data = None
    if cfg.online.enabled:  # target images + on-policy rejected samples (rank 0 owns the sampler pool)
        from diffalign.actors.online import OnlineData

        data = OnlineData()
    fingerprints = RankFingerprints(world_size)
    callbacks = [GlobalLoss(world_size)] if world_size > 1 else []
    callbacks += config["callbacks_factory"](cfg, rank) if config.get("callbacks_factory") else []
    if rank == 0 and cfg.tracking.mlflow:  # before the reporter: a step is logged before it is reported
        from diffalign.tracking import MlflowRun

        callbacks.append(MlflowRun(cfg))
    callbacks += [RayReporter(cfg, rank, world_size, attempt, config.get("fault")), fingerprints]
    local_ckpts = Path(tempfile.mkdtemp(prefix=f"diffalign-rank{rank}-"))  # guard rollback target only
    trainer = build_trainer(cfg, Runtime(device=device, rank=rank, world_size=world_size, reference=reference,
                                         engine_factory=build_engine, data=data, callbacks=callbacks,
                                         checkpoint_dir=local_ckpts))
    restored = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restore_worker_checkpoint(trainer, folder, rank)
        restored = trainer.step
    if rank == 0:
        _append_jsonl(Path(cfg.train.output_dir) / STEP_LOG, {
            "event": "start", "attempt": attempt, "restored_step": restored, "world_size": world_size,
            "optimizer_steps": optimizer_step_count(trainer.engine), "time": time.time()})

    # The MLflow run saves the weights it logs, so a tracked sweep trial saves them too.
    summary = fit_and_save(trainer, save_weights=config.get("save_weights", True) or cfg.tracking.mlflow)
    if rank == 0:
        fps = fingerprints.fingerprints
        out = {"metrics": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
               "step": trainer.step, "world_size": world_size, "backend": cfg.ray.backend,
               "rank_fingerprints": fps, "ranks_in_sync": len(set(fps)) == 1,
               "optimizer_steps": optimizer_step_count(trainer.engine), "weights": summary["weights"]}
        path = Path(cfg.train.output_dir) / FINAL_JSON
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
    shutil.rmtree(local_ckpts, ignore_errors=True)


# --------------------------------------------------------------------------- driver side

def storage_path(cfg: RunConfig) -> Path:
    return Path(cfg.ray.storage_path or Path(cfg.train.output_dir) / "ray").resolve()


def run_name(cfg: RunConfig) -> str:
    """Same name + storage path = Ray resumes that run; with train.resume=false a new name is used."""
    name = cfg.tracking.run_name or f"diffalign-{cfg.objective.name}"
    if not cfg.train.resume and (storage_path(cfg) / name).exists():
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return name


# Fields that may name local files; a value that is not an existing path (a hub id) is left alone.
LOCAL_PATH_FIELDS = (("data", "path"), ("data", "mismatch_probe"), ("model", "pretrained"), ("model", "vae"),
                     ("tracking", "score_prompts"), ("ray", "storage_path"))


def _absolute_if_local(value: str) -> str:
    return os.path.abspath(value) if not os.path.isabs(value) and os.path.exists(value) else value


def absolute_local_paths(cfg: RunConfig) -> None:
    """Ray workers run in their own working directory: relative local paths become absolute here."""
    for section, name in LOCAL_PATH_FIELDS:
        part = getattr(cfg, section)
        value = getattr(part, name)
        if isinstance(value, str) and value:
            setattr(part, name, _absolute_if_local(value))
    if cfg.tracking.scorers:  # "name:path,...": only the path parts
        from diffalign.specs import parse_scorers

        specs = parse_scorers(cfg.tracking.scorers)
        cfg.tracking.scorers = ",".join(name if path is None else f"{name}:{_absolute_if_local(path)}"
                                        for name, path in specs.items())


# Ray Train V2 reads it in its controller actor, which gets the driver's value (ENV_VARS_TO_PROPAGATE).
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class PlacementTimeoutError(RuntimeError):
    """The cluster could not place a run's Ray Train learners within `ray.placement_timeout_s`."""


def is_placement_timeout(exc: BaseException | None) -> bool:
    """Whether `exc` (or what it wraps: Ray Train's ControllerError, Tune's errors) is Ray Train's
    worker-group startup timeout, i.e. the learners' placement group was never ready."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ == "WorkerGroupStartupTimeoutError" or (
                "worker group startup timed out" in str(exc)):
            return True
        exc = getattr(exc, "controller_failure", None) or exc.__cause__ or exc.__context__
    return False


def placement_error(cfg: RunConfig, run: str, available: dict | None = None,
                    total: dict | None = None) -> PlacementTimeoutError:
    """What the learners asked for against what the cluster has (in total and free right now)."""
    import ray
    from diffalign.actors.resources import learner_resources

    r = cfg.ray
    per = learner_resources(cfg).bundle()
    total = ray.cluster_resources() if total is None else total
    available = ray.available_resources() if available is None else available
    ask = ", ".join(f'"{k}": {v:g}' for k, v in per.items())
    need = ", ".join(f"{k} {v * r.num_learners:g}" for k, v in per.items())
    have = ", ".join(f"{k} {available.get(k, 0.0):g} free of {total.get(k, 0.0):g}" for k in per)
    return PlacementTimeoutError(
        f"Ray Train learners of run {run!r} could not be placed within ray.placement_timeout_s="
        f"{r.placement_timeout_s:g} s: they asked for {r.num_learners} learner(s) x {{{ask}}} "
        f"({need} in all) and the cluster has {have}. Something else holds the rest (another run or "
        "sweep trial, an actor, or a placement group a dead run leaked: `ray list placement-groups`); "
        "free it, lower ray.num_learners or ray.cpus_per_learner, or raise ray.placement_timeout_s.")


def train_with_ray(cfg: RunConfig, callbacks_factory: Callable[[RunConfig, int], list] | None = None,
                   fault: FaultInjection | None = None, run_callbacks: Sequence = (),
                   save_weights: bool = True) -> dict:
    """`_train_with_ray`, holding the run folder's lock on the driver (`RunLock`: a second training
    into `train.output_dir` raises RunLocked); the workers, which Ray may restart, take none."""
    from diffalign.train.run_state import RunLock

    with RunLock(Path(cfg.train.output_dir).resolve()):
        return _train_with_ray(cfg, callbacks_factory, fault, run_callbacks, save_weights)


def _train_with_ray(cfg: RunConfig, callbacks_factory: Callable[[RunConfig, int], list] | None = None,
                    fault: FaultInjection | None = None, run_callbacks: Sequence = (),
                    save_weights: bool = True) -> dict:
    """Fits a Ray Train `TorchTrainer` with `cfg.ray.num_learners` workers; returns
    {"metrics", "step", "checkpoint", "path", "rank_fingerprints", "ranks_in_sync", "mlflow_run_id",
    "weights", ...}.

    `callbacks_factory(cfg, rank)` builds extra Trainer callbacks on each worker (it is pickled).
    `run_callbacks` go to `ray.train.RunConfig(callbacks=...)` (e.g. Tune's `TuneReportCallback`).
    With `tracking.mlflow`, rank 0 logs one MLflow run. Rank 0 saves the final weights in diffusers
    format ("weights": LoRA file / UNet folder) unless `save_weights=False` (sweep trials: the last
    checkpoint of each trial holds them).
    """
    import ray.train
    from diffalign import tracking
    from diffalign.actors.cluster import ensure_ray
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray(cfg)
    out_dir = Path(cfg.train.output_dir).resolve()
    cfg = copy.deepcopy(cfg)
    cfg.train.output_dir = str(out_dir)  # workers may run in another working directory
    absolute_local_paths(cfg)
    actor = None
    if cfg.reference.placement == "actor" and cfg.reference.strategy != "none":
        from diffalign.actors.reference_actor import spawn_reference_actor

        actor = spawn_reference_actor(cfg, fresh=True)
    (out_dir / FINAL_JSON).unlink(missing_ok=True)  # never report an earlier run's summary
    name = run_name(cfg)
    if cfg.tracking.mlflow:  # rank 0's MlflowRun logs one MLflow run; a restarted worker continues it
        tracking.prepare_record(cfg, resuming=(storage_path(cfg) / name).exists())
    r = cfg.ray
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "fault": fault, "callbacks_factory": callbacks_factory,
                           "reference_actor": actor, "save_weights": save_weights},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_learners, use_gpu=r.use_gpu,
                                               resources_per_worker={"CPU": r.cpus_per_learner}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path(cfg)),
            # A learner group that cannot be placed fails once ray.placement_timeout_s has passed (the
            # controller would otherwise retry the startup forever: its default limit is -1).
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures, controller_failure_limit=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints)),
            callbacks=list(run_callbacks),
        ),
    )
    previous_timeout = os.environ.get(WORKER_GROUP_START_TIMEOUT_ENV)
    os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = str(float(r.placement_timeout_s))
    try:
        result = trainer.fit()
    except BaseException as exc:
        if cfg.tracking.mlflow:
            tracking.mark_failed(cfg)
        if is_placement_timeout(exc):
            raise placement_error(cfg, name) from exc
        raise
    finally:
        if previous_timeout is None:
            os.environ.pop(WORKER_GROUP_START_TIMEOUT_ENV, None)
        else:
            os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = previous_timeout
        if actor is not None:
            ray.kill(actor)
    final_path = out_dir / FINAL_JSON
    final = json.loads(final_path.read_text()) if final_path.exists() else {}
    mlflow_run = tracking.read_record(cfg) if cfg.tracking.mlflow else {}
    return {
        "metrics": final.get("metrics", dict(result.metrics or {})),
        "step": final.get("step"),
        "checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
        "path": result.path,
        "rank_fingerprints": final.get("rank_fingerprints"),
        "ranks_in_sync": final.get("ranks_in_sync"),
        "optimizer_steps": final.get("optimizer_steps"),
        "step_log": str(out_dir / STEP_LOG),
        "mlflow_run_id": mlflow_run.get("run_id"),
        "weights": mlflow_run.get("weights") or final.get("weights"),
    }


def read_step_log(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def effective_steps(records: list[dict]) -> list[int]:
    """The steps that survive into the final state: each attempt's steps up to where the next
    attempt restored from, then the next attempt's. Equal to 1..N when nothing was lost or repeated."""
    attempts: list[tuple[int, list[int]]] = []
    for rec in records:
        if rec["event"] == "start":
            attempts.append((rec["restored_step"], []))
        elif rec["event"] == "step" and attempts:
            attempts[-1][1].append(rec["step"])
    steps: list[int] = []
    for restored, done in attempts:
        steps = [s for s in steps if s <= restored] + done
    return steps
