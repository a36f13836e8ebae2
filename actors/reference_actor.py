"""The reference policy on its own Ray actor (`reference.placement=actor`).

`ReferenceActor` holds its own copy of the model and one of the reference strategies of
`diffalign.reference`; `RemoteReference` is the learner-side client with the `ReferencePolicy`
interface that `PreferenceStep` and the loop use, so the two placements give the same losses.
`RemoteReference.request_errors` sends the actor call at once and waits for its reply only when the
step reads the result, after the policy forward: the two forwards overlap.

Consistency with several learner ranks: rank 0 (the "driver") alone tells the actor that a step
happened (sending the policy's trainable weights only on steps where the strategy looks at them);
every rank passes the number of steps it has completed with each `errors` call and the actor
answers only once it has applied that many steps. So every rank computes step k+1 against the
reference as of step k, whatever the order in which the calls arrive.

periodic_threshold decides on the actor from the same probe set as a colocated reference: at the
step every rank's probe set is complete, all ranks gather them (`diffalign.reference.gather_probe`,
a torch.distributed collective) and rank 0 sends the whole set once; the actor's reference fixes
its timesteps and noise with the same seed and evaluates all of it, so it gets the estimate and
takes the decision that the ranks of a colocated run would all take.

Persistence: after every change the actor writes its reference state (and the step it has
applied) under `<output_dir>/reference_actor/`; a restarted actor reloads it, so it comes back
with the same weights and version instead of a silently re-initialised reference. When
train.output_dir is a storage URI (`s3://...`) the state goes there, so an actor that Ray restarts
on another node finds it; a local output_dir must then be shared by the nodes (NFS).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import ray
import torch
from diffalign.config import RunConfig
from diffalign.data import uri
from diffalign.models.build import build_denoiser
from diffalign.models.conditioning import Conditioning
from diffalign.models.precision import autocast, mixed_precision_dtype
from diffalign.models.weights import load_trainable_state_dict, state_fingerprint, trainable_state_dict
from diffalign.reference import PendingErrors, gather_probe
from diffalign.reference.divergence import data_parallel_world

MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
STATE_FILE = "reference.pt"
STEP_FILE = "step.json"
UPDATING = ("periodic", "periodic_threshold")


def actor_state_dir(cfg: RunConfig) -> Path | str:
    """`<output_dir>/reference_actor`: a local Path, or a URI when train.output_dir is one."""
    if uri.is_uri(cfg.train.output_dir):
        return uri.join(cfg.train.output_dir, "reference_actor")
    return Path(cfg.train.output_dir).resolve() / "reference_actor"


def clear_actor_state(state_dir: Path | str) -> None:
    """Removes an earlier run's persisted actor state (local folder or the files under a URI)."""
    if uri.is_uri(state_dir):
        for name in (STATE_FILE, STEP_FILE):
            path = uri.join(state_dir, name)
            if uri.exists(path):
                uri.delete_file(path)
    elif Path(state_dir).exists():
        shutil.rmtree(state_dir)


