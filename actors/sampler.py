"""On-policy sampling on Ray: `SamplerPool` is one process's view of a group of `SamplerActor`s
(see `sampler_worker`) and a `WeightBoard`: it publishes versioned weight packets (the learner's
rank 0) and requests version-tagged samples (every rank, for itself), surviving actor restarts.

Consistency rules:
- every sample carries the policy version that generated it (the learner's step of its weights);
- rank 0 puts each packet in the object store once and publishes (version, ref) on the board;
  nothing is pushed to the actors;
- a generate call names the lowest version it accepts (`min_version`, from the caller's sync
  schedule) and the board epoch (`min_epoch`, bumped when a restarted learner or a rollback
  republishes older weights); an actor holding less (a restarted actor holds -1) pulls the board's
  latest packet itself first, waiting at most ray.sampler.board_timeout_s, so a restarted actor
  re-syncs without rank 0;
- the probe check (every ray.sampler.probe_every syncs) compares each actor's outputs with rank 0's.
"""

from __future__ import annotations

import asyncio
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
    packet_dtype,
    probe_outputs,
)
from diffalign.config import RunConfig
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

log = logging.getLogger(__name__)


class WeightBoard:
    """The latest published policy: (version, epoch, seq, packet ref). Rank 0 publishes; sampler
    actors read it when a request needs a newer policy than they hold. An async actor, so waits
    for a publication do not hold up the publication itself.

    `seq` counts publications; `epoch` counts lineages (a new one when versions may go back: a
    restarted learner attempt or a guard rollback), so a sampler never mistakes weights of a
    discarded future for the current ones.
    """

    def __init__(self) -> None:
        self._latest: dict = {"version": -1, "epoch": -1, "seq": -1, "refs": [], "base": False}
        self._changed: asyncio.Condition | None = None
        self.publications = 0

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # made inside the actor's event loop
            self._changed = asyncio.Condition()
        return self._changed

    async def publish(self, version: int, refs: list, base: bool = False, new_epoch: bool = False,
                      epoch: int = -1) -> dict:
        """`refs`: [packet ref] (a list, so Ray hands the ref itself, not the packet), [] for `base`.
        `epoch`: the publisher's current one, so a board that Ray restarted (empty) resumes it."""
        cond = self._cond()
        async with cond:
            last = self._latest
            held = max(last["epoch"], int(epoch))
            epoch = held + 1 if new_epoch or held < 0 else held
            self._latest = {"version": int(version), "epoch": epoch, "seq": last["seq"] + 1,
                            "refs": list(refs), "base": bool(base)}
            self.publications += 1
            cond.notify_all()
        return self.latest_info()

    def latest_info(self) -> dict:
        return {k: v for k, v in self._latest.items() if k != "refs"}

    async def latest(self) -> dict:
        return dict(self._latest)

    async def wait_for(self, min_version: int, min_epoch: int, timeout_s: float,
                       lost_seq: int = -1) -> dict | None:
        """The latest publication once it is >= (min_epoch, min_version) and not `lost_seq` (a packet
        whose owner died); None if none is within `timeout_s`."""
        cond = self._cond()

        def ready() -> bool:
            x = self._latest
            return x["seq"] != lost_seq and x["seq"] >= 0 and (
                x["epoch"] > min_epoch or (x["epoch"] == min_epoch and x["version"] >= min_version))

        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(ready), timeout=max(timeout_s, 0.0))
            except asyncio.TimeoutError:
                return None
            return dict(self._latest)


def create_board() -> ray.actor.ActorHandle:
    """A `WeightBoard` actor (no CPU: it only holds refs). Restarted by Ray if it dies: it comes
    back empty, samplers that need a version wait (bounded) for rank 0's next publication, which
    carries the current epoch."""
    return ray.remote(WeightBoard).options(num_cpus=0, max_restarts=-1, max_task_retries=0).remote()


def create_sampler(cfg: RunConfig, index: int = 0, board: ray.actor.ActorHandle | None = None,
                   **options: Any) -> ray.actor.ActorHandle:
    """A `SamplerActor` placed and made restartable per `cfg.ray.sampler`, reading `board`.

    max_task_retries=0: Ray does not replay calls on a restarted actor; the pool resubmits them, and
    the restarted actor (rebuilt with the same board handle) re-syncs itself from the board first.
    """
    s = cfg.ray.sampler
    opts = dict(max_restarts=s.max_restarts, max_task_retries=0, num_cpus=s.num_cpus, num_gpus=s.num_gpus)
    opts.update(options)
    return SamplerActor.options(**opts).remote(cfg, index, board)


