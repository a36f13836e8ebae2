"""Shared fixtures. One local Ray cluster per test session (starting Ray costs seconds)."""

from __future__ import annotations

import os
import socket

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


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A local Ray cluster (small object store) shared by every Ray test of the session.

    Its own cluster (address="local"), never one a developer started on the same machine. The
    dashboard is on because Ray Train's placement-group cleaner asks its state API whether a
    run's controller died: without it, the CPUs of Tune trials that ASHA stops are never freed
    and the next trials wait forever. The cleaner is told that API's address, since with several
    Ray instances on one machine it cannot find it by itself.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dashboard_port = s.getsockname()[1]
        ray.init(
            address="local",
            num_cpus=4,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=True,
            dashboard_port=dashboard_port,
            log_to_driver=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                      "TOKENIZERS_PARALLELISM": "false",
                                      "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}},
        )
    yield ray
    # Left running for the rest of the session; pytest exit shuts it down.


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
