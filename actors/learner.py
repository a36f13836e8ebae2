"""The learner: Ray Train `TorchTrainer` workers that each run the plain loop (`diffalign.train.loop`)
under DDP or DeepSpeed, with checkpoints that Ray Train persists and restores after a failure.

Checkpoint layout (one Ray checkpoint = the merged folders every worker reports):
    weights.safetensors, state.pt    rank 0: trainable weights + loop state (diffalign format,
                                     loadable by `Trainer.restore` / `load_checkpoint`)
    rank-<r>.pt                      every rank: its RNG and guard state (data order and noise are
                                     per rank, so exact resume needs each rank's own generator)
    deepspeed/ds/...                 DeepSpeed only: every rank's ZeRO shard (optimizer state)

Run records (`records_dir`: `<ray.storage_path>/<run name>/diffalign/`, on the storage every node
reaches, since Ray Train needs `ray.storage_path` shared anyway): rank 0 writes one step log per
attempt (`steps-<n>-<attempt>.jsonl`, one line per attempt start and per completed step, rewritten
whole at each checkpoint report and at the end: object storage cannot append) and `ray_final.json`
at the end, since Ray's `Result.metrics` only holds metrics that came with a checkpoint. The driver
reads both from there, never from its own disk.

`train.output_dir` may be a storage URI (s3://, gs://, ...): workers then keep only scratch in a
local folder (`train.local_dir`) and rank 0 uploads what the run publishes (the final weights; the
MLflow run record and the final sample grid are written there directly). Each worker's guard rollback
target is one checkpoint in a local folder (`guard.rollback_dir`), bounded by `guard.rollback_max_mb`.
"""

from __future__ import annotations

import copy
import hashlib
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
from diffalign.config import ConfigError, RunConfig
from diffalign.data import uri
from diffalign.models.weights import state_fingerprint
from diffalign.train.checkpoint import list_checkpoints, nbytes, rng_state, save_checkpoint, set_rng_state
from diffalign.train.engine import TorchEngine, build_optimizer
from diffalign.train.protocols import Callback

log = logging.getLogger(__name__)

RECORDS_DIR = "diffalign"  # <storage_path>/<run name>/diffalign/: the run records
STEP_LOG_PREFIX = "steps-"  # steps-<n>-<attempt>.jsonl: one step log per attempt
FINAL_JSON = "ray_final.json"


@dataclass
class FaultInjection:
    """For tests: worker `rank` calls `os._exit(1)` after optimizer step `kill_at_step`, once per
    marker file (the restarted worker sees the marker and carries on)."""

    kill_at_step: int
    rank: int = 1
    marker: str | None = None    # None -> <output_dir>/.fault_injected (a URI output dir too)

    def marker_path(self, cfg: RunConfig) -> str:
        return self.marker or uri.join(cfg.train.output_dir, ".fault_injected")


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


def records_dir(cfg: RunConfig, name: str) -> str:
    """`<ray.storage_path>/<name>/diffalign/`: where rank 0 keeps the records of Ray run `name`."""
    return uri.join(storage_path(cfg), name, RECORDS_DIR)


def step_log_files(folder: str | Path) -> list[str]:
    """The per-attempt step logs in a records folder, oldest attempt first."""
    return [f for f in uri.list_files(str(folder))
            if uri.strip_query(f).rsplit("/", 1)[-1].startswith(STEP_LOG_PREFIX) and f.endswith(".jsonl")]


