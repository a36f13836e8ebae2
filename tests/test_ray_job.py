"""`ray job submit` of the personalization recipe against a `ray start --head` cluster on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A separate Ray cluster started with the CLI (its own process group, so stopping it cannot
    touch the test session's cluster); yields the job-submission address."""
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray CLI is not installed")
    gcs, dash = _free_port(), _free_port()
    # Every fixed default port too: the test session's own cluster (ray_local) holds the defaults, and
    # a dashboard agent that cannot bind its port never accepts the job.
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    # The job's `python` is the one on the cluster's PATH: this environment's, as for an activated venv.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "PATH": path}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [ray_cli, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
         "--object-store-memory=200000000", *ports],
        cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    try:
        yield f"http://127.0.0.1:{dash}", ray_cli, env
    finally:
        # Every process `ray start` spawned kept its process group: stop exactly those.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)


@pytest.mark.slow
def test_ray_job_submit_personalize_recipe(ray_head, tmp_path):
    address, ray_cli, env = ray_head
    out = tmp_path / "job"
    cmd = [ray_cli, "job", "submit", "--address", address, "--", "python", "recipes/mapo_personalize.py",
           "--config", "configs/tiny/mapo_personalize.yaml", "--set", f"train.output_dir={out}",
           "--set", "train.max_steps=4", "--set", "train.progress=false"]
    for _ in range(12):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        # `ray start` returns before the node's dashboard agent accepts jobs; nothing was submitted.
        if "No available agent to submit job" not in log:
            break
        time.sleep(5)
    assert proc.returncode == 0 and "succeeded" in log, log[-4000:]

    # Checkpoints, LoRA weights, the held-out grid and the MLflow record were written by the job.
    assert (out / "checkpoints" / "checkpoint-4" / "weights.safetensors").exists()
    assert list((out / "lora").glob("*.safetensors"))
    assert (out / "heldout_grid.png").stat().st_size > 0
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["diffalign-tiny"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert metrics["online.sync_version"] == 4 and metrics["online.staleness_max"] <= 2
    assert "loss" in metrics and "online.sampler_images_per_s" in metrics