def _pack_probe(probe: dict | None) -> dict | None:
    if probe is None:
        return None
    out = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in probe.items() if k != "cond"}
    out["cond"] = {k: v.detach().cpu() for k, v in probe["cond"].tensors().items()}
    return out


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class ReferenceServer:
    """The actor's body (plain class: the Ray actor below only adds the waiting)."""

    def __init__(self, cfg: RunConfig, state_dir: str | None = None, device: str = "cpu") -> None:
        from diffalign.models.build import build_policy
        from diffalign.train.setup import configured_reference

        self.cfg = cfg
        self.device = torch.device(device)
        # Built as the learner builds its policy, so the initial models agree (checked by
        # RemoteReference.bind through init_fingerprint()).
        bundle, _ = build_policy(cfg)
        self.policy = bundle.unet.to(self.device)
        self.policy.requires_grad_(False)
        self._init_fingerprint = state_fingerprint(trainable_state_dict(self.policy))
        self.ref = configured_reference(cfg, self.policy, build_denoiser(bundle), self.device)
        self.autocast_dtype = mixed_precision_dtype(cfg.model.mixed_precision)
        self.step = 0
        self.remote = bool(state_dir) and uri.is_uri(state_dir)
        self.state_dir: Path | str | None = None
        if state_dir:
            self.state_dir = state_dir if self.remote else Path(state_dir)
        self.restored = self._load()

    # ------------------------------------------------------------------ persistence

    def _load(self) -> bool:
        if self.state_dir is None:
            return False
        if self.remote:
            return self._load_uri()
        if not (self.state_dir / STATE_FILE).exists():
            return False
        saved = torch.load(self.state_dir / STATE_FILE, weights_only=False)
        self.ref.load_state_dict(saved["reference"])
        self.step = int(saved["step"])
        step_file = self.state_dir / STEP_FILE
        if step_file.exists():
            self.step = max(self.step, int(json.loads(step_file.read_text())["step"]))
        return True

    def _load_uri(self) -> bool:
        state, step = uri.join(self.state_dir, STATE_FILE), uri.join(self.state_dir, STEP_FILE)
        if not uri.exists(state):
            return False
        saved = torch.load(io.BytesIO(uri.read_bytes(state)), weights_only=False)
        self.ref.load_state_dict(saved["reference"])
        self.step = int(saved["step"])
        if uri.exists(step):
            self.step = max(self.step, int(json.loads(uri.read_bytes(step))["step"]))
        return True

    def _persist(self, weights_changed: bool) -> None:
        if self.state_dir is None:
            return
        if self.remote:
            # Each file is written whole (object stores have no rename): the step file after the state,
            # so a reader never sees a step the saved state does not have yet.
            state = uri.join(self.state_dir, STATE_FILE)
            if weights_changed or not uri.exists(state):
                buf = io.BytesIO()
                torch.save({"reference": self.ref.state_dict(), "step": self.step}, buf)
                uri.write_bytes_atomic(state, buf.getvalue())
            step = json.dumps({"step": self.step}).encode()
            uri.write_bytes_atomic(uri.join(self.state_dir, STEP_FILE), step)
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if weights_changed or not (self.state_dir / STATE_FILE).exists():
            _atomic_save({"reference": self.ref.state_dict(), "step": self.step}, self.state_dir / STATE_FILE)
        tmp = self.state_dir / (STEP_FILE + ".tmp")
        tmp.write_text(json.dumps({"step": self.step}))
        os.replace(tmp, self.state_dir / STEP_FILE)

    # ------------------------------------------------------------------ reference interface

    def errors(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
               target: torch.Tensor) -> torch.Tensor:
        d = self.device
        c = Conditioning(**{k: v.to(d) for k, v in cond.items()})
        with torch.no_grad(), autocast(d, self.autocast_dtype):
            out = self.ref.errors(noisy.to(d), timesteps.to(d), c, target.to(d))
        return out.float().cpu()

    def on_step(self, step: int, weights: dict[str, torch.Tensor] | None,
                probe: dict | None) -> dict[str, float]:
        if step <= self.step:  # a retried or duplicate call: already applied
            return self.ref.metrics()
        if weights is not None:
            load_trainable_state_dict(self.policy, weights)
        if probe is not None:
            probe = dict(probe)
            probe["cond"] = Conditioning(**{k: v.to(self.device) for k, v in probe["cond"].items()})
            probe = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in probe.items()}
        before = self._signature()
        # The actor holds the one reference and gets the probe set of all ranks: nothing to pool.
        metrics = self.ref.on_step(step, probe, world_size=1)
        self.step = step
        self._persist(weights_changed=self._signature() != before)
        return metrics

    def _signature(self) -> tuple:
        """What a change of makes the persisted reference state stale (the probe set included)."""
        return (self.ref.version, self.ref.frozen, self.ref.last_divergence,
                getattr(self.ref, "probe", None) is not None)

    def state_dict(self) -> dict:
        state = self.ref.state_dict()
        state["step"] = self.step
        return state

    def load_state_dict(self, state: dict) -> None:
        self.ref.load_state_dict(state)
        self.step = int(state.get("step", 0))
        self._persist(weights_changed=True)

    def version(self) -> int:
        return int(self.ref.version)

    def metrics(self) -> dict[str, float]:
        return self.ref.metrics()

    def info(self) -> dict:
        weights = self.ref.reference_state() if hasattr(self.ref, "reference_state") else {}
        return {"strategy": self.ref.strategy, "step": self.step, "version": int(self.ref.version),
                "frozen": bool(self.ref.frozen), "restored": self.restored,
                "reference_fingerprint": state_fingerprint(weights) if weights else None,
                "pid": os.getpid()}

    def init_fingerprint(self) -> float:
        return self._init_fingerprint


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
class ReferenceActor:
    """Ray actor around `ReferenceServer`; `errors(..., after_step=k)` waits for step k."""

    def __init__(self, cfg: RunConfig, state_dir: str | None = None, device: str = "cpu",
                 wait_timeout_s: float = 600.0) -> None:
        self.server = ReferenceServer(cfg, state_dir, device)
        self.wait_timeout_s = wait_timeout_s
        self._changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # created lazily: it must belong to the actor's event loop
            self._changed = asyncio.Condition()
        return self._changed

    async def errors(self, noisy, timesteps, cond: dict, target, after_step: int = 0) -> torch.Tensor:
        cv = self._cond()
        async with cv:
            try:
                await asyncio.wait_for(cv.wait_for(lambda: self.server.step >= after_step),
                                       self.wait_timeout_s)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"reference actor is at step {self.server.step} but a learner asked for the reference "
                    f"after step {after_step}; rank 0 never reported that step") from None
        return self.server.errors(noisy, timesteps, cond, target)

    async def on_step(self, step: int, weights=None, probe=None) -> dict[str, float]:
        metrics = self.server.on_step(step, weights, probe)
        cv = self._cond()
        async with cv:
            cv.notify_all()
        return metrics

    async def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state)
        cv = self._cond()
        async with cv:
            cv.notify_all()

    async def state_dict(self) -> dict:
        return self.server.state_dict()

    async def version(self) -> int:
        return self.server.version()

    async def metrics(self) -> dict[str, float]:
        return self.server.metrics()

    async def info(self) -> dict:
        """The server's info, plus where Ray runs this actor (its node and placement group)."""
        ctx = ray.get_runtime_context()
        pg = ctx.get_placement_group_id()
        return {**self.server.info(), "node_id": ctx.get_node_id(), "placement_group_id": pg}

    async def init_fingerprint(self) -> float:
        return self.server.init_fingerprint()


