"""MLflow tracking as a Trainer callback: params, per-step metrics, image grids, plots, weights.

Defaults to a sqlite store under the run's output folder (mlflow 3 refuses a plain ./mlruns file
store unless MLFLOW_ALLOW_FILE_STORE is set); any tracking URI can come from the config. A run whose
`train.output_dir` is a storage URI (Ray learners: s3://...) logs to an MLflow server
(`tracking.tracking_uri: http://...`), and its run record and final sample grid go to that URI.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from diffalign.config import RunConfig

log = logging.getLogger(__name__)


def _is_uri(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


def tracking_uri(cfg: RunConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if _is_uri(cfg.train.output_dir):  # refused at config load too (config/validate.py)
        raise ValueError(f"tracking.tracking_uri is required with train.output_dir={cfg.train.output_dir!r}: "
                         "a sqlite store cannot live on object storage; use an MLflow server")
    out = Path(cfg.train.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}"


ARTIFACTS_DIR = "mlartifacts"  # beside the run's sqlite store: <output_dir>/mlartifacts by default
FINAL_SAMPLES = Path("samples") / "final.png"  # the last sample grid, under <output_dir> besides MLflow


def output_path(cfg: RunConfig, relative: str | Path) -> str | Path:
    """`<train.output_dir>/<relative>`: a Path for a local folder, a URI string for a storage URI."""
    out = cfg.train.output_dir
    if _is_uri(out):
        from diffalign.data import uri

        return uri.join(out, *Path(relative).parts)
    return Path(out) / relative


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: beside the database file (for the
    default store, in the run folder). None for other stores: a file store keeps them inside itself, a
    tracking server decides for itself. Without it MLflow writes them to ./mlruns of the current directory."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent.resolve() / ARTIFACTS_DIR).as_uri()


SERVER_WAIT_S = 120.0  # a tracking server started next to the job: its imports take tens of seconds


def wait_for_server(uri: str, timeout_s: float = SERVER_WAIT_S) -> None:
    """Waits (bounded) until the MLflow tracking server at `uri` answers its /health endpoint; raises
    ConnectionError naming it otherwise. MLflow's own retries would give up with a less clear error."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    announced, last = False, "no answer"
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as reply:
                if reply.status == 200:
                    return
                last = f"HTTP {reply.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise ConnectionError(f"the MLflow tracking server {uri} (tracking.tracking_uri) did not answer "
                                  f"{uri.rstrip('/')}/health within {timeout_s:g} s: {last}")
        if not announced:
            log.info("waiting up to %g s for the MLflow tracking server at %s", timeout_s, uri)
            announced = True
        time.sleep(1.0)


