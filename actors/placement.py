"""Where a run's Ray actors go: the one owner of placement.

Roles, in the order they are placed: the learners (Ray Train workers, `ray.num_learners` x
{ray.cpus_per_learner CPU, ray.gpus_per_learner GPU}), the on-policy samplers (`ray.sampler.num` x
{ray.sampler.num_cpus, ray.sampler.num_gpus}, online runs) and the reference actor
({ray.reference_cpus, ray.reference_gpus}, reference.placement=actor).

- `plan(cfg, nodes)` bin-packs every role's bundle onto the alive nodes' resources and raises a
  `DoesNotFit` (a ConfigError) at once, naming the role, its index, the resource and what each node
  has, when no node can hold it. A sum over the cluster would pass a run whose learner fits no
  single node, and the run would then wait for ray.placement_timeout_s.
- `SidePlacement`: the driver's one placement group for the side actors (samplers + reference),
  one bundle per actor. `actor_options(role, index)` gives the `.options(...)` that put an actor in
  its bundle. Ray Train places the learners in a group of its own.

`ray.placement`: "separate" (default) packs the side group with Ray's PACK strategy wherever it fits;
"colocated" makes it STRICT_PACK (all side actors on one node) with a soft target on the node the
plan found room on next to a learner. Ray Train creates the learners' group after the side group and
chooses their nodes itself, so colocated is a preference, not a pin: after a node loss Ray
reschedules the side group and the learners wherever they fit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from diffalign.actors.resources import (
    ActorResources,
    learner_resources,
    num_samplers,
    reference_resources,
    sampler_resources,
    validate_resources,
)
from diffalign.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

EPS = 1e-9
SIDE_ROLES = ("sampler", "reference")
HINTS = {
    "learner": "lower ray.cpus_per_learner or ray.gpus_per_learner (or ray.num_learners), or add a node that "
               "big",
    "sampler": "lower ray.sampler.num_cpus or ray.sampler.num_gpus (or ray.sampler.num)",
    "reference": "lower ray.reference_cpus or ray.reference_gpus, or set reference.placement=colocated",
}


class DoesNotFit(ConfigError):
    """No alive node can hold one of the run's actors (or the colocated side actors together)."""

    def __init__(self, message: str, role: str, index: int | None = None) -> None:
        super().__init__(message)
        self.role, self.index = role, index


class SidePlacementTimeout(TimeoutError):
    """The side actors' placement group was not ready within ray.placement_timeout_s."""


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    total: dict[str, float]
    free: dict[str, float] | None = None  # None: not known (a fake node list, or the GCS did not say)

    @property
    def label(self) -> str:
        return f"{self.address}:{self.node_id[:6]}"


@dataclass(frozen=True)
class Slot:
    """One actor of a role: `index` counts from 0, messages show index + 1 "of" `count`."""

    role: str
    index: int
    count: int
    resources: ActorResources

    @property
    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in self.resources.bundle().items() if v > 0}

    def name(self) -> str:
        return f"{self.role} {self.index + 1} of {self.count}"


@dataclass
class Plan:
    """Which node the check put each actor on (None: the actor asks for no resources)."""

    nodes: list[NodeInfo]
    where: dict[tuple[str, int], str | None] = field(default_factory=dict)
    side_target: str | None = None  # colocated: the node the side group is packed onto

    def nodes_of(self, role: str) -> set[str]:
        return {n for (r, _), n in self.where.items() if r == role and n is not None}


def alive_nodes() -> list[NodeInfo]:
    """The connected cluster's alive nodes: total resources, and what is free right now."""
    import ray

    try:  # developer API: free amounts only make the errors clearer
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
    except Exception as exc:  # noqa: BLE001 - the totals alone still decide the check
        log.debug("free resources per node unavailable: %s", exc)
        free = None
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        node_free = None if free is None else {k: float(v) for k, v in free.get(n["NodeID"], {}).items()}
        out.append(NodeInfo(n["NodeID"], n.get("NodeManagerAddress", "?"),
                            {k: float(v) for k, v in n.get("Resources", {}).items()}, node_free))
    return out


def learner_slots(cfg: RunConfig) -> list[Slot]:
    n = cfg.ray.num_learners
    return [Slot("learner", i, n, learner_resources(cfg)) for i in range(n)]


def side_slots(cfg: RunConfig, samplers: int | None = None, reference: bool | None = None) -> list[Slot]:
    """Samplers (online runs), then the reference actor (reference.placement=actor)."""
    n = num_samplers(cfg) if samplers is None else samplers
    slots = [Slot("sampler", i, n, sampler_resources(cfg)) for i in range(n)]
    ref = reference_resources(cfg)
    if ref is not None and (reference is None or reference):
        slots.append(Slot("reference", 0, 1, ref))
    return slots


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def _fits(bundle: dict[str, float], left: dict[str, float]) -> bool:
    return all(left.get(k, 0.0) + EPS >= v for k, v in bundle.items())


def _take(bundle: dict[str, float], left: dict[str, float]) -> None:
    for k, v in bundle.items():
        left[k] = left.get(k, 0.0) - v


