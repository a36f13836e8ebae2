"""Resources of the Ray actors from the config: learners, on-policy samplers, reference actor.

Fractional GPUs are allowed (e.g. a sampler and the reference actor sharing one GPU with 0.5
each, or learners sharing a GPU with ray.gpus_per_learner < 1); Ray only accepts whole numbers above
one GPU. `placement_bundles(cfg)` lists one bundle per actor, in the order learners, samplers, reference.
Whether they fit the cluster's nodes one by one is `diffalign.actors.placement.plan`'s check;
`check_fits` here only compares the sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffalign.config import ConfigError, RunConfig


@dataclass(frozen=True)
class ActorResources:
    num_cpus: float
    num_gpus: float = 0.0

    def bundle(self) -> dict[str, float]:
        out = {"CPU": float(self.num_cpus)}
        if self.num_gpus:
            out["GPU"] = float(self.num_gpus)
        return out

    def options(self) -> dict[str, float]:
        """Keyword arguments for `ActorClass.options(...)`."""
        return {"num_cpus": float(self.num_cpus), "num_gpus": float(self.num_gpus)}


def _check(value: float, path: str, gpu: bool = False, allow_zero: bool = True) -> None:
    if value is None or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ConfigError(f"{path} must be a number >= 0, got {value!r}")
    if not allow_zero and value == 0:
        raise ConfigError(f"{path} must be > 0, got {value}")
    if gpu and value > 1 and not float(value).is_integer():
        raise ConfigError(f"{path}={value}: a fraction of a GPU must be <= 1; above one GPU use whole "
                          "numbers")


def validate_resources(cfg: RunConfig) -> None:
    """Raises ConfigError naming the bad field."""
    r = cfg.ray
    _check(r.cpus_per_learner, "ray.cpus_per_learner", allow_zero=False)
    _check(r.gpus_per_learner, "ray.gpus_per_learner", gpu=True, allow_zero=not r.use_gpu)
    _check(r.reference_cpus, "ray.reference_cpus")
    _check(r.reference_gpus, "ray.reference_gpus", gpu=True)
    _check(r.sampler.num_cpus, "ray.sampler.num_cpus")
    _check(r.sampler.num_gpus, "ray.sampler.num_gpus", gpu=True)
    if r.num_learners < 1:
        raise ConfigError(f"ray.num_learners must be >= 1, got {r.num_learners}")
    if r.sampler.num < 0:
        raise ConfigError(f"ray.sampler.num must be >= 0, got {r.sampler.num}")
    if not r.use_gpu and (r.reference_gpus or r.sampler.num_gpus):
        field = "ray.reference_gpus" if r.reference_gpus else "ray.sampler.num_gpus"
        raise ConfigError(f"{field} > 0 needs ray.use_gpu=true (learners on CPU with actors on GPU is not "
                          "supported)")


def learner_resources(cfg: RunConfig) -> ActorResources:
    """One Ray Train worker: ray.cpus_per_learner CPUs, and ray.gpus_per_learner GPUs when ray.use_gpu."""
    gpus = float(cfg.ray.gpus_per_learner) if cfg.ray.use_gpu else 0.0
    return ActorResources(cfg.ray.cpus_per_learner, gpus)


def sampler_resources(cfg: RunConfig) -> ActorResources:
    return ActorResources(cfg.ray.sampler.num_cpus, cfg.ray.sampler.num_gpus)


def reference_resources(cfg: RunConfig) -> ActorResources | None:
    """None when the reference is colocated with the learners (or there is none)."""
    if cfg.reference.placement != "actor" or cfg.reference.strategy == "none":
        return None
    return ActorResources(cfg.ray.reference_cpus, cfg.ray.reference_gpus)


def num_samplers(cfg: RunConfig) -> int:
    return cfg.ray.sampler.num if cfg.online.enabled else 0


def placement_bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """One resource bundle per actor: learners, then samplers (online runs), then the reference."""
    validate_resources(cfg)
    bundles = [learner_resources(cfg).bundle() for _ in range(cfg.ray.num_learners)]
    bundles += [sampler_resources(cfg).bundle() for _ in range(num_samplers(cfg))]
    ref = reference_resources(cfg)
    if ref is not None:
        bundles.append(ref.bundle())
    return bundles


def total_resources(cfg: RunConfig) -> dict[str, float]:
    total: dict[str, float] = {}
    for b in placement_bundles(cfg):
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    return total


def check_fits(cfg: RunConfig, available: dict[str, float]) -> None:
    """Raises ConfigError when the cluster's sums (e.g. `ray.cluster_resources()`) cannot hold the run
    (necessary, not sufficient: `diffalign.actors.placement.plan` checks node by node)."""
    need = total_resources(cfg)
    short = {k: (v, available.get(k, 0.0)) for k, v in need.items() if v > available.get(k, 0.0) + 1e-9}
    if short:
        parts = ", ".join(f"{k}: need {n:g}, cluster has {h:g}" for k, (n, h) in short.items())
        raise ConfigError(f"the run does not fit the cluster ({parts}); lower ray.num_learners, "
                          f"ray.cpus_per_learner, ray.sampler.num or the reference resources")