def use_experiment(mlflow, name: str, uri: str) -> str:
    """Makes `name` the active experiment of the store at `uri`, creating it with its artifacts under
    `artifact_location(uri)`; an existing experiment keeps the location it has. Returns its id."""
    if uri.startswith(("http://", "https://")):
        wait_for_server(uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            mlflow.create_experiment(name, artifact_location=artifact_location(uri))
        except Exception:  # noqa: BLE001 - another process created it in between: use that one
            if mlflow.get_experiment_by_name(name) is None:
                raise
    return mlflow.set_experiment(name).experiment_id


def _mlflow():
    try:
        import mlflow
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("MLflow tracking needs mlflow: pip install 'diffalign[ray]'") from e
    return mlflow


class MlflowTracker:
    """Logs one MLflow run per training run (or per Tune trial)."""

    def __init__(self, cfg: RunConfig, run_name: str | None = None, tags: dict | None = None,
                 run_id: str | None = None) -> None:
        self.cfg = cfg
        self.mlflow = _mlflow()
        use_experiment(self.mlflow, cfg.tracking.experiment, tracking_uri(cfg))
        self.run = self.mlflow.start_run(run_id=run_id, run_name=run_name or cfg.tracking.run_name, tags=tags)
        self.run_id = self.run.info.run_id
        if run_id is None:
            self.mlflow.log_params({k: str(v)[:500] for k, v in cfg.flat().items()})
        self._img_every = cfg.train.sample_every

    # --- Trainer callback hooks
    def log_data_issues(self, trainer) -> None:
        """What the readers dropped and why, never a silent drop. Logged at the start and again at
        the end: raw files read lazily count their rows as training reads them."""
        issues = getattr(trainer, "data_issues", None)
        if issues is not None:
            counts = {"data.rows_seen": issues.rows_seen, "data.pairs": issues.items_yielded,
                      **{f"data.dropped.{k}": n for k, n in issues.summary().items()}}
            self.mlflow.log_metrics({k: float(v) for k, v in counts.items()}, step=trainer.step)
            self.mlflow.log_text(issues.report(), "data_issues.txt")

    def on_start(self, trainer) -> None:
        self.log_data_issues(trainer)
        if trainer.step == 0:
            self.log_images(trainer, "samples/step_000000.png")

    def on_step(self, trainer, metrics: dict) -> None:
        self.mlflow.log_metrics(
            {k.replace("/", "."): float(v) for k, v in metrics.items()}, step=trainer.step
        )
        if self._img_every and trainer.step % self._img_every == 0:
            self.log_images(trainer, f"samples/step_{trainer.step:06d}.png")
            self.log_bins(trainer)
        self.note_saturation(trainer)

    def note_saturation(self, trainer) -> None:
        """Once per run: the guard's note that the loss has saturated (diffalign.train.guards), as the
        run's `saturation` tag and `saturation.txt`, at the step it was first seen."""
        note = getattr(getattr(trainer, "guard", None), "saturation", None)
        if note is None or getattr(self, "_saturation_noted", False):
            return
        self._saturation_noted = True
        self.mlflow.set_tag("saturation", f"step {trainer.step}: {note}")
        self.mlflow.log_text(f"step {trainer.step}: {note}\n", "saturation.txt")

    def on_event(self, trainer, event: dict) -> None:
        self.mlflow.log_metric(f"events.{event['kind']}", 1.0, step=trainer.step)
        self.log_json(event, f"events/{event['kind']}_{len(trainer.events):03d}.json")

    def on_end(self, trainer, summary: dict) -> None:
        self.log_data_issues(trainer)
        self.log_images(trainer, f"samples/step_{trainer.step:06d}.png",
                        save_to=output_path(self.cfg, FINAL_SAMPLES))
        self.log_bins(trainer)
        self.mlflow.log_dict({k: float(v) for k, v in summary.items()}, "summary.json")

    # --- helpers
    def log_images(self, trainer, name: str, save_to: str | Path | None = None) -> None:
        try:
            grid = trainer.sample_images()
        except Exception as e:  # sampling must never kill training; say why it failed
            log.warning("sample grid failed: %s", e)
            return
        if _is_uri(save_to):  # a whole object, written once
            import io

            from diffalign.data import uri

            buf = io.BytesIO()
            grid.save(buf, format="PNG")
            uri.write_bytes_atomic(save_to, buf.getvalue())
        elif save_to is not None:  # also a plain file in the run folder
            save_to = Path(save_to)
            save_to.parent.mkdir(parents=True, exist_ok=True)
            grid.save(save_to)
        self.mlflow.log_image(grid, name)

    def log_bins(self, trainer) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = trainer.bins.plot(os.path.join(tmp, "timestep_bins.png"), title=f"step {trainer.step}")
            self.mlflow.log_artifact(path, "plots")

    def log_json(self, data: dict, name: str) -> None:
        self.mlflow.log_dict(json.loads(json.dumps(data, default=str)), name)

    def log_artifacts(self, path: str | Path, artifact_path: str) -> None:
        self.mlflow.log_artifacts(str(path), artifact_path)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in metrics.items()}, step=step)

    def close(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def attached_tracker(trainer) -> MlflowTracker | None:
    """The MLflow tracker among the trainer's callbacks, or held by one (the Ray learner's rank-0
    callback opens its tracker in its own on_start)."""
    for cb in trainer.callbacks:
        tracker = cb if isinstance(cb, MlflowTracker) else getattr(cb, "tracker", None)
        if isinstance(tracker, MlflowTracker):
            return tracker
    return None


# --------------------------------------------------------------------------- the run record

RUN_RECORD = "mlflow_run.json"


def record_path(cfg: RunConfig) -> str | Path:
    """`<train.output_dir>/mlflow_run.json`, wherever the output dir is (a URI: shared by every node,
    so a learner that Ray restarts elsewhere, and a rerun, continue the same MLflow run)."""
    return output_path(cfg, RUN_RECORD)


def read_record(cfg: RunConfig) -> dict:
    """{"run_id", "status", "weights"} of the run in cfg.train.output_dir ({} if none yet)."""
    path = record_path(cfg)
    if _is_uri(path):
        from diffalign.data import uri

        return json.loads(uri.read_bytes(path)) if uri.exists(path) else {}
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(cfg: RunConfig, record: dict) -> None:
    path = record_path(cfg)
    if _is_uri(path):
        from diffalign.data import uri

        uri.write_bytes_atomic(path, json.dumps(record, indent=2).encode())  # an object is whole or absent
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)  # a process killed mid-write must not leave half a record


