"""Runs that never lie about what they trained, stop cleanly and resume into the same record
(diffalign.train.driver.run, diffalign.train.run_state): the resume config check, the run folder's lock,
SIGINT / SIGTERM, kill -9 and a full disk. Tiny configs, a few steps; one MLflow store for the module."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffalign.config import load_config
from diffalign.train import driver
from diffalign.train.checkpoint import DiskFull, list_checkpoints, load_checkpoint
from diffalign.train.run_state import ResumeMismatch, RunInterrupted, RunLock, RunLocked
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.progress=false", "train.eval_every=0", "data.num_pairs=16", "data.heldout_pairs=8",
        "optim.batch_size=4", "model.finetune=full", "guard.enabled=false", "train.sample_every=0",
        "tracking.sample_steps=1", "tracking.num_sample_prompts=1"]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One sqlite store for the module's runs (creating one costs ~10 s); each test its experiment."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def _sets(out: Path, uri: str | None, experiment: str, *extra: str) -> list[str]:
    track = [f"tracking.tracking_uri={uri}", f"tracking.experiment={experiment}"] if uri else \
        ["tracking.mlflow=false"]
    return [f"train.output_dir={out}", *FAST, *track, *extra]


def _cfg(out, uri, experiment, *extra):
    return load_config(ROOT / "configs/tiny/dpo.yaml", _sets(out, uri, experiment, *extra))


def _runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp is not None else []


def _loss_steps(uri: str, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss"))


def _record(out: Path) -> dict:
    return json.loads((out / "mlflow_run.json").read_text())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _no_build(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(driver, "build_trainer", refuse)


# --------------------------------------------------------------------------- 1. resume with a changed config


def test_a_changed_result_field_is_refused_before_building_and_a_finished_run_is_done(
        tmp_path, mlflow_uri, monkeypatch, caplog):
    out, exp = tmp_path / "run", "changed-config"
    first = driver.run(_cfg(out, mlflow_uri, exp, "train.max_steps=2", "train.checkpoint_every=1"))
    saved = (out / "config.yaml").read_text()
    [mlrun] = _runs(mlflow_uri, exp)

    with monkeypatch.context() as m:
        _no_build(m)
        with pytest.raises(ResumeMismatch) as err:
            driver.run(_cfg(out, mlflow_uri, exp, "train.max_steps=2", "objective.beta=100", "optim.lr=1e-3"))
        text = str(err.value)
        preset_lr = load_config(ROOT / "configs/tiny/dpo.yaml").optim.lr
        assert "objective.beta: saved 500.0, now 100.0" in text
        assert f"optim.lr: saved {preset_lr}, now 0.001" in text
        assert "--set train.resume=false" in text and "train.output_dir=<a new folder>" in text
        assert "2 field(s)" in text and err.value.exit_code == 2
        assert (out / "config.yaml").read_text() == saved  # not overwritten before the check

        # The same run again, with resume-safe changes only: done, no model, no new MLflow run.
        with caplog.at_level(logging.INFO, logger="diffalign.train.driver"):
            again = driver.run(_cfg(out, mlflow_uri, exp, "train.max_steps=2", "train.log_every=2",
                                    "data.num_workers=1", "train.checkpoint_every=5"))
        assert f"already at step 2 of 2: nothing to do; weights at {out / 'unet'}" in caplog.text
        assert again["nothing_to_do"] and again["final_step"] == 2 and again["weights"] == first["weights"]
        assert [r.info.run_id for r in _runs(mlflow_uri, exp)] == [mlrun.info.run_id]

    # Extending it (train.max_steps is resume-safe) continues the same MLflow run, tagged with the change.
    longer = driver.run(_cfg(out, mlflow_uri, exp, "train.max_steps=3", "train.checkpoint_every=1"))
    assert longer["final_step"] == 3 and longer["mlflow_run_id"] == mlrun.info.run_id
    [mlrun] = _runs(mlflow_uri, exp)
    assert mlrun.info.status == "FINISHED" and _loss_steps(mlflow_uri, mlrun.info.run_id) == [1, 2, 3]
    assert mlrun.data.tags["resume.changed.train.max_steps"] == "2 -> 3"

    # train.resume=false: a fresh run; the old one's files move aside, nothing is deleted.
    fresh = driver.run(_cfg(out, mlflow_uri, exp, "train.max_steps=2", "objective.beta=100",
                            "train.resume=false"))
    [archived] = (out / "previous").iterdir()
    assert (archived / "checkpoints" / "checkpoint-3").is_dir() and (archived / "unet").is_dir()
    assert json.loads((archived / "summary.json").read_text())["final_step"] == 3
    # No checkpoint was due (checkpoint_every=20): the run's last step is saved anyway.
    assert fresh["final_step"] == 2
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    assert "beta: 100" in (out / "config.yaml").read_text()
    runs = _runs(mlflow_uri, exp)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


# --------------------------------------------------------------------------- 2. the run folder's lock


LOCK_HOLDER = """
import sys, time
from diffalign.train.run_state import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(300)
"""


def test_one_training_per_run_folder_and_a_dead_holder_never_blocks(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _no_build(monkeypatch)
    with RunLock(out):  # this process
        with pytest.raises(RunLocked) as err:
            driver.run(_cfg(out, None, ""))
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in str(err.value)
    assert (out / ".lock").read_text() == ""  # released, holder cleared

    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked) as err:
            RunLock(out).acquire()
        assert f"PID {holder.pid} on host {socket.gethostname()}" in str(err.value)
    finally:
        holder.kill()  # SIGKILL: no release ran, the file still names the dead PID
        holder.wait(timeout=30)
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid
    with RunLock(out):  # the kernel dropped its flock: a stale lock never blocks
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()


# --------------------------------------------------------------------------- 3. SIGINT / SIGTERM


class SignalAt:
    """Sends this process `signum` once, at `step` (the run stops after that step)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_step(self, trainer, metrics: dict) -> None:
        if trainer.step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_saves_a_checkpoint_marks_killed_and_the_same_command_resumes_exactly(
        tmp_path, mlflow_uri, caplog):
    out, exp = tmp_path / "run", "sigterm"
    sets = ("train.max_steps=5", "train.checkpoint_every=100")
    before = signal.getsignal(signal.SIGTERM)
    caplog.set_level(logging.WARNING, logger="diffalign.train.driver")
    with pytest.raises(RunInterrupted) as err:
        driver.run(_cfg(out, mlflow_uri, exp, *sets), callbacks=[SignalAt(2, signal.SIGTERM)])
    assert err.value.code == 143 and err.value.step == 2
    assert "interrupted by SIGTERM at step 2 of 5: checkpoint saved at" in caplog.text
    assert "To resume, run the same command again" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are given back
    assert load_checkpoint(out / "checkpoints" / "checkpoint-2")[1]["step"] == 2
    [mlrun] = _runs(mlflow_uri, exp)
    assert mlrun.info.status == "KILLED" and _record(out)["status"] == "KILLED"

    summary = driver.run(_cfg(out, mlflow_uri, exp, *sets))
    driver.run(_cfg(tmp_path / "whole", None, "", *sets))
    assert summary["final_step"] == 5 and _same(_weights(out), _weights(tmp_path / "whole"))
    [mlrun] = _runs(mlflow_uri, exp)
    assert mlrun.info.status == "FINISHED" and _loss_steps(mlflow_uri, mlrun.info.run_id) == [1, 2, 3, 4, 5]


