"""The README's "Running on a cluster" rehearsal, run as written: an S3 stand-in and an MLflow server on
loopback, a Ray cluster with token auth, the prepare job and 2 Ray Train learners submitted with
`ray job submit`, every path on `s3://`; then its stop lines. Only the fixed ports are swapped for free
ones (the test session's own servers and other users may hold them), and `train.max_steps` lowered.

It checks what a user would look at afterwards: the job succeeded and printed its closing block, the
weights copied back from S3 load in diffusers, the MLflow server holds one FINISHED run whose
artifacts are in the bucket, nothing was written to a local `runs/` folder but the copy, and the stop
lines left no process of the three process groups behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_server import free_port
from test_ray_job import _live_processes

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_STEPS = 4


def rehearsal_block() -> list[str]:
    """The command lines of the README's rehearsal block (the bash block that starts moto)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "moto_server" in b)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_rehearsal_block_uses_its_own_temp_dir_token_auth_and_stops_only_what_it_started():
    lines = rehearsal_block()
    text = "\n".join(lines)
    assert not any(re.match(r"\s*ray stop\b", line) for line in lines), "ray stop kills every Ray process"
    assert "RAY_AUTH_MODE=token" in text and '--temp-dir "$DEMO/ray"' in text
    assert all(line.startswith(("setsid ", "MLFLOW_S3_ENDPOINT_URL=$AWS_ENDPOINT_URL setsid "))
               for line in lines if re.search(r"\b(moto_server|mlflow server|ray start)\b", line))
    stop = next(line for line in lines if line.startswith("kill -TERM"))
    assert all(f'"-${pid}"' in stop for pid in ("PGID", "S3_PID", "MLFLOW_PID"))
    # Every path of the run is on the object store.
    job = next(line for line in lines if "recipes/preference_offline.py" in line)
    for field in ("data.path", "ray.storage_path", "train.output_dir"):
        assert re.search(rf"--set {re.escape(field)}=s3://", job), field
    assert "tracking.tracking_uri=http://" in job


def _substituted(lines: list[str], ports: dict[str, int], dash: int) -> list[str]:
    out = []
    for line in lines:
        line = line.replace("127.0.0.1:9000", f"127.0.0.1:{ports['s3']}")
        line = line.replace("-p 9000", f"-p {ports['s3']}")
        line = line.replace("127.0.0.1:5000", f"127.0.0.1:{ports['mlflow']}")
        line = line.replace("--port 5000", f"--port {ports['mlflow']}")
        line = line.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dash}")
        if "ray start --head" in line:
            line += " " + " ".join([f"--port={free_port()}", f"--dashboard-port={dash}", *(
                f"--{name}={free_port()}" for name in (
                    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                    "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
                    "object-manager-port")), "--disable-usage-stats", "--object-store-memory=300000000"])
        if "recipes/preference_offline.py" in line:
            line += f" --set train.max_steps={MAX_STEPS} --set train.progress=false"
        out.append(line)
    return out


def _submit_retrying(line: str) -> str:
    """`ray start` returns before the dashboard agent accepts jobs ("No available agent"): nothing was
    submitted then, so the README tells the user to submit again; the script does the same, bounded."""
    if not line.startswith("ray job submit"):
        return line
    return (f"for try in 1 2 3 4 5 6 7 8 9 10 11 12; do rc=0; out=$({line} 2>&1) || rc=$?; echo \"$out\"; "
            "echo \"$out\" | grep -q 'No available agent' || break; sleep 5; done; test $rc -eq 0")