def create_samplers(cfg: RunConfig, n: int | None = None, options_for: Any = None,
                    **options: Any) -> tuple[ray.actor.ActorHandle, list[ray.actor.ActorHandle]]:
    """The board and `n` (ray.sampler.num) sampler actors, owned by the calling process.
    `options_for(i) -> dict` adds per-actor options (resources, scheduling strategy)."""
    n = cfg.ray.sampler.num if n is None else n
    board = create_board()
    actors = [create_sampler(cfg, i, board, **{**options, **(options_for(i) if options_for else {})})
              for i in range(n)]
    return board, actors


def kill_actors(*actors: Any) -> None:
    for actor in actors:
        if actor is None:
            continue
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


@dataclass
class SampleRequest:
    """An in-flight generate call; the pool moves it to another actor (new ref) when one fails."""

    prompts: list[str]
    seeds: list[int]
    actor: int
    ref: ray.ObjectRef
    expected_version: int               # the lowest version accepted (min_version)
    epoch: int = 0                      # the actor's incarnation as the pool knew it at dispatch
    submitted_at: float = field(default_factory=time.perf_counter)
    attempts: int = 0


class SamplerPool:
    """n `SamplerActor`s and their `WeightBoard`: publishing (rank 0), round-robin requests,
    restart tolerance, metrics.

    `actors` / `board`: handles made elsewhere (the Ray learner's driver owns them; every rank's pool
    uses the same ones, and `shutdown` leaves them alone). None: this pool creates and owns them.
    An actor that fails a call is taken out of the rotation until it answers again (Ray restarts it
    up to ray.sampler.max_restarts times); its failed requests go to another live actor, or wait for
    it when it is the only one. The restarted actor pulls the board's packet itself.
    """

    def __init__(self, cfg: RunConfig, n: int | None = None, output: str = "latent",
                 restart_timeout_s: float = 300.0, actors: list | None = None,
                 board: ray.actor.ActorHandle | None = None, rank: int = 0, **actor_options: Any) -> None:
        s = cfg.ray.sampler
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if (actors is None) != (board is None):
            raise ValueError("pass both the sampler actors and their weight board, or neither")
        self.owns_actors = actors is None
        self.placement = None
        if actors is None:
            # The process that makes the pool places its actors: one bundle each in a placement group
            # of its own (per-node check first), removed on shutdown.
            from diffalign.actors.placement import SidePlacement

            count = s.num if n is None else n
            self.placement = SidePlacement(cfg, samplers=count, reference=False).start()
            try:
                board, actors = create_samplers(
                    cfg, count, options_for=lambda i: self.placement.actor_options("sampler", i),
                    **actor_options)
            except BaseException:
                self.placement.remove()
                raise
        if not actors:
            raise ValueError("a sampler pool needs at least one actor, got none")
        self.cfg, self.output, self.restart_timeout_s, self.rank = cfg, output, restart_timeout_s, rank
        self.board, self.actors = board, list(actors)
        n = len(self.actors)
        self.alive = [True] * n
        self.restarting: set[int] = set()
        # Incarnations seen per actor: failures of calls sent to an older one are not a new restart.
        self.epoch = [0] * n
        self.pids: list[int | None] = [None] * n   # the process last seen answering, per actor
        self.version = -1                   # the lowest version requests accept (latest published/told)
        self.board_epoch = -1               # the board epoch requests must be in (-1: none published yet)
        self.packet_dtype = packet_dtype(cfg.model.mixed_precision)
        self.verifier = SyncVerifier(s.probe_every)
        self.probe_seed = cfg.train.seed
        self.max_attempts = 2 * (s.max_restarts + 1) * n + 1
        self._rr = 0
        self.restarts = 0
        self.resyncs = 0
        self.last_packet_mb = 0.0
        self._window = self._empty_window()

    # ------------------------------------------------------------------ actor health

    def _alive_indices(self) -> list[int]:
        return [i for i, ok in enumerate(self.alive) if ok]

    def _lost(self, i: int, epoch: int, why: str) -> None:
        """A call sent to incarnation `epoch` of actor i failed: unless that failure is already known,
        take it out of rotation until it answers."""
        if epoch != self.epoch[i] or not self.alive[i]:
            return
        self.epoch[i] += 1
        self.restarting.add(i)
        log.warning("sampler %d unavailable (%s); waiting for its restart", i, why.splitlines()[0][:200])

    def _seen(self, i: int, pid: int | None, pulled_from: int | None = None) -> None:
        """An answer of actor i from process `pid`: a new process is a restart (counted once, however
        many calls failed meanwhile); it re-synced itself when it pulled from version -1."""
        if pid is None:
            return
        if self.pids[i] is not None and pid != self.pids[i]:
            self.restarts += 1
            if pulled_from == -1:
                self.resyncs += 1
            log.warning("sampler %d restarted (pid %s -> %s)", i, self.pids[i], pid)
        self.pids[i] = pid

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

    def set_epoch(self, epoch: int) -> None:
        """The board epoch this pool's requests must be in (told by rank 0 after it published)."""
        self.board_epoch = int(epoch)

    def _pull_all(self, version: int) -> None:
        """Every usable actor pulls the board's latest now and must then hold `version`."""
        calls = [(i, self.epoch[i], self.actors[i].pull.remote(version, self.board_epoch))
                 for i in self._ready_indices()]
        bound = self.cfg.ray.sampler.board_timeout_s + 60.0
        for i, epoch, ref in calls:
            try:
                got = ray.get(ref, timeout=bound)
            except (RayActorError, GetTimeoutError) as e:
                self._lost(i, epoch, str(e))  # it pulls by itself when it is back
                continue
            self.verifier.check_version(version, got, who=f"sampler {i}")

    def _publish(self, refs: list, version: int, base: bool, new_epoch: bool) -> dict:
        info = ray.get(self.board.publish.remote(int(version), refs, base, new_epoch, self.board_epoch),
                       timeout=self.restart_timeout_s)
        self.version = int(version)
        self.board_epoch = int(info["epoch"])
        return info

    def sync_all(self, modules: torch.nn.Module | list[torch.nn.Module], version: int,
                 wait: bool = False, new_epoch: bool = False) -> dict[str, float]:
        """Publishes policy `version`: one packet in the training dtype (`packet_dtype`), put in the
        object store once and announced on the board; actors pull it when a request needs it.

        `new_epoch`: versions may go back (a restored or rolled-back learner), so actors must drop
        what they hold. With `wait`, or when this sync is due for the probe check (every
        ray.sampler.probe_every syncs), every usable actor pulls it now and reports the version; the
        probe compares each actor's outputs on a fixed batch with the learner's and raises
        WeightSyncError on a mismatch.
        """
        t0 = time.perf_counter()
        packet = make_packet(modules, version, dtype=self.packet_dtype)
        info = self._publish([ray.put(packet)], version, False, new_epoch)
        probe = self.verifier.next_sync()
        self.last_packet_mb = packet.num_bytes / 2**20
        metrics = {"sync/version": float(version), "sync/packet_mb": self.last_packet_mb,
                   "sync/epoch": float(info["epoch"])}
        if wait or probe:
            self._pull_all(int(version))
        if probe:
            unet = modules if isinstance(modules, torch.nn.Module) else modules[0]
            metrics["sync/probe_max_abs_err"] = self._probe_check(unet, int(version), packet.dtype)
        dt = time.perf_counter() - t0
        self._window["sync_s"] += dt
        metrics["sync/seconds"] = dt
        return metrics

    def _probe_check(self, unet: torch.nn.Module, version: int, sent_dtype: torch.dtype) -> float:
        probe = ProbeBatch.build(unet, self.probe_seed)
        sender = probe_outputs(unet, probe)
        sender_dtype = compute_dtype(unet)
        errs = []
        for i in self._ready_indices():
            try:
                got = ray.get(self.actors[i].probe.remote(self.probe_seed, version, self.board_epoch),
                              timeout=self.restart_timeout_s)
            except (RayActorError, GetTimeoutError) as e:
                self._lost(i, self.epoch[i], str(e))
                continue
            self.verifier.check_version(version, got["version"], who=f"sampler {i}")
            # The loosest of what the learner computes in, what the packet carried, what the actor runs.
            dtype = lowest_precision(sender_dtype, getattr(torch, got["dtype"]), sent_dtype)
            errs.append(self.verifier.check_probe(sender, got["out"], dtype, who=f"sampler {i}",
                                                  version=version))
        err = max(errs, default=0.0)
        self.verifier.last_probe_err = err
        self._window["probe_err"] = err
        return err

    def use_base_weights(self, version: int = 0) -> None:
        """Samples the model the actors were built with (cfg.model) as policy `version`: no learner and
        no weight packet (dataset building, baselines). Restarted actors are rebuilt from the same config
        and pull "base" from the board again before they sample. A later `sync_all` replaces it."""
        self._publish([], version, True, True)
        self._pull_all(int(version))

    def versions(self) -> list[int]:
        """Each live actor's version as it reports it now (waits behind queued calls)."""
        return ray.get([self.actors[i].version.remote() for i in self._ready_indices()],
                       timeout=self.restart_timeout_s)

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

    def _dispatch(self, i: int, prompts: list[str], seeds: list[int], min_version: int) -> ray.ObjectRef:
        s = self.cfg.ray.sampler
        return self.actors[i].generate.remote(prompts, seeds, s.inference_steps, s.guidance_scale,
                                              self.output, min_version=min_version,
                                              min_epoch=self.board_epoch, requester=self.rank)

    def submit(self, prompts: list[str], seeds: list[int], min_version: int | None = None) -> SampleRequest:
        """Starts one generate call on the next usable actor (round-robin). The samples will be of
        policy version >= `min_version` (default: the latest this pool published or was told)."""
        min_version = self.version if min_version is None else int(min_version)
        if min_version < 0:
            raise RuntimeError("SamplerPool.sync_all (or use_base_weights) must run before the first "
                               "request, or the request must name its min_version")
        i = self._pick()
        ref = self._dispatch(i, list(prompts), list(seeds), min_version)
        return SampleRequest(list(prompts), list(seeds), i, ref, min_version, self.epoch[i])

    def _retry(self, req: SampleRequest, reason: str) -> None:
        req.attempts += 1
        if req.attempts > self.max_attempts:
            raise RuntimeError(f"sample request failed {req.attempts} times; last: {reason}")
        i = self._pick()
        req.actor, req.epoch, req.submitted_at = i, self.epoch[i], time.perf_counter()
        req.ref = self._dispatch(i, req.prompts, req.seeds, req.expected_version)

    def resolve(self, req: SampleRequest) -> dict | None:
        """The result of a finished request, or None after resubmitting a failed one (in place)."""
        i = req.actor
        try:
            result = ray.get(req.ref, timeout=0)  # only called on finished refs
        except StaleSamplerError as e:  # an expected_version call elsewhere; never from min_version ones
            self._retry(req, str(e))
            return None
        except RayActorError as e:
            self._lost(i, req.epoch, str(e))
            self._retry(req, str(e))
            return None
        self._seen(i, result.get("pid"), result.get("pulled_from"))
        rtt = time.perf_counter() - req.submitted_at
        result["roundtrip_s"] = rtt
        w = self._window
        w["images"] += len(result["seeds"])
        w["generate_s"] += result["generate_s"]
        w["roundtrips"].append(rtt)
        return result

    @property
    def request_timeout_s(self) -> float:
        """The longest a blocking wait for samples lasts: an actor may first wait for the board
        (board_timeout_s) and then be restarted (restart_timeout_s)."""
        return self.cfg.ray.sampler.board_timeout_s + self.restart_timeout_s

    def wait(self, requests: list[SampleRequest], timeout: float | None = None,
             num_returns: int = 1) -> list[tuple[SampleRequest, dict]]:
        """Blocks until at least `num_returns` requests finish (or `timeout`); returns those that
        succeeded. Failed ones are resubmitted in place and stay in flight. `timeout=None` waits at
        most `request_timeout_s`, then raises TimeoutError."""
        if not requests:
            return []
        refs = [r.ref for r in requests]
        bound = self.request_timeout_s if timeout is None else timeout
        ready, _ = ray.wait(refs, num_returns=min(num_returns, len(refs)), timeout=bound)
        if not ready and timeout is None:
            raise TimeoutError(f"no sample request of {len(refs)} in flight finished within {bound:.0f}s "
                               f"(ray.sampler.board_timeout_s + the restart wait) on actors "
                               f"{sorted({r.actor for r in requests})}")
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

    def request(self, prompts: list[str], seeds: list[int], max_per_request: int | None = None,
                min_version: int | None = None) -> dict:
        """Generates (prompt, seed) samples split across the usable actors, in requests of at most
        `max_per_request` prompts when given, of version >= `min_version` (see `submit`); blocks
        (each wait bounded, see `wait`); merged in order."""
        if not prompts:
            raise ValueError("no prompts to sample")
        n = min(len(self._ready_indices()) or 1, len(prompts))
        if max_per_request:
            n = max(n, -(-len(prompts) // max_per_request))
        bounds = [round(k * len(prompts) / n) for k in range(n + 1)]
        reqs = [self.submit(prompts[a:b], seeds[a:b], min_version) for a, b in zip(bounds, bounds[1:])]
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
            "packet_mb": self.last_packet_mb,
        }
        if w["generate_s"] > 0:
            out["sampler_images_per_s"] = w["images"] / w["generate_s"]
        if w["roundtrips"]:
            out["sampler_roundtrip_s"] = sum(w["roundtrips"]) / len(w["roundtrips"])
        if w["probe_err"] is not None:
            out["probe_max_abs_err"] = w["probe_err"]
        return out

    def shutdown(self) -> None:
        """Kills the actors and the board if this pool created them (the driver kills its own)."""
        if self.owns_actors:
            kill_actors(*self.actors, self.board)
        if self.placement is not None:
            self.placement.remove()
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
