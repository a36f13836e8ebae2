"""What a run folder (`train.output_dir`) holds between processes, and how a run enters and leaves it.

- `RunLock`: one training per run folder at a time (`<output_dir>/.lock`, an exclusive `flock`).
- `check_resume`: the config a resumed run continues must be the one its weights were trained with,
  up to the resume-safe fields (`diffalign.config.resume.RESUME_SAFE_FIELDS`).
- `archive_run`: a fresh run (`train.resume=false`) into a folder holding an earlier one moves that
  run's files aside, under `<output_dir>/previous/<time>/`, and deletes nothing.
- `SignalStop`: SIGINT / SIGTERM end the current step, then the run saves a checkpoint and exits
  128 + the signal number (130 / 143), ready to resume with the same command.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffalign.config import ConfigError, RunConfig, load_config
from diffalign.config.resume import resume_safe
from diffalign.train.checkpoint import CONFIG_FILE, PREFIX, latest_checkpoint

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
SUMMARY_FILE = "summary.json"
ARCHIVE_DIR = "previous"
# What one run leaves in its folder (moved aside by a fresh run there). mlflow.db and mlartifacts/
# hold every run of the folder's tracking store and stay; so do other recipes' outputs (eval/,
# pairs.parquet, ray/).
RUN_FILES = ("checkpoints", CONFIG_FILE, SUMMARY_FILE, "mlflow_run.json", "lora", "unet", "transformer",
             "score", "samples", "mismatch.json")


class RunRefused(Exception):
    """The run did not start; the message says why and what to do. `exit_code` is a recipe's."""

    exit_code = 1


class RunLocked(RunRefused):
    exit_code = 75  # EX_TEMPFAIL: try again when the other run is done


class ResumeMismatch(RunRefused, ConfigError):
    exit_code = 2  # as an invalid config


class SignalAbort(KeyboardInterrupt):
    """A stop signal that could not wait for the end of a step (a second signal, or one outside the
    training loop): the run ends without a new checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunInterrupted(SystemExit):
    """A run stopped by a signal, after saving what it could. Uncaught, the process exits with
    `code` = 128 + the signal number (130 SIGINT, 143 SIGTERM) and no traceback."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


# --------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive `flock` on `<folder>/.lock`, held while a run trains into the folder; the file
    says who holds it (host, PID, start time, command). The kernel drops a flock when its process
    dies (kill -9 included), so a lock left by a dead run never blocks: there is no stale lock to
    clear. On a filesystem without locks (flock fails with ENOLCK) the run goes on unlocked, warned."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(
                f"train.output_dir={self.folder} is in use: another training holds {self.path} "
                f"({_describe_holder(holder)}). Wait for it to end or stop it, or train into another "
                "train.output_dir.") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning("%s: this filesystem has no file locks (%s); nothing stops a second run here",
                        self.path, e)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": shlex.join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # still held: nobody reads a holder that has gone
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "holder not yet written: it is starting"
    text = f"PID {holder['pid']} on host {holder.get('host', '?')}, since {holder.get('started', '?')}"
    return text + (f": {holder['command']}" if holder.get("command") else "")


# --------------------------------------------------------------------------- resume


@dataclass
class ResumePlan:
    """What the run folder holds for a run with `train.resume`: the checkpoint it continues (None:
    nothing to continue, a fresh start) and the resume-safe fields that changed since, as
    {field: (saved, now)}."""

    checkpoint: Path | None = None
    step: int = 0
    saved_config: Path | None = None
    changed: dict[str, tuple] = field(default_factory=dict)

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def saved_config_path(out_dir: Path, checkpoint: Path | None) -> Path | None:
    """The config the checkpoint was written with, else the run folder's."""
    for path in ([checkpoint / CONFIG_FILE] if checkpoint is not None else []) + [out_dir / CONFIG_FILE]:
        if path.is_file():
            return path
    return None