@pytest.mark.slow
def test_readme_cluster_rehearsal_runs_as_written(tmp_path):
    for tool in ("setsid", "pgrep", "moto_server", "mlflow"):
        if shutil.which(tool, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                     os.environ.get("PATH", "")])) is None:
            pytest.skip(f"{tool} is not installed")
    repo = tmp_path / "repo"  # a copy of the working tree: the job's working_dir, its runs/ checked
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    lines = rehearsal_block()
    i_stop = next(i for i, line in enumerate(lines) if line.startswith("PGID="))
    ports, dash = {"s3": free_port(), "mlflow": free_port()}, free_port()
    run_lines = [_submit_retrying(line) for line in _substituted(lines[:i_stop], ports, dash)]
    env_file = tmp_path / "env"
    script = "\n".join(["set -eo pipefail", *run_lines, f"env -0 > {env_file}"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               OMP_NUM_THREADS="1")
    # The block's background servers: their pids for the stop lines if the script fails midway.
    script = script.replace("& S3_PID=$!", "& S3_PID=$!; echo S3_PID=$S3_PID >> " + str(tmp_path / "pids"))
    script = script.replace("& MLFLOW_PID=$!",
                            "& MLFLOW_PID=$!; echo MLFLOW_PID=$MLFLOW_PID >> " + str(tmp_path / "pids"))
    script = script.replace("export DEMO=$(mktemp -d /tmp/clXXXXXX)",
                            f"export DEMO=$(mktemp -d /tmp/clXXXXXX); echo DEMO=$DEMO >> {tmp_path / 'pids'}")
    proc = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=1500)
    log = proc.stdout + proc.stderr
    state = dict(line.split("=", 1) for line in (tmp_path / "pids").read_text().split())
    after = dict(kv.split("=", 1) for kv in env_file.read_text().split("\0") if "=" in kv) if \
        env_file.exists() else {**env, **state}
    demo = state["DEMO"]
    try:
        assert proc.returncode == 0, log[-6000:]
        assert log.count("succeeded") >= 2 and "==== done: s3://demo/runs/tiny-dpo" in log, log[-4000:]
        assert "python -m diffalign.data.uri copy s3://demo/runs/tiny-dpo/unet" in log

        # The weights came back from S3 and load in plain diffusers; nothing else landed in runs/.
        from diffusers import UNet2DConditionModel

        copy = repo / "runs" / "unet-tiny-dpo"
        UNet2DConditionModel.from_pretrained(copy)
        assert sorted(p.name for p in (repo / "runs").iterdir()) == ["unet-tiny-dpo"]

        # One FINISHED MLflow run on the server; its artifacts are objects in the bucket.
        import mlflow
        import pyarrow.fs as pafs

        client = mlflow.MlflowClient(f"http://127.0.0.1:{ports['mlflow']}")
        experiment = client.get_experiment_by_name("diffalign-tiny")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.metrics["loss"] > 0
        s3 = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{ports['s3']}", access_key="demo",
                               secret_key="demo", region="us-east-1")
        keys = [i.path for i in s3.get_file_info(pafs.FileSelector("demo", recursive=True))]
        assert any(k.startswith("demo/mlflow/") and k.endswith(".png") for k in keys), keys
        assert any(k.startswith("demo/ray/") and "checkpoint_" in k for k in keys)
        assert any(k.startswith("demo/stores/tiny/") and k.endswith("manifest.json") for k in keys)
    finally:
        gcs = subprocess.run(["pgrep", "-f", f"gcs_serve[r] --log_dir={demo}/"], capture_output=True,
                             text=True).stdout.split()
        groups = [int(state[k]) for k in ("S3_PID", "MLFLOW_PID") if k in state]
        if gcs:
            groups.append(os.getpgid(int(gcs[0])))
        assert os.getpgid(0) not in groups, "the servers must not share the test's process group"
        stop = subprocess.run(["bash", "-c", "\n".join(lines[i_stop:])], cwd=repo, env={**after, **state},
                              capture_output=True, text=True, timeout=120)
        left = [p for g in groups for p in _live_processes(g)]
        for _ in range(10):
            if not left:
                break
            time.sleep(1)
            left = [p for g in groups for p in _live_processes(g)]
        for g in groups:  # never leave them running, whatever the README says
            if _live_processes(g):
                os.killpg(g, 9)
        assert not left, f"the README's stop lines left {left} ({stop.stderr[-2000:]})"
        assert not Path(demo).exists()