class StepLog:
    """Rank 0's step log of one attempt: the object `steps-<n>-<attempt>.jsonl` in the records folder
    (n: the attempt's number in the run, so names sort in order), rewritten whole by `flush` since
    object storage cannot append. It is flushed at the attempt's start, before each checkpoint report
    and at the end: a killed attempt may lose the steps after its last checkpoint, which the next
    attempt redoes from that checkpoint anyway."""

    def __init__(self, folder: str, attempt: str) -> None:
        number = len(step_log_files(folder)) + 1  # attempts run one after another: no race
        self.path = uri.join(folder, f"{STEP_LOG_PREFIX}{number:05d}-{attempt}.jsonl")
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)

    def flush(self) -> None:
        uri.write_bytes_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())


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
                 fault: FaultInjection | None = None, step_log: StepLog | None = None) -> None:
        self.cfg, self.rank, self.world_size, self.attempt, self.fault = cfg, rank, world_size, attempt, fault
        self.step_log = step_log  # rank 0's

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
            self.step_log.add(record)
            if self.fault is not None:  # test runs: every step on record at once, whatever dies when
                self.step_log.flush()
        self._maybe_fail(step)
        due_ckpt = step % t.checkpoint_every == 0 or step == t.max_steps
        if not (due_ckpt or step % t.log_every == 0):
            return
        report = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        report["step"] = step
        if not due_ckpt:
            ray.train.report(report)
            return
        if self.step_log is not None:  # the steps this checkpoint holds are on record before it is
            self.step_log.flush()
        with tempfile.TemporaryDirectory(prefix="diffalign-ckpt-") as tmp:
            folder = write_worker_checkpoint(trainer, tmp, self.rank, self.world_size)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))

    def _maybe_fail(self, step: int) -> None:
        f = self.fault
        if f is None or f.rank != self.rank or f.kill_at_step != step:
            return
        marker = f.marker_path(self.cfg)
        if uri.exists(marker):
            return
        uri.write_bytes_atomic(marker, f"killed rank {self.rank} after step {step}\n".encode())
        if self.step_log is not None:  # what this attempt did, for the test to compare attempts
            self.step_log.flush()
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
    if cfg.online.enabled:  # target images + on-policy rejected samples from the driver's sampler actors
        from diffalign.actors.online import OnlineData

        data = OnlineData(actors=config.get("sampler_actors"), board=config.get("weight_board"))
    records = config["records"]
    # Local folders of this worker, the same for every attempt of the run (keyed by its records
    # folder): a restarted worker replaces what a killed one left there instead of adding to it.
    key = hashlib.sha1(uri.strip_query(records).encode()).hexdigest()[:12]
    rollback = worker_folder(cfg.guard.rollback_dir, "rollback", key, rank)  # guard rollback target only
    train_cfg, scratch = cfg, None
    if uri.is_uri(cfg.train.output_dir):
        # The trainer writes into local scratch; what the run publishes goes to the URI (`cfg`).
        scratch = worker_folder(cfg.train.local_dir, "scratch", key, rank)
        train_cfg = copy.deepcopy(cfg)
        train_cfg.train.output_dir = str(scratch)
    step_log = StepLog(records, attempt) if rank == 0 else None
    fingerprints = RankFingerprints(world_size)
    callbacks = [GlobalLoss(world_size)] if world_size > 1 else []
    callbacks += config["callbacks_factory"](train_cfg, rank) if config.get("callbacks_factory") else []
    callbacks.append(OneRollbackCheckpoint(rollback))
    if rank == 0 and scratch is not None:  # before MLflow: the weights are published when it records them
        callbacks.append(PublishWeights(cfg.train.output_dir))
    if rank == 0 and cfg.tracking.mlflow:  # before the reporter: a step is logged before it is reported
        from diffalign.tracking import MlflowRun

        callbacks.append(MlflowRun(cfg))  # its record and final grid go to the output dir, URI or not
    callbacks += [RayReporter(cfg, rank, world_size, attempt, config.get("fault"), step_log), fingerprints]
    trainer = build_trainer(train_cfg, Runtime(device=device, rank=rank, world_size=world_size,
                                               reference=reference, engine_factory=build_engine, data=data,
                                               callbacks=callbacks, checkpoint_dir=rollback))
    restored = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restore_worker_checkpoint(trainer, folder, rank)
        restored = trainer.step
    check_rollback_size(cfg, trainer)  # after a restore: its optimizer state is then known exactly
    if step_log is not None:
        step_log.add({"event": "start", "attempt": attempt, "restored_step": restored,
                      "world_size": world_size, "optimizer_steps": optimizer_step_count(trainer.engine),
                      "time": time.time()})
        step_log.flush()

    # The MLflow run saves the weights it logs, so a tracked sweep trial saves them too.
    summary = fit_and_save(trainer, save_weights=config.get("save_weights", True) or cfg.tracking.mlflow)
    if rank == 0:
        step_log.flush()
        fps = fingerprints.fingerprints
        weights = summary["weights"]
        if weights is not None and scratch is not None:
            from diffalign.tracking import published_weights

            weights = published_weights(cfg, Path(weights))
        out = {"metrics": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
               "step": trainer.step, "world_size": world_size, "backend": cfg.ray.backend,
               "rank_fingerprints": fps, "ranks_in_sync": len(set(fps)) == 1,
               "optimizer_steps": optimizer_step_count(trainer.engine), "weights": weights}
        # Last: the driver takes this file as the sign that everything above is on shared storage.
        uri.write_bytes_atomic(uri.join(records, FINAL_JSON), json.dumps(out, indent=2).encode())
    shutil.rmtree(rollback, ignore_errors=True)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def worker_folder(base: str | None, kind: str, key: str, rank: int) -> Path:
    """`<base or the system temp dir>/diffalign-<kind>/<key>/rank-<rank>/`, emptied: a worker's local
    folder, the same for every attempt of one run (`key`), so at most one is left behind per node."""
    root = Path(base).expanduser() if base else Path(tempfile.gettempdir())
    folder = root / f"diffalign-{kind}" / key / f"rank-{rank}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