def spawn_reference_actor(cfg: RunConfig, fresh: bool = True, name: str | None = None,
                          max_restarts: int = MAX_RESTARTS, **actor_options: Any):
    """Starts a ReferenceActor with cfg.ray.reference_cpus / reference_gpus. `fresh` clears the
    persisted state of an earlier run in the same output_dir (a new run starts from the initial
    model; a resumed learner pushes its checkpoint's reference state anyway). `actor_options` go to
    `.options(...)` over those: e.g. `SidePlacement.actor_options("reference")`, which puts the actor
    in the driver's placement group."""
    state_dir = actor_state_dir(cfg)
    if fresh:
        clear_actor_state(state_dir)
    r = cfg.ray
    device = "cuda" if r.reference_gpus > 0 else "cpu"
    opts = dict(num_cpus=r.reference_cpus, num_gpus=r.reference_gpus, max_restarts=max_restarts,
                max_task_retries=MAX_TASK_RETRIES if max_restarts else 0)
    if name:
        opts["name"] = name
    opts.update(actor_options)
    return ReferenceActor.options(**opts).remote(cfg, str(state_dir), device)


class RemoteReference:
    """Learner-side `ReferencePolicy` that forwards to a ReferenceActor (see module docstring)."""

    def __init__(self, actor, cfg: RunConfig, driver: bool = True) -> None:
        self.actor = actor
        self.strategy = cfg.reference.strategy
        self.tau = cfg.reference.tau
        self.driver = driver
        self._step = 0
        self._metrics: dict[str, float] = {"ref/version": 0.0,
                                           "ref/frozen": float(self.strategy in ("none", "frozen"))}
        self._weights_fn = None
        self._probe_sent = False  # the actor has the probe set (same on every rank: see on_step)

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    @property
    def needs_probe(self) -> bool:
        return self.strategy == "periodic_threshold"

    @property
    def version(self) -> int:
        return int(self._metrics.get("ref/version", 0.0))

    @property
    def frozen(self) -> bool:
        return bool(self._metrics.get("ref/frozen", 0.0))

    @property
    def last_divergence(self) -> float | None:
        return self._metrics.get("ref/divergence")

    def bind(self, policy_unet: torch.nn.Module, check: bool = True) -> None:
        """Tells the client where the policy's current weights come from (sent on update steps)."""
        self._weights_fn = lambda: trainable_state_dict(policy_unet)
        if check and self.driver:
            mine = state_fingerprint(trainable_state_dict(policy_unet))
            theirs = ray.get(self.actor.init_fingerprint.remote())
            if mine != theirs:
                raise RuntimeError(
                    f"reference actor built a different initial model (fingerprint {theirs} vs the learner's "
                    f"{mine}): the same model.* config and train.seed are required")
        self._metrics = ray.get(self.actor.metrics.remote())

    def needs_policy_at(self, step: int) -> bool:
        return self.strategy in UPDATING and not self.frozen and step % self.tau == 0

    def request_errors(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                       target: torch.Tensor) -> PendingErrors:
        """Sends the actor call now; `result()` waits for the reply (as of the last completed step)."""
        if not self.active:
            return PendingErrors(lambda: None)
        tensors = {k: v.detach().cpu() for k, v in cond.tensors().items()}
        reply = self.actor.errors.remote(noisy.detach().cpu(), timesteps.cpu(), tensors,
                                         target.detach().cpu(), self._step)
        device = noisy.device
        return PendingErrors(lambda: ray.get(reply).to(device))

    def errors(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
               target: torch.Tensor) -> torch.Tensor | None:
        return self.request_errors(noisy, timesteps, cond, target).result()

    def on_step(self, step: int, probe: dict | None = None,
                world_size: int | None = None) -> dict[str, float]:
        self._step = step
        if not self.active:
            return self.metrics()
        probe_out = None
        if self.needs_probe and probe is not None and not self._probe_sent:
            # Every rank's probe set is complete at the same step: all ranks gather here, rank 0 sends;
            # the source ranks make the actor draw each sample's noise as that rank would.
            rank, world = data_parallel_world(world_size)
            tagged = {**probe, "source_rank": torch.full((probe["latents"].shape[0],), rank)}
            gathered = gather_probe(tagged, world)
            self._probe_sent = True
            probe_out = _pack_probe(gathered) if self.driver else None
        if not self.driver:
            return self.metrics()
        weights = None
        if self.needs_policy_at(step):
            if self._weights_fn is None:
                raise RuntimeError("RemoteReference.bind(policy_unet) must be called before training")
            weights = self._weights_fn()
        self._metrics = ray.get(self.actor.on_step.remote(step, weights, probe_out))
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return ray.get(self.actor.state_dict.remote())

    def load_state_dict(self, state: dict) -> None:
        # Every rank loads (the same state): each rank's own load then precedes its next query.
        ray.get(self.actor.load_state_dict.remote(state))
        self._step = int(state.get("step", 0))
        self._probe_sent = state.get("probe") is not None
        self._metrics = ray.get(self.actor.metrics.remote())
