"""`ray job submit` of the personalization recipe, running the README's local-cluster block as written:
its own temp dir, token auth on, its own process group, stopped by that group (never `ray stop`)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_cluster_block() -> list[str]:
    """The command lines of the README's bash block that starts a local cluster."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "ray start --head" in b)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _live_processes(pgid: int) -> list[str]:
    """Processes of process group `pgid` that are not zombies (a zombie holds no port or file)."""
    out = subprocess.run(["ps", "-eo", "pgid=,stat=,pid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in out.splitlines()]
    return [" ".join(r) for r in rows if len(r) >= 3 and r[0] == str(pgid) and not r[1].startswith("Z")]


def test_readme_cluster_block_keeps_token_auth_on_and_stops_only_its_cluster():
    lines = readme_cluster_block()
    text = "\n".join(lines)
    assert not any(re.match(r"\s*ray stop\b", line) for line in lines), "ray stop kills every Ray process"
    assert "RAY_AUTH_MODE=token" in text and "disabled" not in text
    start = next(line for line in lines if "ray start --head" in line)
    assert "--temp-dir" in start and start.startswith("setsid ")  # own session files, own process group
    assert any("kill" in line and "PGID" in line for line in lines)


@pytest.fixture
def readme_cluster(tmp_path):
    """Runs the README block's lines up to `ray start` (with free ports added, since the test session's
    own cluster and other users' hold the defaults); yields (dashboard address, the shell environment
    after those lines, the block's lines); then runs the block's stop lines and checks they stopped it."""
    if shutil.which("setsid") is None or shutil.which("pgrep") is None:
        pytest.skip("setsid / pgrep (util-linux, procps) are not installed")
    lines = readme_cluster_block()
    i_start = next(i for i, line in enumerate(lines) if "ray start --head" in line)
    i_submit = next(i for i, line in enumerate(lines) if line.startswith("ray job submit"))
    dash = _free_port()
    ports = [f"--port={_free_port()}", f"--dashboard-port={dash}"] + [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    start = " ".join([lines[i_start], *ports, "--disable-usage-stats", "--object-store-memory=200000000"])
    env_file = tmp_path / "env"
    script = "\n".join(["set -euo pipefail", *lines[:i_start], start, f"env -0 > {env_file}"])
    # The job's `python` is the one on the cluster's PATH: this environment's, as for an activated venv.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    base.update(PATH=path, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=base, capture_output=True, text=True,
                          timeout=180)
    env = dict(kv.split("=", 1) for kv in env_file.read_text().split("\0") if "=" in kv) if \
        env_file.exists() else {}
    ray_tmp = env.get("RAY_TMP")
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield f"http://127.0.0.1:{dash}", env, lines[i_submit]
    finally:
        if ray_tmp:
            gcs = subprocess.run(["pgrep", "-f", f"gcs_serve[r] --log_dir={ray_tmp}/"], capture_output=True,
                                 text=True).stdout.split()
            pgid = os.getpgid(int(gcs[0])) if gcs else None
            assert pgid != os.getpgid(0), "the cluster must not share the test's process group"
            stop = subprocess.run(["bash", "-c", "\n".join(lines[i_submit + 1:])], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)
            left = _live_processes(pgid) if pgid else []
            for _ in range(10):  # SIGKILLed processes take a moment to go
                if not left:
                    break
                time.sleep(1)
                left = _live_processes(pgid)
            if left:  # never leave them running, whatever the README says
                os.killpg(pgid, 9)
            assert not left, f"the README's stop lines left {left} ({stop.stderr[-2000:]})"
            assert not Path(ray_tmp).exists()


@pytest.mark.slow
def test_ray_job_submit_personalize_recipe(readme_cluster, tmp_path):
    address, env, submit = readme_cluster
    ray_tmp, token = Path(env["RAY_TMP"]), Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    # Ray wrote its session files, the current-cluster file included, into the cluster's temp dir.
    assert (ray_tmp / "ray_current_cluster").exists()
    # Token auth is on: the job API refuses a request without the token and answers one with it.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{address}/api/version", timeout=30)
    assert refused.value.code == 401
    ok = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(ok, timeout=30).status == 200

    out = tmp_path / "job"
    assert DEFAULT_DASHBOARD in submit
    cmd = (submit.replace(DEFAULT_DASHBOARD, address) + f" --set train.output_dir={out}"
           " --set train.max_steps=4 --set train.progress=false")
    for _ in range(12):
        proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        log = proc.stdout + proc.stderr
        # `ray start` returns before the node's dashboard agent accepts jobs; nothing was submitted.
        if "No available agent to submit job" not in log:
            break
        time.sleep(5)
    assert proc.returncode == 0 and "succeeded" in log, log[-4000:]
    assert "==== done:" in log and "pipe.load_lora_weights(" in log  # the recipe's closing block

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