class OneRollbackCheckpoint(Callback):
    """Keeps only the newest checkpoint in a worker's rollback folder, the only one a rollback uses
    (the loop itself keeps `train.keep_checkpoints`, meant for the run's own checkpoints). While a new
    one is written the older one still exists: the folder needs room for two."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def on_checkpoint(self, trainer, path: Path) -> None:
        if Path(path).parent != self.folder:
            return
        for old in list_checkpoints(self.folder)[:-1]:
            shutil.rmtree(old, ignore_errors=True)


class PublishWeights(Callback):
    """Rank 0 with a URI output dir: uploads the final weights folder (diffusers format, written to
    local scratch by `save_final_weights`) to `<output_dir>/<its name>`, the same layout as a local run."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir

    def on_weights_saved(self, trainer, weights: Path) -> None:
        dest = uri.join(self.output_dir, Path(weights).name)
        upload(weights, dest)
        log.info("final weights uploaded to %s", dest)


def upload(local: str | Path, dest: str) -> None:
    """Copies a local file or folder to `dest` (a URI or a local path), streaming each file."""
    uri.copy(Path(local).absolute(), dest)


def rollback_checkpoint_bytes(trainer) -> int:
    """About the bytes of one rollback checkpoint of `trainer`: its trainable weights and loop state
    (engine, reference, EMA, guard), plus the optimizer moments a fresh optimizer has not made yet
    (AdamW creates two per trainable element, in its dtype, at the first step; three with amsgrad)."""
    total = nbytes(trainer.trainable_weights()) + nbytes(trainer.state())
    engine = trainer.engine
    if isinstance(engine, TorchEngine):  # DeepSpeed keeps its optimizer state out of this checkpoint
        opt = engine.optimizer
        per = 3 if any(g.get("amsgrad") for g in opt.param_groups) else 2
        total += sum(per * p.numel() * p.element_size() for p in engine.params if not opt.state.get(p))
    return total


class RollbackTooLarge(ConfigError):
    """A worker's rollback checkpoint would exceed `guard.rollback_max_mb`."""


def check_rollback_size(cfg: RunConfig, trainer) -> None:
    """With guards on and `guard.rollback_max_mb` > 0, refuses to train when one rollback checkpoint
    would be larger (MB = 2**20 bytes), before the first step writes it."""
    g = cfg.guard
    if not g.enabled or not g.rollback_max_mb:
        return
    size = rollback_checkpoint_bytes(trainer)
    if size > g.rollback_max_mb * 2**20:
        raise RollbackTooLarge(
            f"guard.rollback_max_mb={g.rollback_max_mb:g}: one rollback checkpoint of this run takes about "
            f"{size / 2**20:.1f} MB (trainable weights, optimizer and loop state) in "
            f"{trainer.checkpoint_dir}; "
            "raise guard.rollback_max_mb (0: no bound), point guard.rollback_dir at a larger disk, or train "
            "fewer weights (model.finetune=lora)")


# --------------------------------------------------------------------------- driver side

def storage_path(cfg: RunConfig) -> str:
    """Ray Train's `storage_path`: `ray.storage_path`, else `<train.output_dir>/ray`. A URI (s3://...)
    is kept as it is (Ray Train and pyarrow open it, the endpoint and credentials coming from the
    AWS variables of every process); a local path becomes absolute."""
    path = cfg.ray.storage_path or uri.join(cfg.train.output_dir, "ray")
    return path if uri.is_uri(path) else str(Path(path).expanduser().resolve())