def prepare_record(cfg: RunConfig, resuming: bool) -> None:
    """Before a run starts: a fresh run gets a fresh MLflow run (an earlier run's record is dropped);
    a resumed Ray run continues the MLflow run it had."""
    if resuming:
        return
    path = record_path(cfg)
    if _is_uri(path):
        from diffalign.data import uri

        if uri.exists(path):
            uri.delete_file(path)
        return
    path.unlink(missing_ok=True)


def published_weights(cfg: RunConfig, weights: Path) -> str:
    """Where the final weights of a run are kept: `weights` itself, or, for a URI output dir, the
    copy of that folder under it (`<output_dir>/<name>`, uploaded by the Ray learner)."""
    return str(output_path(cfg, weights.name)) if _is_uri(cfg.train.output_dir) else str(weights)


def mark_failed(cfg: RunConfig) -> None:
    """When a run raised outside the process that logs it: the MLflow run it left open ends FAILED."""
    end_recorded_run(cfg, "FAILED")


def end_recorded_run(cfg: RunConfig, status: str) -> None:
    """Ends the recorded MLflow run with `status` if the record says it is still RUNNING (its process
    died, or raised elsewhere): an orphan is never left RUNNING."""
    record = read_record(cfg)
    if record.get("status") != "RUNNING":
        return
    from mlflow.tracking import MlflowClient

    status = record.pop("end_as", status)  # what its own process could not write (a full disk)
    MlflowClient(tracking_uri=tracking_uri(cfg)).set_terminated(record["run_id"], status)
    write_record(cfg, {**record, "status": status})


class MlflowRun:
    """Trainer callback owning rank 0's MLflow run: opened at `on_start` (or earlier by `open()`, for
    what is logged before training), continued if `<output_dir>/mlflow_run.json` names a run (a
    worker that Ray Train restarted, a resumed one-process run), closed FINISHED once the final weights
    are logged. `tags` are set on the run when it opens (a resume: the resume-safe fields it changed)."""

    def __init__(self, cfg: RunConfig, tags: dict | None = None) -> None:
        self.cfg = cfg
        self.tags = tags
        self.tracker: MlflowTracker | None = None
        self.closed = False

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker is not None else None

    def open(self) -> MlflowTracker:
        if self.tracker is None:
            run_id = read_record(self.cfg).get("run_id")  # set: a restarted worker continues its run
            try:
                self.tracker = MlflowTracker(self.cfg, run_id=run_id, tags=self.tags)
            except Exception as e:  # noqa: BLE001 - not in this store (tracking_uri changed, deleted)
                if run_id is None:
                    raise
                log.warning("cannot continue MLflow run %s (%s): logging a new run", run_id, e)
                self.tracker = MlflowTracker(self.cfg, tags=self.tags)
            write_record(self.cfg, {"run_id": self.tracker.run_id, "status": "RUNNING", "weights": None})
        return self.tracker

    def on_start(self, trainer) -> None:
        self.open().on_start(trainer)

    def on_step(self, trainer, metrics: dict) -> None:
        self.tracker.on_step(trainer, metrics)

    def on_event(self, trainer, event: dict) -> None:
        self.tracker.on_event(trainer, event)

    def on_end(self, trainer, summary: dict) -> None:
        self.tracker.on_end(trainer, summary)

    def on_weights_saved(self, trainer, weights: Path) -> None:
        self.tracker.log_artifacts(weights, f"weights/{weights.name}")
        self.close("FINISHED", published_weights(self.cfg, weights))

    def close(self, status: str, weights: str | Path | None = None) -> None:
        if self.tracker is None or self.closed:
            return
        self.closed = True
        record = {"run_id": self.tracker.run_id, "status": status,
                  "weights": str(weights) if weights else None}
        try:
            self.tracker.close(status)
        except Exception as e:  # noqa: BLE001 - a store that cannot write (full disk): say it, record it
            log.error("could not end MLflow run %s as %s: %s", self.tracker.run_id, status, e)
            # Still RUNNING in the store: the next run in the folder ends it (`end_recorded_run`).
            record.update(status="RUNNING", end_as=status)
        try:
            write_record(self.cfg, record)
        except OSError as e:  # pyarrow's storage errors are OSErrors too
            log.error("could not write %s: %s", record_path(self.cfg), e)
