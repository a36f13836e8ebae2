"""MLflow on the Ray learner: rank 0 logs the same run record as the single-process path
(`diffalign.train.run` + `diffalign.tracking.MlflowTracker`): params, per-step metrics, sample grids,
the final weights as `save_final_weights` writes them, and the status.

A worker that Ray Train restarts continues the same MLflow run: rank 0 keeps the run id in
`<output_dir>/mlflow_run.json` and reopens that run instead of starting a second one. The driver
drops that record before a fresh Ray run and keeps it when Ray resumes the same run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from diffalign.config import RunConfig

RUN_RECORD = "mlflow_run.json"


def record_path(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / RUN_RECORD


def read_record(cfg: RunConfig) -> dict:
    """{"run_id", "status", "weights"} of the Ray run in cfg.train.output_dir ({} if none yet)."""
    path = record_path(cfg)
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(cfg: RunConfig, record: dict) -> None:
    path = record_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)  # a worker killed mid-write must not leave half a record


class Rank0Mlflow:
    """Trainer callback for rank 0 of the Ray learner. The run opens in `on_start` (after the worker
    has built and restored everything), so a worker that fails while starting opens nothing."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.tracker = None

    def on_start(self, trainer) -> None:
        from diffalign.tracking import MlflowTracker

        run_id = read_record(self.cfg).get("run_id")  # set -> this is a restarted worker: continue
        self.tracker = MlflowTracker(self.cfg, run_id=run_id)
        write_record(self.cfg, {"run_id": self.tracker.run_id, "status": "RUNNING", "weights": None})
        self.tracker.on_start(trainer)

    def on_step(self, trainer, metrics: dict) -> None:
        self.tracker.on_step(trainer, metrics)

    def on_event(self, trainer, event: dict) -> None:
        self.tracker.on_event(trainer, event)

    def on_end(self, trainer, summary: dict) -> None:
        self.tracker.on_end(trainer, summary)

    def on_weights_saved(self, trainer, weights: Path) -> None:
        """After the learner saved the final weights (`save_final_weights`): log them, close the run."""
        self.tracker.log_artifacts(weights, f"weights/{weights.name}")
        self.tracker.close("FINISHED")
        write_record(self.cfg, {"run_id": self.tracker.run_id, "status": "FINISHED", "weights": str(weights)})


class WithMlflow:
    """A `callbacks_factory(cfg, rank)` for `train_with_ray`: `inner`'s callbacks, plus `Rank0Mlflow`
    on rank 0. A class, not a closure, because Ray pickles it to every worker."""

    def __init__(self, inner: Callable[[RunConfig, int], list] | None = None) -> None:
        self.inner = inner

    def __call__(self, cfg: RunConfig, rank: int) -> list:
        callbacks = list(self.inner(cfg, rank)) if self.inner is not None else []
        return callbacks + ([Rank0Mlflow(cfg)] if rank == 0 else [])


def prepare_record(cfg: RunConfig, resuming: bool) -> None:
    """Driver side, before the fit: a fresh Ray run gets a fresh MLflow run (drop an earlier
    run's record); a resumed Ray run continues the MLflow run it had."""
    if not resuming:
        record_path(cfg).unlink(missing_ok=True)


def mark_failed(cfg: RunConfig) -> None:
    """Driver side, when the fit raised: the run rank 0 left open ends as FAILED."""
    record = read_record(cfg)
    if record.get("status") != "RUNNING":
        return
    from diffalign.tracking import tracking_uri
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri(cfg)).set_terminated(record["run_id"], "FAILED")
    write_record(cfg, {**record, "status": "FAILED"})