def run_name(cfg: RunConfig) -> str:
    """Same name + storage path = Ray resumes that run; with train.resume=false a new name is used."""
    name = cfg.tracking.run_name or f"diffalign-{cfg.objective.name}"
    if not cfg.train.resume and uri.exists(uri.join(storage_path(cfg), name)):
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return name


def lock_folder(cfg: RunConfig) -> Path:
    """The folder whose `RunLock` the driver holds: the output dir, or for a URI (object storage has no
    locks) a local folder named after it, which stops a second training from this machine only."""
    out = cfg.train.output_dir
    if not uri.is_uri(out):
        return Path(out).resolve()
    digest = hashlib.sha1(uri.strip_query(out).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "diffalign-locks" / digest


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
    """What the learners asked for against what the cluster has (in total and free right now, and
    free per node: a learner needs its whole bundle on one node)."""
    import ray
    from diffalign.actors.placement import alive_nodes
    from diffalign.actors.resources import learner_resources

    r = cfg.ray
    per = learner_resources(cfg).bundle()
    total = ray.cluster_resources() if total is None else total
    available = ray.available_resources() if available is None else available
    ask = ", ".join(f'"{k}": {v:g}' for k, v in per.items())
    need = ", ".join(f"{k} {v * r.num_learners:g}" for k, v in per.items())
    have = ", ".join(f"{k} {available.get(k, 0.0):g} free of {total.get(k, 0.0):g}" for k in per)
    try:
        nodes = "; ".join(f"node {n.label}: " + ", ".join(
            f"{k} {(n.free or {}).get(k, 0.0):g} free of {n.total.get(k, 0.0):g}" for k in per)
            for n in alive_nodes())
    except Exception as exc:  # noqa: BLE001 - the totals above still say what was missing
        nodes = f"unknown ({exc})"
    return PlacementTimeoutError(
        f"Ray Train learners of run {run!r} could not be placed within ray.placement_timeout_s="
        f"{r.placement_timeout_s:g} s: they asked for {r.num_learners} learner(s) x {{{ask}}} "
        f"({need} in all) and the cluster has {have} (per node: {nodes}). Something else holds the "
        "rest (another run or sweep trial, an actor, or a placement group a dead run leaked: "
        "`ray list placement-groups`); free it, lower ray.num_learners, ray.cpus_per_learner or "
        "ray.gpus_per_learner, or raise ray.placement_timeout_s.")


def train_with_ray(cfg: RunConfig, callbacks_factory: Callable[[RunConfig, int], list] | None = None,
                   fault: FaultInjection | None = None, run_callbacks: Sequence = (),
                   save_weights: bool = True) -> dict:
    """`_train_with_ray`, holding the run folder's lock on the driver (`RunLock`: a second training
    into `train.output_dir` raises RunLocked); the workers, which Ray may restart, take none."""
    from diffalign.train.run_state import RunLock

    with RunLock(lock_folder(cfg)):
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
    from diffalign.actors.resources import learner_resources
    from ray.train.torch import TorchConfig, TorchTrainer

    layout = ensure_ray(cfg)  # node-by-node fit check: a run that can never be placed fails here
    cfg = copy.deepcopy(cfg)
    if not uri.is_uri(cfg.train.output_dir):
        cfg.train.output_dir = str(Path(cfg.train.output_dir).resolve())  # workers run elsewhere
    absolute_local_paths(cfg)
    from diffalign.actors.placement import SidePlacement

    # One placement group of this driver for the side actors (samplers, reference actor), one bundle
    # each; Ray Train places the learners in its own group. Removed in the `finally` below.
    placement = SidePlacement(cfg).start(layout.side_target)
    actor = board = None
    samplers: list = []
    previous_timeout = os.environ.get(WORKER_GROUP_START_TIMEOUT_ENV)
    try:  # from here on, whatever fails, the side actors and their placement group go
        if cfg.reference.placement == "actor" and cfg.reference.strategy != "none":
            from diffalign.actors.reference_actor import spawn_reference_actor

            actor = spawn_reference_actor(cfg, fresh=True, **placement.actor_options("reference"))
        if cfg.online.enabled:  # the driver owns them: they outlive any learner attempt Ray Train restarts
            from diffalign.actors.sampler import create_samplers

            board, samplers = create_samplers(
                cfg, options_for=lambda i: placement.actor_options("sampler", i))
        name = run_name(cfg)
        records = records_dir(cfg, name)
        final_path = uri.join(records, FINAL_JSON)
        if uri.exists(final_path):  # never report an earlier run's summary (Ray resumes a run of this name)
            uri.delete_file(final_path)
        if cfg.tracking.mlflow:  # rank 0's MlflowRun logs one MLflow run; a restarted worker continues it
            tracking.prepare_record(cfg, resuming=uri.exists(uri.join(storage_path(cfg), name)))
        r = cfg.ray
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg, "fault": fault, "callbacks_factory": callbacks_factory,
                               "reference_actor": actor, "save_weights": save_weights, "records": records,
                               "sampler_actors": samplers or None, "weight_board": board},
            torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=r.num_learners, use_gpu=r.use_gpu,
                                                   resources_per_worker=learner_resources(cfg).bundle(),
                                                   placement_strategy=r.learner_strategy),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage_path(cfg),
                # A learner group that cannot be placed fails once ray.placement_timeout_s has passed (the
                # controller would otherwise retry the startup forever: its default limit is -1).
                failure_config=ray.train.FailureConfig(max_failures=r.max_failures,
                                                       controller_failure_limit=0),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=max(1, cfg.train.keep_checkpoints)),
                callbacks=list(run_callbacks),
            ),
        )
        os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = str(float(r.placement_timeout_s))
        try:
            result = trainer.fit()
        except BaseException as exc:
            if cfg.tracking.mlflow:
                tracking.mark_failed(cfg)
            if is_placement_timeout(exc):
                raise placement_error(cfg, name) from exc
            refused = worker_config_error(exc)
            if refused is not None:  # a learner refused the config at its start (guard.rollback_max_mb)
                raise ConfigError(str(refused)) from exc
            raise
    finally:
        if previous_timeout is None:
            os.environ.pop(WORKER_GROUP_START_TIMEOUT_ENV, None)
        else:
            os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = previous_timeout
        if actor is not None:
            ray.kill(actor)
        if board is not None:
            from diffalign.actors.sampler import kill_actors

            kill_actors(*samplers, board)
        placement.remove()
    # From shared storage: rank 0 may have run on another node.
    final = json.loads(uri.read_bytes(final_path)) if uri.exists(final_path) else {}
    mlflow_run = tracking.read_record(cfg) if cfg.tracking.mlflow else {}
    return {
        "metrics": final.get("metrics", dict(result.metrics or {})),
        "step": final.get("step"),
        "checkpoint": _on_storage(cfg, result.checkpoint.path) if result.checkpoint is not None else None,
        "path": _on_storage(cfg, result.path),
        "rank_fingerprints": final.get("rank_fingerprints"),
        "ranks_in_sync": final.get("ranks_in_sync"),
        "optimizer_steps": final.get("optimizer_steps"),
        "step_log": records,  # read_step_log reads every attempt's log there
        "sampler_actor_ids": [a._actor_id.hex() for a in samplers],
        "mlflow_run_id": mlflow_run.get("run_id"),
        "weights": mlflow_run.get("weights") or final.get("weights"),
    }


