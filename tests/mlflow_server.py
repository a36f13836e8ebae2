"""A real MLflow tracking server on loopback (`mlflow_server` fixture), its artifacts on the session's
S3 server (tests/s3_server.py).

`mlflow server` runs as a subprocess in its own process group (stopped, with its workers, at the end of
the session), with a sqlite backend in a temporary folder and `--serve-artifacts --artifacts-destination
s3://<bucket>/mlflow`: clients log artifacts through the server, which writes them to the bucket
(`MLFLOW_S3_ENDPOINT_URL` = the moto endpoint). This is the setup of a multi-node run, whose learners
cannot share a sqlite file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from s3_server import free_port, stop_group

START_TIMEOUT_S = 90.0  # imports of mlflow's server on a loaded 2-core machine take tens of seconds
ARTIFACT_BUCKET = "mlflow-artifacts"
ARTIFACT_PREFIX = "mlflow"


@dataclass
class MlflowServer:
    uri: str  # "http://127.0.0.1:PORT": the tracking URI
    artifacts: str  # "s3://mlflow-artifacts/mlflow": where the server keeps artifacts


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_mlflow_server(s3_endpoint: str, artifacts: str, workdir: Path, log) -> tuple[subprocess.Popen, str]:
    """Starts `mlflow server` on a free loopback port and waits (bounded) until /health answers."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ENDPOINT_URL": s3_endpoint}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", artifacts]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=workdir, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if _healthy(uri):
            return proc, uri
        time.sleep(0.5)
    stop_group(proc, wait_s=15)
    log.seek(0)
    tail = log.read().decode(errors="replace")[-3000:]
    raise RuntimeError(f"mlflow server did not answer on {uri}/health within {START_TIMEOUT_S:.0f} s; "
                       f"its output:\n{tail}")


@pytest.fixture(scope="session")
def mlflow_server(s3_server) -> Iterator[MlflowServer]:
    """An MLflow tracking server for the session, artifacts in s3://mlflow-artifacts/mlflow."""
    if shutil.which("mlflow") is None and not Path(sys.executable).with_name("mlflow").exists():
        pytest.skip("the mlflow command is not installed")
    bucket = s3_server.make_bucket(ARTIFACT_BUCKET)
    artifacts = f"{bucket}/{ARTIFACT_PREFIX}"
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
    with tempfile.TemporaryFile() as log:
        proc, uri = start_mlflow_server(s3_server.endpoint, artifacts, workdir, log)
        try:
            yield MlflowServer(uri, artifacts)
        finally:
            stop_group(proc, wait_s=15)
            shutil.rmtree(workdir, ignore_errors=True)