class SignalTwiceAt(SignalAt):
    def on_step(self, trainer, metrics: dict) -> None:
        if trainer.step == self.step:
            os.kill(os.getpid(), self.signum)
            os.kill(os.getpid(), self.signum)  # the impatient second Ctrl-C: stop at once


def test_a_second_signal_stops_at_once_keeping_the_last_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="diffalign.train.driver")
    with pytest.raises(RunInterrupted) as err:
        driver.run(_cfg(out, None, "", "train.max_steps=4", "train.checkpoint_every=1"),
                   callbacks=[SignalTwiceAt(2, signal.SIGINT)])
    assert err.value.code == 130 and err.value.step == 1
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-1"]
    last = out / "checkpoints" / "checkpoint-1"
    assert f"before the end of a step: nothing saved since {last}" in caplog.text


# The recipe, each step slowed down so a signal lands mid-run (a tiny step takes ~0.1 s).
SLOW_RECIPE = """
import runpy, sys, time
sys.path.insert(0, "recipes")
from diffalign.train.loop import Trainer
step = Trainer.train_step
Trainer.train_step = lambda self: (time.sleep(0.25), step(self))[1]
sys.argv = ["recipes/preference_offline.py", *sys.argv[1:]]
runpy.run_path("recipes/preference_offline.py", run_name="__main__")
"""


