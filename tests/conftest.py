"""Shared fixtures. One local Ray cluster per test session (starting Ray costs seconds)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Tiny models gain nothing from a second thread, and on a 2-core CI machine shared with Ray
# workers, oversubscription slowed single tests 20-30x.
torch.set_num_threads(1)


def default_ray_address_file() -> Path:
    """The `ray_current_cluster` file of Ray's default temp dir (as ray._common.utils finds it): a
    `ray start` without --temp-dir writes it, and once that cluster is gone it points at a dead GCS
    that later runs on this machine resolve (Ray Train's placement-group cleaner does: sweeps hang)."""
    root = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux")
                                            else None) or "/tmp"
    return Path(root) / "ray" / "ray_current_cluster"


def _file_state(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, path.read_bytes()


def pytest_sessionstart(session) -> None:
    session.config._ray_address_file = (default_ray_address_file(),)
    session.config._ray_address_file += (_file_state(session.config._ray_address_file[0]),)


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fails the session if a test created or modified the machine's default Ray session file
    (nothing is deleted: a file that existed before belongs to someone else)."""
    path, before = getattr(session.config, "_ray_address_file", (None, None))
    if path is None:
        return
    after = _file_state(path)
    if after != before:
        what = "created" if before is None else ("deleted" if after is None else "modified")
        message = (f"the test session {what} {path}: a test started Ray with the default temp dir "
                   "(give `ray start` its own --temp-dir, `ray.init` its own _temp_dir). If another "
                   "process on this machine did it meanwhile, rerun.")
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"ERROR: {message}", red=True)
        else:
            print(f"ERROR: {message}", file=sys.stderr)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _s3_env(request) -> dict:
    """The AWS variables of the session's S3 server (tests/s3_server.py), started here when moto is
    installed: Ray workers take their environment from the cluster's start, so a test that stores on
    s3:// later only works if its workers already point at that server."""
    import importlib.util

    from s3_server import ENV

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        return {}  # the s3_server fixture would skip: Ray tests still run, without S3
    server = request.getfixturevalue("s3_server")
    return {**ENV, "AWS_ENDPOINT_URL": server.endpoint}


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory, request):
    """A local Ray cluster (small object store) shared by every Ray test of the session.

    Its own cluster (address="local"), never one a developer started on the same machine. The
    dashboard is on because Ray Train's placement-group cleaner asks its state API whether a
    run's controller died: without it, the CPUs of Tune trials that ASHA stops are never freed
    and the next trials wait forever. The cleaner is told that API's address, since with several
    Ray instances on one machine it cannot find it by itself.
    """
    ray = pytest.importorskip("ray")
    temp_dir = None
    if ray.is_initialized():
        # Something in this process started Ray by itself before any test asked for this fixture (a
        # Ray API call auto-starts a local cluster): that cluster has neither these resources nor
        # the S3 variables, and the Ray tests after it would fail for that. Replace it.
        print("ray_local: replacing a Ray instance this process started outside the fixture",
              file=sys.stderr)
        ray.shutdown()
    if not ray.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dashboard_port = s.getsockname()[1]
        # Its own session files, never the machine's default /tmp/ray (short: Ray's socket paths
        # under it must stay below ~107 characters).
        temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        ray.init(
            address="local",
            _temp_dir=temp_dir,
            num_cpus=4,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=True,
            dashboard_port=dashboard_port,
            log_to_driver=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                      "TOKENIZERS_PARALLELISM": "false",
                                      "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
                                      **_s3_env(request)}},
        )
    yield ray
    # The end of the session: stop the cluster this fixture started, then remove its session files.
    if temp_dir is not None:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A fast tiny config (full fine-tune of the tiny SD1.5-style UNet) writing under tmp_path."""
    from diffalign.config import load_config

    def make(*overrides: str):
        base = [
            f"train.output_dir={tmp_path}/run", "train.max_steps=4", "train.progress=false",
            "train.eval_every=0", "data.num_pairs=16", "data.heldout_pairs=8", "optim.batch_size=4",
            "tracking.mlflow=false", "model.finetune=full", "guard.enabled=false",
        ]
        return load_config(None, base + list(overrides))

    return make
from s3_server import s3_server  # noqa: E402,F401