def worker_config_error(exc: BaseException | None) -> ConfigError | None:
    """The ConfigError a learner raised, if that is what ended the fit (Ray Train wraps it: the
    worker-group error's `worker_failures`, causes, Ray's task errors)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConfigError):
            return e
        todo += list((getattr(e, "worker_failures", None) or {}).values())
        todo += [getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__,
                 e.__context__]
    return None


def _on_storage(cfg: RunConfig, path: str) -> str:
    """A path Ray Train reports inside its storage filesystem, as a URI again when the storage is one
    (Ray gives `bucket/prefix/...` for `s3://bucket/prefix`)."""
    store = storage_path(cfg)
    if not uri.is_uri(store) or uri.is_uri(path):
        return path
    return f"{store.split('://', 1)[0]}://{path}"


def read_step_log(path: str | Path) -> list[dict]:
    """Every record of a run's step log, attempt after attempt. `path`: its records folder (the
    `step_log` that `train_with_ray` returns, holding one `steps-*.jsonl` per attempt; local or a URI)
    or a single jsonl file."""
    path = str(path)
    files = [path] if uri.is_file(path) else step_log_files(path)
    lines = (line for f in files for line in uri.read_bytes(f).decode().splitlines())
    return [json.loads(line) for line in lines if line.strip()]


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