def _recipe(out: Path, uri: str, experiment: str, *extra: str) -> subprocess.Popen:
    args = ["--config", "configs/tiny/dpo.yaml"]
    for s in _sets(out, uri, experiment, *extra):
        args += ["--set", s]
    return subprocess.Popen([sys.executable, "-c", SLOW_RECIPE, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) first:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_recipe_sigint_exits_130_and_rerunning_finishes_as_an_uninterrupted_run(tmp_path, mlflow_uri):
    out, exp = tmp_path / "run", "sigint"
    sets = ("train.max_steps=12", "train.checkpoint_every=3")
    proc = _recipe(out, mlflow_uri, exp, *sets)
    _wait_for(out / "checkpoints" / "checkpoint-3", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "To resume, run the same command again: python recipes/preference_offline.py --config" in err
    stopped = max(int(p.name.split("-")[1]) for p in list_checkpoints(out / "checkpoints"))
    assert 3 <= stopped < 12 and f"interrupted by SIGINT at step {stopped} of 12" in err
    assert _runs(mlflow_uri, exp)[0].info.status == "KILLED"

    summary = driver.run(_cfg(out, mlflow_uri, exp, *sets))  # the same config: resumes
    driver.run(_cfg(tmp_path / "whole", None, "", *sets))
    assert summary["final_step"] == 12 and _same(_weights(out), _weights(tmp_path / "whole"))
    [mlrun] = _runs(mlflow_uri, exp)
    assert mlrun.info.status == "FINISHED"
    assert _loss_steps(mlflow_uri, mlrun.info.run_id) == list(range(1, 13))  # each step once


# --------------------------------------------------------------------------- 4. kill -9


@pytest.mark.slow
def test_kill_9_then_rerun_continues_the_same_mlflow_run(tmp_path, mlflow_uri):
    out, exp = tmp_path / "run", "sigkill"
    sets = ("train.max_steps=10", "train.checkpoint_every=2")
    proc = _recipe(out, mlflow_uri, exp, *sets)
    _wait_for(out / "checkpoints" / "checkpoint-4", proc)
    proc.kill()
    proc.communicate(timeout=60)
    [orphan] = _runs(mlflow_uri, exp)
    assert orphan.info.status == "RUNNING"  # nothing ran to close it
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # its stale lock: no obstacle

    summary = driver.run(_cfg(out, mlflow_uri, exp, *sets))
    assert summary["final_step"] == 10 and summary["mlflow_run_id"] == orphan.info.run_id
    [mlrun] = _runs(mlflow_uri, exp)
    assert mlrun.info.status == "FINISHED"
    # Steps after the last checkpoint and before the kill were trained (and logged) again.
    assert set(_loss_steps(mlflow_uri, mlrun.info.run_id)) == set(range(1, 11))


# --------------------------------------------------------------------------- 5. a full disk


def test_a_full_disk_names_the_path_and_size_keeps_the_last_checkpoint_and_fails_the_mlflow_run(
        tmp_path, mlflow_uri, monkeypatch, caplog):
    from diffalign.train import checkpoint

    out, exp = tmp_path / "run", "disk-full"
    real, calls = checkpoint.save_file, []

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    with caplog.at_level(logging.ERROR), pytest.raises(DiskFull) as err:
        driver.run(_cfg(out, mlflow_uri, exp, "train.max_steps=6", "train.checkpoint_every=2"))
    text = str(err.value)
    tmp = out / "checkpoints" / ".tmp-checkpoint-4"
    assert text.startswith(f"no space left on device at {tmp}, needed ~") and " MB" in text
    assert float(text.split("needed ~")[1].split(" MB")[0]) > 5  # tiny UNet + its Adam state: ~13 MB
    assert f"the last good checkpoint is {out / 'checkpoints' / 'checkpoint-2'}" in caplog.text
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]  # no partial folder
    assert load_checkpoint(out / "checkpoints" / "checkpoint-2")[1]["step"] == 2
    [mlrun] = _runs(mlflow_uri, exp)
    assert mlrun.info.status == "FAILED" and _record(out)["status"] == "FAILED"


def test_torch_write_errors_count_as_a_full_disk_only_when_it_is_full(tmp_path, monkeypatch):
    from diffalign.train import checkpoint

    torch_error = RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4096 vs 512")
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 10 * 2**20)
    assert checkpoint.is_disk_full(torch_error, tmp_path, needed_bytes=50 * 2**20)
    # Room enough: some other write error, left as it is.
    assert not checkpoint.is_disk_full(torch_error, tmp_path, needed_bytes=2**20)
    assert checkpoint.is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert not checkpoint.is_disk_full(ValueError("bad value"), tmp_path)
    assert str(DiskFull(tmp_path / "x", 3 * 2**20)) == f"no space left on device at {tmp_path / 'x'}, " \
        "needed ~3.0 MB (10 MB free)"
