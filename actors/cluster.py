"""Ray cluster start-up for every entry point (learners, online training, sweeps, dataset building):
join the cluster named by `ray.address` / RAY_ADDRESS, or start a local one, then check that every
actor of the run fits one of the alive nodes (`diffalign.actors.placement.plan`)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from diffalign.config import RunConfig

if TYPE_CHECKING:
    from diffalign.actors.placement import Plan


def ensure_ray(cfg: RunConfig) -> Plan:
    """Starts or joins Ray, then checks node by node that the run's actors fit (raises
    `placement.DoesNotFit`, a ConfigError, at once: a run whose learner fits no single node would
    otherwise wait for ray.placement_timeout_s). Returns the plan the check found."""
    import ray
    from diffalign.actors.placement import check_nodes
    from diffalign.actors.resources import total_resources

    if not ray.is_initialized():
        env = {"TOKENIZERS_PARALLELISM": "false"}
        if not cfg.ray.use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        # ray.address, else RAY_ADDRESS (set under `ray job submit`): join that cluster, whose object
        # store is sized already. Neither: a new local cluster, even if `ray start` left one running.
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
        local = {}
        if address == "local":
            # CPUs are scheduling slots here: a laptop with fewer cores still runs the tiny configs.
            need = math.ceil(total_resources(cfg).get("CPU", 0.0))
            port = _free_port()
            local = {"object_store_memory": cfg.ray.object_store_mb << 20,
                     "num_cpus": max(os.cpu_count() or 1, need),
                     "include_dashboard": True, "dashboard_port": port}
            # Ray Train's placement-group cleaner asks the state API whether a run's controller died.
            # Told nothing, it resolves the cluster from Ray's default session file, which another
            # (dead) cluster on this machine may have left: it then fails, a finished trial's
            # placement group leaks and the next trials wait for its CPUs. Tell it this cluster's.
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address=address, runtime_env={"env_vars": env}, **local)
    return check_nodes(cfg)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