def config_differences(saved: RunConfig, now: RunConfig) -> tuple[dict, dict]:
    """({field: (saved, now)} of result-changing fields, the same of resume-safe ones)."""
    old, new = saved.flat(), now.flat()
    changing, safe = {}, {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            (safe if resume_safe(key) else changing)[key] = (a, b)
    return changing, safe


def _fresh_run_hint(out_dir: Path) -> str:
    return (f"  - a fresh run in this folder: --set train.resume=false (this run's files move to "
            f"{out_dir / ARCHIVE_DIR}/<time>/, nothing is deleted), or\n"
            f"  - a fresh run elsewhere: --set train.output_dir=<a new folder>")


def check_resume(cfg: RunConfig, checkpoint_dir: Path) -> ResumePlan:
    """The resume of `cfg` from `checkpoint_dir`, or ResumeMismatch (before any model is built) when
    the run there was trained with other values of a result-changing field."""
    out_dir = Path(cfg.train.output_dir)
    ckpt = latest_checkpoint(checkpoint_dir)
    if ckpt is None:
        return ResumePlan()
    plan = ResumePlan(checkpoint=ckpt, step=checkpoint_step(ckpt),
                      saved_config=saved_config_path(out_dir, ckpt))
    if plan.saved_config is None:
        log.warning("resuming %s with no saved config to compare with (a checkpoint of an older version?)",
                    ckpt)
        return plan
    try:
        saved = load_config(plan.saved_config, validate_paths=False)
    except ConfigError as e:
        raise ResumeMismatch(
            f"cannot resume the run in {out_dir}: its saved config {plan.saved_config} no longer loads "
            f"({e}), so it cannot be compared with this one. Start\n{_fresh_run_hint(out_dir)}") from None
    changing, plan.changed = config_differences(saved, cfg)
    if changing:
        fields = "\n".join(f"  {k}: saved {a!r}, now {b!r}" for k, (a, b) in changing.items())
        raise ResumeMismatch(
            f"cannot resume the run in {out_dir} (checkpoint {ckpt.name}, step {plan.step}): it was trained "
            f"with other values of {len(changing)} field(s) that change what it trains "
            f"(saved in {plan.saved_config}):\n{fields}\n"
            f"Either\n  - resume it: rerun with the saved values, or\n{_fresh_run_hint(out_dir)}")
    return plan


def finished_summary(cfg: RunConfig, plan: ResumePlan) -> dict | None:
    """The summary of the run in the folder if it is done: its last checkpoint is at (or past)
    `train.max_steps` and its final weights of that step were saved; else None."""
    path = Path(cfg.train.output_dir) / SUMMARY_FILE
    if not plan.resuming or plan.step < cfg.train.max_steps or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return None
    weights = summary.get("weights")
    if summary.get("final_step") != plan.step or not weights or not Path(weights).exists():
        return None
    return summary


def archive_run(out_dir: Path, checkpoint_dir: Path) -> Path | None:
    """Moves an earlier run's files (`RUN_FILES`, its checkpoints) to `<out_dir>/previous/<time>/`;
    returns that folder, or None when there was no earlier run."""
    present = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    if checkpoint_dir.exists() and checkpoint_dir not in present and any(checkpoint_dir.iterdir()):
        present.append(checkpoint_dir)
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = out_dir / ARCHIVE_DIR / stamp, 1
    while dest.exists():
        n += 1
        dest = out_dir / ARCHIVE_DIR / f"{stamp}.{n}"
    dest.mkdir(parents=True)
    for path in present:
        shutil.move(str(path), str(dest / path.name))
    return dest


# --------------------------------------------------------------------------- signals


def resume_command() -> str:
    """The command line of this process, to rerun it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        argv = ["python", *argv]
    return shlex.join(argv)


class SignalStop:
    """SIGINT / SIGTERM while `run()` holds it (a context, and a Trainer callback). In the training
    loop (between `on_start` and `on_end`) the first signal asks the trainer to stop after the
    current step (`Trainer.stop_requested`: it saves a checkpoint and raises `TrainingStopped`);
    a second one, or one outside the loop (building, final save), raises `SignalAbort` at once.
    Installed only in the main thread (Python delivers signals there); elsewhere it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.trainer = None
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.trainer is not None and self.signum is None:
            self.signum = signum
            self.trainer.stop_requested = signum
            log.warning("%s: stopping once the current step is done (at step %d so far), then saving a "
                        "checkpoint; send it again to stop at once", name, self.trainer.step)
            return
        self.signum = self.signum or signum
        raise SignalAbort(signum)

    # Trainer callback hooks
    def on_start(self, trainer) -> None:
        self.trainer = trainer

    def on_end(self, trainer, summary: dict) -> None:
        self.trainer = None
