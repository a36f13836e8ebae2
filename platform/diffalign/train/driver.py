"""The one driver: builds a `Trainer` from (config, runtime) and runs fit-and-save.

Every runtime goes through here, as a recipe reads: `setup -> train -> save`:
- one process (`run`): `recipes/preference_offline.py`, `recipes/mapo_personalize.py` without Ray Train;
- each Ray Train worker (`diffalign.actors.learner`): the same `build_trainer` with its rank, DDP /
  DeepSpeed engine, reference-actor client and Ray reporting callback, then `fit_and_save`;
- online training: the same, with `Runtime.data` = the on-policy data of `diffalign.actors.online`.

What differs between them is the `Runtime`; what a run trains is the config alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffalign.config import RunConfig, save_config
from diffalign.models.lora import save_lora
from diffalign.train.cache import pair_latents, prefill_prompt_cache
from diffalign.train.engine import TorchEngine, build_optimizer
from diffalign.train.loop import Trainer
from diffalign.train.protocols import BatchSource, Engine
from diffalign.train.setup import Setup, build_datasets, build_setup

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """What a trainer reads: items by index, an optional held-out set, how a micro-batch is made from
    items, the callbacks that data needs (online: weight sync) and how to release it."""

    train: Any
    heldout: Any = None
    batch_source: BatchSource | None = None
    callbacks: list = field(default_factory=list)
    close: Callable[[], None] | None = None
    issues: Any = None  # the readers' bad-input account (DataIssues), for the run record


# (cfg, setup, runtime) -> TrainingData: online training builds its on-policy data from the setup.
DataFactory = Callable[[RunConfig, Setup, "Runtime"], TrainingData]
# (cfg, setup, runtime) -> Engine: DDP or DeepSpeed on Ray Train workers.
EngineFactory = Callable[[RunConfig, Setup, "Runtime"], Engine]


@dataclass
class Runtime:
    """Where and with what a trainer runs. Every field has a single-process default."""

    device: torch.device | str | None = None  # None: cuda if available, else cpu
    rank: int = 0
    world_size: int = 1
    engine: Engine | None = None  # a built engine, else `engine_factory`, else a plain TorchEngine
    engine_factory: EngineFactory | None = None
    reference: Any = None  # a reference policy client (a Ray ReferenceActor); None: built colocated
    setup: Setup | None = None  # prebuilt model parts (benchmarks, tests); None: from the config
    data: DataFactory | None = None  # None: `train_data` / `heldout_data`, else the config's datasets
    train_data: Any = None
    heldout_data: Any = None  # used as given (None: no held-out set) whenever train_data is given
    batch_source: BatchSource | None = None
    callbacks: Sequence = ()  # the caller's callbacks, after the data's and before scoring / MLflow
    checkpoint_dir: str | Path | None = None  # None: <output_dir>/checkpoints
    track: bool = True  # the MLflow run of rank 0 (with tracking.mlflow); False: the caller tracks


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _training_data(cfg: RunConfig, setup: Setup, rt: Runtime, is_main: bool) -> TrainingData:
    if rt.data is not None:
        data = rt.data(cfg, setup, rt)
    elif rt.train_data is not None:
        data = TrainingData(rt.train_data, rt.heldout_data, rt.batch_source)
    else:
        train, held = build_datasets(cfg, setup.bundle)
        data = TrainingData(train, held, rt.batch_source)
    if data.issues is None:  # before caching wraps the reader
        data.issues = getattr(data.train, "issues", None)
    if not cfg.online.enabled and _holds_pixels(data.train):  # cached or per-read sampled latents
        data.train = pair_latents(data.train, setup.latent_encoder, cache=cfg.data.cache_latents,
                                  sampling=cfg.data.latent_sampling, seed=cfg.train.seed,
                                  progress=is_main and cfg.train.progress)
    return data


def _holds_pixels(dataset: Any) -> bool:
    """Whether the items are pixel pairs (to encode or cache), asked without reading an item where the
    dataset can say: item 0 of a lazily read file is a block other ranks need not read."""
    said = getattr(dataset, "holds_pixels", None)
    return bool(said) if said is not None else "chosen" in dataset[0]


def _engine(cfg: RunConfig, setup: Setup, rt: Runtime) -> Engine:
    if rt.engine is not None:
        return rt.engine
    if rt.engine_factory is not None:
        return rt.engine_factory(cfg, setup, rt)
    params = [p for g in setup.param_groups for p in g["params"]]
    return TorchEngine(setup.bundle.unet, params, build_optimizer(setup.param_groups, cfg.optim), cfg.optim,
                       cfg.train.max_steps)


def _with_standard_callbacks(cfg: RunConfig, rt: Runtime, data: list, given: list) -> list:
    """The data's callbacks, rank 0's reward score, the caller's, rank 0's MLflow run (scorer and
    MLflow only if the caller did not bring its own). The scorer comes first so every later callback
    sees its score/* metrics at the same step."""
    scorer, tracker = [], []
    if rt.rank == 0 and cfg.train.score_every:
        from diffalign.train.reward_eval import RewardEvaluator

        if not any(isinstance(cb, RewardEvaluator) for cb in given):
            scorer.append(RewardEvaluator(cfg))
    if rt.rank == 0 and cfg.tracking.mlflow and rt.track:
        from diffalign.tracking import MlflowRun

        if not any(isinstance(cb, MlflowRun) for cb in given):
            tracker.append(MlflowRun(cfg))
    return [*data, *scorer, *given, *tracker]


def build_trainer(cfg: RunConfig, runtime: Runtime | None = None, **fields: Any) -> Trainer:
    """The trainer of `cfg` in `runtime` (fields may be given as keywords instead): the only place a
    `Trainer` is constructed. Callback order: the data's (online sync, whose online/* metrics every
    later callback sees), the reward score, the caller's, MLflow."""
    rt = dataclasses.replace(runtime or Runtime(), **fields)
    device = torch.device(rt.device) if rt.device is not None else default_device()
    # Seeds the policy build (random LoRA init) the same way in every process.
    torch.manual_seed(cfg.train.seed)
    setup = rt.setup or build_setup(cfg, device, reference=rt.reference)
    if rt.setup is None and hasattr(rt.reference, "bind"):
        rt.reference.bind(setup.bundle.unet)  # checks the actor built the same initial weights
    engine = _engine(cfg, setup, rt)
    data = _training_data(cfg, setup, rt, rt.rank == 0)
    prefill_prompt_cache(setup.prompt_encoder, data.train)
    callbacks = _with_standard_callbacks(cfg, rt, data.callbacks, list(rt.callbacks))
    trainer = Trainer(cfg, setup, engine, data.train, data.heldout, batch_source=data.batch_source,
                      callbacks=callbacks, rank=rt.rank, world_size=rt.world_size, device=device,
                      checkpoint_dir=rt.checkpoint_dir, data_issues=data.issues)
    trainer.release = data.close
    return trainer


def save_final_weights(trainer: Trainer, out_dir: Path) -> Path:
    """LoRA -> diffusers LoRA file (`pipe.load_lora_weights`); full -> a diffusers UNet or transformer
    folder."""
    from diffalign.train.checkpoint import disk_full_as_error, nbytes

    cfg, bundle = trainer.cfg, trainer.setup.bundle
    if trainer.ema is not None:
        trainer.load_trainable_weights(trainer.final_weights())
    # A full network goes where its pipeline's folder has it: unet/ or (flow families) transformer/.
    full = "transformer" if bundle.is_flow else "unet"
    target = out_dir / ("lora" if cfg.model.finetune == "lora" else full)
    with disk_full_as_error(target, lambda: nbytes(trainer.trainable_weights())):
        if cfg.model.finetune == "lora":
            return save_lora(bundle, target, train_text_encoder=cfg.model.train_text_encoder)
        bundle.unet.save_pretrained(str(target))
    return target


def fit_and_save(trainer: Trainer, save_weights: bool = True) -> dict[str, Any]:
    """Trains to `train.max_steps`, then rank 0 saves the final weights in diffusers format and tells
    the callbacks (`on_weights_saved`: MLflow logs them and closes its run). Returns the summary with
    "final_step", "weights" and, when tracked, "mlflow_run_id"."""
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    summary["final_step"] = trainer.step
    summary["weights"] = None
    if trainer.is_main and save_weights:
        weights = save_final_weights(trainer, Path(trainer.cfg.train.output_dir))
        summary["weights"] = str(weights)
        trainer.emit("on_weights_saved", weights)
        log.info("final weights: %s", weights)
    tracker = _mlflow_run(trainer)
    if tracker is not None:
        tracker.close("FINISHED")  # already closed when weights were saved; a sweep trial saves none
        summary["mlflow_run_id"] = tracker.run_id
    return summary


def _mlflow_run(trainer: Trainer):
    from diffalign.tracking import MlflowRun

    return next((cb for cb in trainer.callbacks if isinstance(cb, MlflowRun)), None)


def run(cfg: RunConfig, runtime: Runtime | None = None, **fields: Any) -> dict[str, Any]:
    """A whole run in this process, holding the run folder's lock (`run_state.RunLock`; a second run
    into the folder raises `RunLocked`): the resume check (`ResumeMismatch` before anything is built
    when the run there was trained with other result-changing values; a finished run returns at
    once), output folder and config, the reference-mismatch probe (when configured), build, fit, save.

    One MLflow run per run folder: a resume continues the recorded one (`mlflow_run.json`), an orphan
    left RUNNING by a killed process included. It ends FINISHED; KILLED on SIGINT / SIGTERM, which
    end the current step, save a checkpoint and raise `RunInterrupted` (SystemExit 130 / 143); FAILED
    if anything raised (a full disk: `DiskFull`, naming the path and the size needed)."""
    from diffalign.train import run_state

    rt = dataclasses.replace(runtime or Runtime(), **fields)
    out_dir = Path(cfg.train.output_dir)
    with run_state.RunLock(out_dir), run_state.SignalStop() as stop:
        return _run_locked(cfg, rt, out_dir, stop)


def _run_locked(cfg: RunConfig, rt: Runtime, out_dir: Path, stop) -> dict[str, Any]:
    from diffalign.train.checkpoint import DiskFull, is_disk_full, latest_checkpoint
    from diffalign.train.loop import TrainingStopped
    from diffalign.train.mismatch_check import check_reference_mismatch
    from diffalign.train.run_state import ResumePlan, archive_run, check_resume, finished_summary

    ckpt_dir = Path(rt.checkpoint_dir or out_dir / "checkpoints")
    track = cfg.tracking.mlflow and rt.track
    tracker = None
    try:
        plan = ResumePlan()
        if cfg.train.resume:
            plan = check_resume(cfg, ckpt_dir)  # before anything is built, or config.yaml rewritten
            done = finished_summary(cfg, plan)
            if done is not None:
                log.info("already at step %d of %d: nothing to do; weights at %s", plan.step,
                         cfg.train.max_steps, done["weights"])
                return {**done, "nothing_to_do": True}
            if plan.resuming:
                log.info("resuming %s at step %d of %d", plan.checkpoint, plan.step, cfg.train.max_steps)
        if track and not plan.resuming:
            from diffalign.tracking import end_recorded_run

            end_recorded_run(cfg, "KILLED")  # an orphan: we hold the lock, so its process is gone
        if not cfg.train.resume and (archived := archive_run(out_dir, ckpt_dir)) is not None:
            log.info("train.resume=false: the earlier run's files moved to %s", archived)
        save_config(cfg, out_dir / "config.yaml")
        if track:
            from diffalign.tracking import MlflowRun, prepare_record

            prepare_record(cfg, resuming=plan.resuming)  # a resume continues the recorded MLflow run
            tags = {f"resume.changed.{k}": f"{a} -> {b}" for k, (a, b) in plan.changed.items()}
            tracker = MlflowRun(cfg, tags=tags or None)
        rt = dataclasses.replace(rt, callbacks=[stop, *rt.callbacks, *([tracker] if tracker else [])])
        if cfg.data.mismatch_probe and rt.data is None and rt.train_data is None:
            # Built once: probed here, trained on below.
            train, held = build_datasets(cfg)
            rt = dataclasses.replace(rt, train_data=train, heldout_data=held)
        if cfg.data.mismatch_probe:
            check_reference_mismatch(cfg, rt.train_data, rt.device or default_device(),
                                     tracker.open() if tracker is not None else None)
        trainer = build_trainer(cfg, rt)
        trainer.save_at_end = True  # a rerun finds a finished run done; a longer one resumes from it
        summary = fit_and_save(trainer)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        log.info("done: %s", {k: round(v, 4) for k, v in summary.items() if isinstance(v, float)})
        return summary
    except (TrainingStopped, KeyboardInterrupt) as e:  # SignalAbort is a KeyboardInterrupt
        _close_mlflow(cfg, track, tracker, "KILLED")
        raise _interrupted(cfg, e, latest_checkpoint(ckpt_dir), tracker) from None
    except BaseException as e:
        _close_mlflow(cfg, track, tracker, "FAILED")
        if isinstance(e, Exception) and not isinstance(e, DiskFull) and is_disk_full(e, out_dir):
            raise DiskFull(out_dir) from e  # the tracking store or a summary could not be written
        if isinstance(e, DiskFull):
            log.error("%s; the last good checkpoint is %s", e, latest_checkpoint(ckpt_dir))
        raise


def _close_mlflow(cfg: RunConfig, track: bool, tracker, status: str) -> None:
    """Ends this run's MLflow run with `status`; if it never opened, the recorded one it would have
    continued (left RUNNING by a killed process) ends so too. Best effort: a full disk may refuse."""
    if tracker is not None and tracker.tracker is not None:
        tracker.close(status)
    elif track:
        from diffalign.tracking import end_recorded_run

        try:
            end_recorded_run(cfg, status)
        except Exception as e:  # noqa: BLE001 - the run failed already; say it, keep its error
            log.error("could not end the recorded MLflow run as %s: %s", status, e)


def _interrupted(cfg: RunConfig, e: BaseException, last: Path | None, tracker):
    """Says how the run stopped and how to resume it; the RunInterrupted (exit 130 / 143) to raise."""
    import signal

    from diffalign.train.loop import TrainingStopped
    from diffalign.train.run_state import RunInterrupted, checkpoint_step, resume_command

    signum = getattr(e, "signum", signal.SIGINT)  # a KeyboardInterrupt not from our handler: SIGINT
    if isinstance(e, TrainingStopped):
        step, ckpt = e.step, e.checkpoint or last
        what = f"at step {step} of {cfg.train.max_steps}: checkpoint saved at {ckpt}"
    else:
        step, ckpt = checkpoint_step(last) if last is not None else 0, last
        what = "before the end of a step: " + (f"nothing saved since {last}" if last else "no checkpoint yet")
    if tracker is not None and tracker.run_id:
        what += f"; MLflow run {tracker.run_id} marked KILLED"
    log.warning("interrupted by %s %s.\nTo resume, run the same command again: %s",
                signal.Signals(signum).name, what, resume_command())
    return RunInterrupted(signum, step, ckpt)