def _nodes_text(nodes: list[NodeInfo], left: dict[str, dict[str, float]], keys: list[str]) -> str:
    """Per node and resource: its total, what the actors placed before leave of it (the check's
    bookkeeping) and, where known and different, what is free in the cluster right now."""
    parts = []
    for n in nodes:
        have = []
        for k in keys:
            total, rest = n.total.get(k, 0.0), max(left[n.node_id].get(k, 0.0), 0.0)
            free = total if n.free is None else n.free.get(k, 0.0)
            if abs(rest - total) > EPS:
                text = f"{k} {rest:g} of {total:g} left after the actors before it"
                text += f" ({free:g} free right now)" if n.free is not None else ""
            else:
                text = f"{k} {free:g} of {total:g} free"
            have.append(text)
        parts.append(f"node {n.label} has {', '.join(have)}")
    return "; ".join(parts) if parts else "no alive node"


def _no_room(slot: Slot, bundle: dict[str, float], nodes: list[NodeInfo],
             left: dict[str, dict[str, float]], placed_before: bool, extra: str = "") -> DoesNotFit:
    if not any(_fits(bundle, n.total) for n in nodes):
        # No node could hold it even empty: the earlier actors are not the reason, so show totals.
        placed_before, left = False, {n.node_id: dict(n.total) for n in nodes}
    after = " left once the actors before it are placed" if placed_before else ""
    return DoesNotFit(
        f"{slot.name()} needs {_fmt(bundle)} on one node{extra}; no node has it{after} "
        f"({_nodes_text(nodes, left, list(bundle))}); {HINTS[slot.role]}", slot.role, slot.index)


def plan(cfg: RunConfig, nodes: list[NodeInfo]) -> Plan:
    """Bin-packs the run's actors (learners, then samplers, then the reference) onto `nodes` by their
    total resources; raises DoesNotFit at once naming the first actor that no node can hold.

    Totals, not what is free now: resources another run holds are freed when it ends, and a run
    that waits for them is bounded by ray.placement_timeout_s. The learners follow
    ray.learner_strategy (STRICT_PACK: one node for all, STRICT_SPREAD: one node each); the side
    actors pack anywhere ("separate") or all onto one node, the learners' first ("colocated").
    """
    validate_resources(cfg)
    result = Plan(nodes=list(nodes))
    left = {n.node_id: dict(n.total) for n in nodes}
    placed = False

    def first_fit(slot: Slot, candidates: list[NodeInfo]) -> str | None:
        for n in candidates:
            if _fits(slot.bundle, left[n.node_id]):
                return n.node_id
        return None

    learners = learner_slots(cfg)
    strategy = cfg.ray.learner_strategy
    if strategy == "STRICT_PACK" and learners and learners[0].bundle:
        for slot in learners[:1]:  # one learner that fits no node at all is the clearer error
            if first_fit(slot, nodes) is None:
                raise _no_room(slot, slot.bundle, nodes, left, placed)
        together = {k: v * len(learners) for k, v in learners[0].bundle.items()}
        group = Slot("learner", len(learners) - 1, len(learners), learners[0].resources)
        target = next((n.node_id for n in nodes if _fits(together, left[n.node_id])), None)
        if target is None:
            raise DoesNotFit(
                f"the {len(learners)} learners need {_fmt(together)} together on one node "
                f"(ray.learner_strategy=STRICT_PACK); no node has it "
                f"({_nodes_text(nodes, left, list(together))}); "
                f"use ray.learner_strategy=PACK or {HINTS['learner']}", "learner", group.index)
        _take(together, left[target])
        result.where.update({("learner", s.index): target for s in learners})
        placed = True
    else:
        used: set[str] = set()
        for slot in learners:
            if not slot.bundle:
                result.where[("learner", slot.index)] = None
                continue
            candidates = [n for n in nodes if n.node_id not in used] if strategy == "STRICT_SPREAD" else nodes
            node = first_fit(slot, candidates)
            if node is None:
                extra = " of its own (ray.learner_strategy=STRICT_SPREAD)" if candidates is not nodes else ""
                raise _no_room(slot, slot.bundle, nodes, left, placed, extra)
            _take(slot.bundle, left[node])
            used.add(node)
            result.where[("learner", slot.index)] = node
            placed = True

    side = side_slots(cfg)
    for slot in side:
        if not slot.bundle:
            result.where[(slot.role, slot.index)] = None
    side = [s for s in side if s.bundle]
    if cfg.ray.placement == "colocated" and side:
        for slot in side:  # each alone first: the role that fits nowhere is named
            if first_fit(slot, nodes) is None:
                raise _no_room(slot, slot.bundle, nodes, left, placed)
        together: dict[str, float] = {}
        for slot in side:
            for k, v in slot.bundle.items():
                together[k] = together.get(k, 0.0) + v
        learner_nodes = result.nodes_of("learner")
        ordered = sorted(nodes, key=lambda n: n.node_id not in learner_nodes)  # learners' nodes first
        target = next((n.node_id for n in ordered if _fits(together, left[n.node_id])), None)
        if target is None:
            names = ", ".join(s.name() for s in side)
            raise DoesNotFit(
                f"the side actors ({names}) need {_fmt(together)} together on one node (ray.placement="
                f"colocated); no node has it left once the learners are placed "
                f"({_nodes_text(nodes, left, list(together))}); set ray.placement=separate or "
                f"{HINTS[side[-1].role]}", side[-1].role, side[-1].index)
        _take(together, left[target])
        result.where.update({(s.role, s.index): target for s in side})
        result.side_target = target
    else:
        for slot in side:
            node = first_fit(slot, nodes)
            if node is None:
                raise _no_room(slot, slot.bundle, nodes, left, placed)
            _take(slot.bundle, left[node])
            result.where[(slot.role, slot.index)] = node
            placed = True
    return result


