"""On-policy sampling on Ray: `SamplerPool` keeps a group of `SamplerActor`s (see `sampler_worker`)
synced with the learner and hands out version-tagged samples, surviving actor restarts.

Consistency rules:
- every sample carries the policy version that generated it (the learner's step of its weights);
- a generate call names the version it expects; an actor holding another one (a restarted actor is
  at -1 until re-synced) refuses with `StaleSamplerError` instead of sampling the wrong policy;
- weights are put in the object store once per sync and shared by every actor;
- calls to one actor run in submission order, so a generate submitted after a sync uses that sync.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from diffalign.actors.sampler_worker import OUTPUTS, SamplerActor, StaleSamplerError
from diffalign.actors.weight_sync import (
    ProbeBatch,
    SyncVerifier,
    compute_dtype,
    lowest_precision,
    make_packet,
    probe_outputs,
)
from diffalign.config import RunConfig
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

log = logging.getLogger(__name__)


def create_sampler(cfg: RunConfig, index: int = 0, **options: Any) -> ray.actor.ActorHandle:
    """A `SamplerActor` placed and made restartable per `cfg.ray.sampler`.

    max_task_retries=0: Ray does not replay calls on a restarted actor; the pool re-syncs it first
    and resubmits, so no call runs against an unsynced copy.
    """
    s = cfg.ray.sampler
    opts = dict(max_restarts=s.max_restarts, max_task_retries=0, num_cpus=s.num_cpus, num_gpus=s.num_gpus)
    opts.update(options)
    return SamplerActor.options(**opts).remote(cfg, index)


@dataclass
class SampleRequest:
    """An in-flight generate call; the pool moves it to another actor (new ref) when one fails."""

    prompts: list[str]
    seeds: list[int]
    actor: int
    ref: ray.ObjectRef
    expected_version: int
    epoch: int = 0                      # the actor's incarnation as the pool knew it at dispatch
    submitted_at: float = field(default_factory=time.perf_counter)
    attempts: int = 0


class SamplerPool:
    """n `SamplerActor`s: versioned weight sync, round-robin requests, restart tolerance, metrics.

    An actor that fails a call is taken out of the rotation until it answers again (Ray restarts it
    up to ray.sampler.max_restarts times); it is then re-synced with the latest packet before it
    samples. Its failed requests go to another live actor, or wait for it when it is the only one.
    """

    def __init__(self, cfg: RunConfig, n: int | None = None, output: str = "latent",
                 restart_timeout_s: float = 300.0, **actor_options: Any) -> None:
        s = cfg.ray.sampler
        n = s.num if n is None else n
        if n < 1:
            raise ValueError(f"a sampler pool needs at least one actor, got n={n}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.cfg, self.output, self.restart_timeout_s = cfg, output, restart_timeout_s
        self.actors = [create_sampler(cfg, i, **actor_options) for i in range(n)]
        self.alive = [True] * n
        self.restarting: set[int] = set()
        # Incarnations seen per actor: failures of calls sent to an older one are not a new restart.
        self.epoch = [0] * n
        self.sent_version = [-1] * n        # version of the last sync submitted to each actor
        self.version = -1                   # the latest version handed to the pool
        self._packet_ref: ray.ObjectRef | None = None
        self._pending_syncs: list[tuple[int, ray.ObjectRef, int, int]] = []
        self.verifier = SyncVerifier(s.probe_every)
        self.probe_seed = cfg.train.seed
        self.max_attempts = 2 * (s.max_restarts + 1) * n + 1
        self._rr = 0
        self.restarts = 0
        self.resyncs = 0
        self._window = self._empty_window()

    # ------------------------------------------------------------------ actor health

    def _alive_indices(self) -> list[int]:
        return [i for i, ok in enumerate(self.alive) if ok]

    def _lost(self, i: int, epoch: int, why: str) -> None:
        """A call sent to incarnation `epoch` of actor i failed: unless that restart is already known,
        take it out of rotation until it answers; it is re-synced after."""
        if epoch != self.epoch[i] or not self.alive[i]:
            return
        self.epoch[i] += 1
        self.sent_version[i] = -1
        self.restarting.add(i)
        self.restarts += 1
        log.warning("sampler %d unavailable (%s); waiting for its restart", i, why.splitlines()[0][:200])

    def _ping(self, i: int, wait_s: float) -> bool:
        """Whether actor i answers within `wait_s`. Calls to a restarting actor fail at once, so poll;
        an actor that is gone for good (restarts used up) is dropped."""
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            try:
                ray.get(self.actors[i].version.remote(), timeout=max(left, 0.05))
                return True
            except ActorUnavailableError:
                if left <= 0:
                    return False
                time.sleep(min(0.2, max(left, 0.0)))
            except GetTimeoutError:
                return False
            except RayActorError:
                log.warning("sampler %d is dead; %d actors left", i, len(self._alive_indices()) - 1)
                self.alive[i] = False
                self.restarting.discard(i)
                return False

    def _refresh(self, block: bool) -> None:
        """Takes restarted actors back into rotation; with `block`, waits until one is usable."""
        for i in sorted(self.restarting):
            if self._ping(i, 0.0):
                self.restarting.discard(i)
        deadline = time.monotonic() + self.restart_timeout_s
        while block and not self._ready_indices():
            if not self._alive_indices():
                raise RuntimeError("every sampler actor is dead (ray.sampler.max_restarts exhausted)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no sampler actor came back within {self.restart_timeout_s:.0f}s")
            for i in sorted(self.restarting):
                if self._ping(i, 1.0):
                    self.restarting.discard(i)

    def _ready_indices(self) -> list[int]:
        return [i for i in self._alive_indices() if i not in self.restarting]

    # ------------------------------------------------------------------ weights

    @staticmethod
    def _empty_window() -> dict:
        return {"images": 0, "generate_s": 0.0, "roundtrips": [], "sync_s": 0.0, "probe_err": None}

    def _send_sync(self, i: int) -> None:
        if self._packet_ref is None:  # use_base_weights: nothing to load
            ref = self.actors[i].use_base_weights.remote(self.version)
        else:
            ref = self.actors[i].sync.remote(self._packet_ref, self.version)
        self._pending_syncs.append((i, ref, self.version, self.epoch[i]))
        self.sent_version[i] = self.version

    def collect_syncs(self, block: bool = False) -> None:
        """Checks finished sync calls: each actor must report the version it was sent."""
        if not self._pending_syncs:
            return
        refs = [entry[1] for entry in self._pending_syncs]
        ready_set = set(ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)[0])
        keep = []
        for entry in self._pending_syncs:
            i, ref, version, epoch = entry
            if ref not in ready_set:
                keep.append(entry)
                continue
            try:
                got = ray.get(ref)
            except RayActorError as e:
                self._lost(i, epoch, str(e))
                continue
            self.verifier.check_version(version, got, who=f"sampler {i}")
        self._pending_syncs = keep

    def sync_all(self, modules: torch.nn.Module | list[torch.nn.Module], version: int,
                 wait: bool = False) -> dict[str, float]:
        """Hands policy `version` to every actor (one object-store copy shared by all).

        Returns without waiting unless `wait` or this sync is due for the probe check (every
        ray.sampler.probe_every syncs), which compares each actor's outputs on a fixed probe batch with
        the learner's and raises WeightSyncError on a mismatch. Version mismatches raise too, when the
        sync's reply is collected.
        """
        t0 = time.perf_counter()
        self.collect_syncs(block=False)
        packet = make_packet(modules, version)
        self._packet_ref = ray.put(packet)
        self.version = int(version)
        for i in self._ready_indices():  # restarting ones get it when they are back
            self._send_sync(i)
        probe = self.verifier.next_sync()
        metrics = {"sync/version": float(version), "sync/packet_mb": packet.num_bytes / 2**20}
        if wait or probe:
            self.collect_syncs(block=True)
        if probe:
            unet = modules if isinstance(modules, torch.nn.Module) else modules[0]
            metrics["sync/probe_max_abs_err"] = self._probe_check(unet, version)
        dt = time.perf_counter() - t0
        self._window["sync_s"] += dt
        metrics["sync/seconds"] = dt
        return metrics

    def _probe_check(self, unet: torch.nn.Module, version: int) -> float:
        probe = ProbeBatch.build(unet, self.probe_seed)
        sender = probe_outputs(unet, probe)
        sender_dtype = compute_dtype(unet)
        errs = []
        for i in self._ready_indices():
            if self.sent_version[i] != version:
                continue  # its sync failed: re-synced when it is back, and version-checked then
            try:
                got = ray.get(self.actors[i].probe.remote(self.probe_seed), timeout=self.restart_timeout_s)
            except (RayActorError, GetTimeoutError) as e:
                self._lost(i, self.epoch[i], str(e))
                continue
            self.verifier.check_version(version, got["version"], who=f"sampler {i}")
            dtype = lowest_precision(sender_dtype, getattr(torch, got["dtype"]))
            errs.append(self.verifier.check_probe(sender, got["out"], dtype, who=f"sampler {i}",
                                                  version=version))
        err = max(errs, default=0.0)
        self.verifier.last_probe_err = err
        self._window["probe_err"] = err
        return err

    def use_base_weights(self, version: int = 0) -> None:
        """Samples the model the actors were built with (cfg.model) as policy `version`: no learner and
        no weight packet (dataset building, baselines). Restarted actors are rebuilt from the same config
        and declared base again before they sample. A later `sync_all` replaces it as usual."""
        self.collect_syncs(block=False)
        self._packet_ref = None
        self.version = int(version)
        for i in self._ready_indices():
            self._send_sync(i)
        self.collect_syncs(block=True)

    def versions(self) -> list[int]:
        """Each live actor's version as it reports it now (waits behind queued calls)."""
        return ray.get([self.actors[i].version.remote() for i in self._ready_indices()])

    # ------------------------------------------------------------------ requests

    def _pick(self) -> int:
        if self.restarting:
            self._refresh(block=not self._ready_indices())
        ready = self._ready_indices()
        if not ready:
            raise RuntimeError("every sampler actor is dead (ray.sampler.max_restarts exhausted)")
        i = ready[self._rr % len(ready)]
        self._rr += 1
        return i

    def _dispatch(self, i: int, prompts: list[str], seeds: list[int]) -> ray.ObjectRef:
        if self.version < 0:
            raise RuntimeError("SamplerPool.sync_all (or use_base_weights) must run before the first request")
        if self.sent_version[i] != self.version:
            self.resyncs += 1
            self._send_sync(i)
        s = self.cfg.ray.sampler
        return self.actors[i].generate.remote(prompts, seeds, s.inference_steps, s.guidance_scale,
                                              self.output, expected_version=self.version)

    def submit(self, prompts: list[str], seeds: list[int]) -> SampleRequest:
        """Starts one generate call on the next usable actor (round-robin)."""
        i = self._pick()
        ref = self._dispatch(i, list(prompts), list(seeds))
        return SampleRequest(list(prompts), list(seeds), i, ref, self.version, self.epoch[i])

    def _retry(self, req: SampleRequest, reason: str) -> None:
        req.attempts += 1
        if req.attempts > self.max_attempts:
            raise RuntimeError(f"sample request failed {req.attempts} times; last: {reason}")
        i = self._pick()
        req.actor, req.expected_version, req.epoch = i, self.version, self.epoch[i]
        req.ref = self._dispatch(i, req.prompts, req.seeds)

    def resolve(self, req: SampleRequest) -> dict | None:
        """The result of a finished request, or None after resubmitting a failed one (in place)."""
        i = req.actor
        try:
            result = ray.get(req.ref)
        except StaleSamplerError as e:
            # It answers but lost its weights: it restarted between our calls. Re-sync, then retry.
            if req.epoch == self.epoch[i]:
                self.epoch[i] += 1
                self.restarts += 1
                self.sent_version[i] = -1
                log.warning("sampler %d: %s; re-syncing version %d", i, e, self.version)
            self._retry(req, str(e))
            return None
        except RayActorError as e:
            self._lost(i, req.epoch, str(e))
            self._retry(req, str(e))
            return None
        rtt = time.perf_counter() - req.submitted_at
        result["roundtrip_s"] = rtt
        w = self._window
        w["images"] += len(result["seeds"])
        w["generate_s"] += result["generate_s"]
        w["roundtrips"].append(rtt)
        return result

    def wait(self, requests: list[SampleRequest], timeout: float | None = None,
             num_returns: int = 1) -> list[tuple[SampleRequest, dict]]:
        """Blocks until at least `num_returns` requests finish (or `timeout`); returns those that
        succeeded. Failed ones are resubmitted in place and stay in flight."""
        if not requests:
            return []
        refs = [r.ref for r in requests]
        ready, _ = ray.wait(refs, num_returns=min(num_returns, len(refs)), timeout=timeout)
        if ready:  # collect everything already finished, not just the first num_returns
            ready = ray.wait(refs, num_returns=len(refs), timeout=0)[0] or ready
        ready_set = set(ready)
        done = []
        for req in requests:
            if req.ref in ready_set:
                result = self.resolve(req)
                if result is not None:
                    done.append((req, result))
        return done

    def request(self, prompts: list[str], seeds: list[int], max_per_request: int | None = None) -> dict:
        """Generates (prompt, seed) samples split across the usable actors, in requests of at most
        `max_per_request` prompts when given; blocks; merged in order."""
        if not prompts:
            raise ValueError("no prompts to sample")
        n = min(len(self._ready_indices()) or 1, len(prompts))
        if max_per_request:
            n = max(n, -(-len(prompts) // max_per_request))
        bounds = [round(k * len(prompts) / n) for k in range(n + 1)]
        reqs = [self.submit(prompts[a:b], seeds[a:b]) for a, b in zip(bounds, bounds[1:])]
        results: dict[int, dict] = {}
        pending = list(reqs)
        while pending:
            for req, res in self.wait(pending, timeout=None):
                results[id(req)] = res
            pending = [r for r in pending if id(r) not in results]
        return merge_results([results[id(r)] for r in reqs])

    # ------------------------------------------------------------------ metrics, shutdown

    def pop_metrics(self) -> dict[str, float]:
        """Sampler metrics since the last call."""
        w, self._window = self._window, self._empty_window()
        out: dict[str, float] = {
            "sampler_restarts": float(self.restarts), "sampler_resyncs": float(self.resyncs),
            "sampler_alive": float(len(self._alive_indices())), "sync_s": w["sync_s"],
        }
        if w["generate_s"] > 0:
            out["sampler_images_per_s"] = w["images"] / w["generate_s"]
        if w["roundtrips"]:
            out["sampler_roundtrip_s"] = sum(w["roundtrips"]) / len(w["roundtrips"])
        if w["probe_err"] is not None:
            out["probe_max_abs_err"] = w["probe_err"]
        return out

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.alive = [False] * len(self.actors)


def merge_results(results: list[dict]) -> dict:
    """Concatenates generate results (in the given order)."""
    out: dict = {"prompts": [], "seeds": [], "versions": []}
    for r in results:
        out["prompts"] += r["prompts"]
        out["seeds"] += r["seeds"]
        out["versions"] += r["versions"]
    if results and "latents" in results[0]:
        out["latents"] = torch.cat([r["latents"] for r in results])
    if results and "images" in results[0]:
        out["images"] = [im for r in results for im in r["images"]]
    out["roundtrip_s"] = max((r.get("roundtrip_s", 0.0) for r in results), default=0.0)
    gen = sum(r["generate_s"] for r in results)
    out["images_per_s"] = len(out["seeds"]) / gen if gen > 0 else 0.0
    return out
