"""Ray cluster start-up for every entry point (learners, online training, sweeps, dataset building):
join the cluster named by `ray.address` / RAY_ADDRESS, or start a local one, then check the run fits."""

from __future__ import annotations

import math
import os

from diffalign.config import RunConfig


def ensure_ray(cfg: RunConfig) -> None:
    """Starts or joins Ray, then checks that the run's actors fit the cluster (a run that does not
    fit would otherwise wait forever for its sampler or reference actor)."""
    import ray
    from diffalign.actors.resources import check_fits, total_resources

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
            local = {"object_store_memory": cfg.ray.object_store_mb << 20,
                     "num_cpus": max(os.cpu_count() or 1, need)}
        ray.init(address=address, runtime_env={"env_vars": env}, **local)
    check_fits(cfg, ray.cluster_resources())