def check_nodes(cfg: RunConfig) -> Plan:
    """`plan` against the connected cluster's alive nodes."""
    return plan(cfg, alive_nodes())


class SidePlacement:
    """The driver's placement group for the side actors: one bundle per sampler and the reference.

    `start()` creates it and waits for it (bounded by ray.placement_timeout_s: on timeout the group
    is removed and SidePlacementTimeout names the actors and what the cluster has). Actors asking
    for no resources get no bundle. `remove()` (also on leaving a `with` block) frees the group;
    Ray also removes it when the driver's job ends, since it is not detached.

        with SidePlacement(cfg) as placement:
            actor = ReferenceActor.options(**placement.actor_options("reference")).remote(...)
    """

    def __init__(self, cfg: RunConfig, samplers: int | None = None, reference: bool | None = None) -> None:
        self.cfg = cfg
        self.slots = side_slots(cfg, samplers, reference)
        self.strategy = "STRICT_PACK" if cfg.ray.placement == "colocated" else "PACK"
        self.bundle_index: dict[tuple[str, int], int] = {}
        for slot in self.slots:
            if slot.bundle:
                self.bundle_index[(slot.role, slot.index)] = len(self.bundle_index)
        self.placement_group = None

    @property
    def bundles(self) -> list[dict[str, float]]:
        return [s.bundle for s in self.slots if s.bundle]

    def start(self, target_node: str | None = None) -> SidePlacement:
        """Creates the group and waits until Ray placed every bundle. `target_node` (colocated only):
        the node to prefer for the STRICT_PACK group (a soft target: Ray uses another if it must)."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        if self.placement_group is not None or not self.bundles:
            return self
        kwargs: dict[str, Any] = {}
        if self.strategy == "STRICT_PACK" and target_node:
            kwargs["_soft_target_node_id"] = target_node
        pg = placement_group(self.bundles, strategy=self.strategy, name=f"diffalign-side-{id(self):x}",
                             **kwargs)
        timeout = float(self.cfg.ray.placement_timeout_s)
        t0 = time.monotonic()
        if not pg.wait(timeout_seconds=timeout):
            remove_placement_group(pg)
            total, free = ray.cluster_resources(), ray.available_resources()
            keys = sorted({k for b in self.bundles for k in b})
            asked = ", ".join(f"{s.name()} {_fmt(s.bundle)}" for s in self.slots if s.bundle)
            have = ", ".join(f"{k} {free.get(k, 0.0):g} free of {total.get(k, 0.0):g}" for k in keys)
            raise SidePlacementTimeout(
                f"the side actors' placement group ({asked}; strategy {self.strategy}) was not ready within "
                f"ray.placement_timeout_s={timeout:g} s; the cluster has {have}. Something else holds the "
                "rest (another run, an actor, a leaked placement group: `ray list placement-groups`); free "
                "it, lower the samplers' or the reference's resources, or raise ray.placement_timeout_s.")
        log.info("side placement group ready in %.1f s: %s", time.monotonic() - t0, self.bundles)
        self.placement_group = pg
        return self

    def actor_options(self, role: str, index: int = 0) -> dict[str, Any]:
        """`ActorClass.options(...)` keywords for actor `index` of `role`: its resources and, when it
        has a bundle, the scheduling strategy that puts it there."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if role not in SIDE_ROLES:
            raise ValueError(f"role must be one of {SIDE_ROLES}, got {role!r} (Ray Train places learners)")
        slot = next((s for s in self.slots if (s.role, s.index) == (role, index)), None)
        if slot is None:
            have = [s.name() for s in self.slots if s.role == role]
            raise ValueError(f"no {role} {index} in this run's side placement (it has: {have or 'none'})")
        opts: dict[str, Any] = slot.resources.options()
        bundle = self.bundle_index.get((role, index))
        if bundle is not None:
            if self.placement_group is None:
                raise RuntimeError("SidePlacement.start() must be called before actor_options()")
            # Child tasks of a side actor are not meant to run in its bundle (it holds only the actor).
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=bundle,
                placement_group_capture_child_tasks=False)
        return opts

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.placement_group is not None:
            pg, self.placement_group = self.placement_group, None
            try:
                remove_placement_group(pg)
            except Exception as exc:  # noqa: BLE001 - Ray disconnected: the group went with the job
                log.warning("could not remove the side placement group: %s", exc)

    def __enter__(self) -> SidePlacement:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()
