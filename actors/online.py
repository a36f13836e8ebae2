"""Online preference training for personalization: chosen = the user's target images, rejected = what
the current policy generates for the identifier prompt, sampled on Ray `SamplerActor`s while the
learner trains. MaPO is the method (reference-free); DPO / xDPO take the same on-policy pairs with
a reference (colocated or on a `ReferenceActor`).

Both runtimes build their trainer with the one driver (`diffalign.train.driver`) and `OnlineData`:
- one learner process + the sampler pool (`recipes/mapo_personalize.py`, `diffalign.train.driver.run`);
- the Ray Train learner (`diffalign.actors.learner`, ray.enabled=true): N workers; the driver owns
  the sampler actors and their `WeightBoard` and hands the handles to every worker. Rank 0 alone
  publishes weights; every rank requests its own rejected samples straight from the actors (no
  funnel through rank 0, no scatter) and keeps its own replay buffer.

Versions are learner steps: the weights after optimizer step k are policy version k, published every
ray.sampler.sync_every steps. A request at learner version v asks for version >= the latest
published one by the schedule (v rounded down to a multiple of sync_every): an actor holding less
pulls it from the board first. A rejected sample made by version u and used at step s has
staleness s - u; samples older than online.max_staleness are never trained on (evicted, counted).

- mode "sync": each micro-batch asks the pool for fresh samples and waits for them;
- mode "async": requests are kept in flight ahead of the learner (just enough that they are still
  fresh when used), so sampling overlaps the learner's steps; the learner blocks only when nothing
  fresh enough has arrived.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from diffalign.actors.sampler import SampleRequest, SamplerPool
from diffalign.config import OnlineConfig, RunConfig, SamplerPoolConfig
from diffalign.config.schema import ONLINE_MODES as MODES
from diffalign.data.collate import collate_pairs
from diffalign.data.files import ImageFolderDataset
from diffalign.train.driver import TrainingData
from diffalign.train.loop import Trainer
from diffalign.train.protocols import Callback

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One on-policy rejected sample."""

    prompt: str
    seed: int
    latents: torch.Tensor      # (C, h, w) scaled latents
    version: int               # policy version that generated it
    epoch: int = 0             # the weight board epoch of that version (see sampler.WeightBoard)
    requester: int | None = None  # the learner rank whose request made it


class ReplayBuffer:
    """Rejected samples waiting to be trained on, each used once, oldest first.

    A sample is fresh at learner version `current` when 0 <= current - version <= max_staleness and
    its board epoch is >= `min_epoch`; anything else is evicted and counted in `stale_dropped` (a
    negative age or an older epoch means the sample came from weights a guard rollback or a
    restarted learner threw away). Beyond `capacity` the oldest samples are dropped
    (`overflow_dropped`).
    """

    def __init__(self, capacity: int, max_staleness: int) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.capacity, self.max_staleness = capacity, max_staleness
        self._items: deque[Sample] = deque()
        self.min_epoch = 0
        self.stale_dropped = 0
        self.overflow_dropped = 0
        self.added = 0
        self.taken = 0

    def __len__(self) -> int:
        return len(self._items)

    def is_fresh(self, sample: Sample, current_version: int) -> bool:
        return sample.epoch >= self.min_epoch and 0 <= current_version - sample.version <= self.max_staleness

    def add(self, samples: Iterable[Sample]) -> None:
        for s in samples:
            self._items.append(s)
            self.added += 1
        while len(self._items) > self.capacity:
            self._items.popleft()
            self.overflow_dropped += 1

    def evict_stale(self, current_version: int) -> int:
        keep = deque(s for s in self._items if self.is_fresh(s, current_version))
        dropped = len(self._items) - len(keep)
        self._items = keep
        self.stale_dropped += dropped
        return dropped

    def take(self, n: int, current_version: int) -> list[Sample]:
        """Up to `n` fresh samples (oldest first), removed from the buffer; stale ones are evicted."""
        self.evict_stale(current_version)
        out = []
        while self._items and len(out) < n:
            out.append(self._items.popleft())
        self.taken += len(out)
        return out

    def ages(self, current_version: int) -> list[int]:
        return [current_version - s.version for s in self._items]


def _samples(result: dict) -> list[Sample]:
    epoch, requester = int(result.get("epoch", 0)), result.get("requester")
    return [Sample(p, s, lat, v, epoch, requester) for p, s, lat, v in
            zip(result["prompts"], result["seeds"], result["latents"], result["versions"])]


def schedule_version(version: int, sync_every: int) -> int:
    """The latest policy version published by learner `version` (one publication every `sync_every`
    steps): what a request at that version asks the samplers for at least."""
    return version - version % sync_every


class OnPolicyPairs:
    """The Trainer's `batch_source`: target images as chosen, on-policy samples as rejected.

    Returns {"prompts", "chosen_latents", "rejected_latents", "original_sizes", "crop_top_lefts",
    "rejected_seeds", "rejected_versions", "rejected_requesters", "rejected_epochs"}; chosen latents
    come from the learner's VAE encoder, rejected ones straight from the samplers (the pipeline's
    latent output is in the same scaled space). Every rank runs one with its own pool view and asks
    for its own samples; seeds are interleaved over ranks (rank r draws base + k * world_size + r), so ranks
    never sample the same seed.
    """

    # Defaults are the config's (OnlineConfig, SamplerPoolConfig): written once, there.
    def __init__(self, pool: SamplerPool, latent_encoder, prompt: str, batch_size: int,
                 mode: str = OnlineConfig.mode, max_staleness: int = OnlineConfig.max_staleness,
                 sync_every: int = SamplerPoolConfig.sync_every, grad_accum: int = 1,
                 buffer_size: int = OnlineConfig.buffer_size,
                 samples_per_request: int = OnlineConfig.samples_per_request, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if pool is None:
            raise ValueError("every rank needs a sampler pool (its view of the sampler actors)")
        if mode not in MODES:
            raise ValueError(f"online.mode must be one of {MODES}, got {mode!r}")
        if max_staleness < sync_every - 1:
            # Even a sample made right now can be sync_every - 1 versions old: nothing would be fresh.
            raise ValueError(f"online.max_staleness={max_staleness} must be >= ray.sampler.sync_every - 1 "
                             f"= {sync_every - 1}")
        self.pool, self.encode, self.prompt = pool, latent_encoder, prompt
        self.batch_size, self.mode, self.grad_accum = batch_size, mode, grad_accum
        self.sync_every = sync_every
        self.rank, self.world_size = rank, world_size
        self.samples_per_request = max(1, samples_per_request)
        self.buffer = ReplayBuffer(max(buffer_size, batch_size), max_staleness)
        # Samples kept ready or in flight in async mode (this rank's own). A batch requested at step s
        # is of version >= schedule_version(s) >= s - sync_every + 1, so used j steps later it is at
        # most j + sync_every - 1 versions old: j <= max_staleness - sync_every + 1.
        ahead_steps = max(0, max_staleness - sync_every + 1)
        per_step = batch_size * grad_accum
        self.lookahead = min(self.buffer.capacity, per_step * ahead_steps)
        self.in_flight: list[SampleRequest] = []
        self._next_seed = seed * 1_000_000
        self._seed_count = 0
        self.requested = 0           # samples this rank asked the actors for
        self._window: dict[str, list[float]] = {"ages": [], "wait": []}

    # ------------------------------------------------------------------ sampling

    def set_epoch(self, epoch: int) -> None:
        """The board epoch rank 0 published the current lineage in: older samples are stale."""
        self.pool.set_epoch(epoch)
        self.buffer.min_epoch = int(epoch)
        self.buffer.evict_stale(self._version)

    def _seeds(self, n: int) -> list[int]:
        k = self._seed_count
        self._seed_count += n
        return [self._next_seed + (k + j) * self.world_size + self.rank for j in range(n)]

    def _submit(self, n: int) -> None:
        self.requested += n
        self.in_flight.append(self.pool.submit([self.prompt] * n, self._seeds(n), self._min_version))

    def _in_flight_samples(self) -> int:
        return sum(len(r.seeds) for r in self.in_flight)

    def _collect(self, block: bool) -> None:
        done = self.pool.wait(self.in_flight, timeout=None if block else 0)
        finished = {id(req) for req, _ in done}
        self.in_flight = [r for r in self.in_flight if id(r) not in finished]
        for _, result in done:
            self.buffer.add(_samples(result))

    def _top_up(self) -> None:
        while len(self.buffer) + self._in_flight_samples() < self.lookahead:
            self._submit(self.samples_per_request)

    _version = 0

    @property
    def _min_version(self) -> int:
        return schedule_version(self._version, self.sync_every)

    def rejected(self, n: int, version: int) -> list[Sample]:
        """This rank's `n` fresh on-policy samples for learner `version`, requested by this rank;
        blocks until they exist (each wait bounded: `SamplerPool.wait`)."""
        t0 = time.perf_counter()
        self._version = int(version)
        got: list[Sample] = []
        if self.mode == "sync":
            self.requested += n
            self.buffer.add(_samples(self.pool.request([self.prompt] * n, self._seeds(n),
                                                       min_version=self._min_version)))
        else:
            self._collect(block=False)
        got += self.buffer.take(n, version)
        while len(got) < n:
            if not self.in_flight:
                self._submit(max(self.samples_per_request, n - len(got)))
            self._collect(block=True)
            got += self.buffer.take(n - len(got), version)
        if self.mode == "async":
            self._top_up()  # the next requests now overlap the learner's step
        self._window["wait"].append(time.perf_counter() - t0)
        self._window["ages"] += [version - s.version for s in got]
        return got

    def __call__(self, items: Sequence[dict], micro_step: int) -> dict:
        version = micro_step // self.grad_accum
        batch = collate_pairs(items)
        images = batch.pop("images")
        rejected = self.rejected(len(items), version)
        batch["chosen_latents"] = self.encode(images)
        batch["rejected_latents"] = torch.stack([s.latents for s in rejected]).to(batch["chosen_latents"])
        batch["rejected_seeds"] = [s.seed for s in rejected]
        batch["rejected_versions"] = [s.version for s in rejected]
        batch["rejected_requesters"] = [s.requester for s in rejected]
        batch["rejected_epochs"] = [s.epoch for s in rejected]
        return batch

    # ------------------------------------------------------------------ metrics

    def pop_metrics(self) -> dict[str, float]:
        w, self._window = self._window, {"ages": [], "wait": []}
        out = {"buffer_size": float(len(self.buffer)), "stale_dropped": float(self.buffer.stale_dropped),
               "in_flight": float(self._in_flight_samples()), "wait_s": sum(w["wait"]),
               "requested": float(self.requested)}
        if w["ages"]:
            out["staleness_mean"] = sum(w["ages"]) / len(w["ages"])
            out["staleness_max"] = float(max(w["ages"]))
        return out

    def close(self) -> None:
        self.in_flight = []  # the pool's shutdown ends the calls still running


def _broadcast_from_rank0(value: int, world_size: int) -> int:
    """Rank 0's `value` on every rank (a collective: all ranks call it at the same point)."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


class OnlineSyncCallback(Callback):
    """Trainer callback on every rank: rank 0 (`publisher`) publishes the learner's policy every
    `sync_every` steps (version = trainer.step; the first, in on_start, before any step); every rank
    adds the online/* metrics of its own requests.

    online/sync_s is the time this rank spent blocked in syncs (making and publishing the packet, the
    probe check, the epoch broadcast) since the previous step's metrics, online/sync_share that time
    over the wall time of the same window (a fraction in [0, 1]).
    """

    def __init__(self, pool: SamplerPool, source: OnPolicyPairs | None = None,
                 sync_every: int = SamplerPoolConfig.sync_every, publisher: bool = True,
                 world_size: int = 1) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.pool, self.source, self.sync_every = pool, source, sync_every
        self.publisher, self.world_size = publisher, world_size
        self._last: dict[str, float] = {}
        self._sync_metrics: dict[str, float] = {}
        self._blocked = 0.0
        self._window_start = time.perf_counter()

    def _sync(self, trainer: Trainer, wait: bool = False, new_epoch: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            if self.publisher:
                self._sync_metrics.update(self.pool.sync_all(trainer.setup.trainable_modules, trainer.step,
                                                             wait=wait, new_epoch=new_epoch))
        finally:
            self._blocked += time.perf_counter() - t0

    def _new_lineage(self, trainer: Trainer, wait: bool) -> None:
        """Rank 0 publishes the current weights in a new board epoch (versions may have gone back:
        a restored or rolled-back learner); every rank then only takes samples of that epoch on."""
        self._sync(trainer, wait=wait, new_epoch=True)
        t0 = time.perf_counter()
        epoch = _broadcast_from_rank0(self.pool.board_epoch, self.world_size)
        self._blocked += time.perf_counter() - t0
        self.pool.version = trainer.step
        if self.source is not None:
            self.source.set_epoch(epoch)
        else:
            self.pool.set_epoch(epoch)

    def on_start(self, trainer: Trainer) -> None:
        # After a resume restore (fit restores before on_start), so the samplers get those weights.
        self._new_lineage(trainer, wait=True)
        self._window_start, self._blocked = time.perf_counter(), 0.0

    def on_event(self, trainer: Trainer, event: dict) -> None:
        if event.get("kind") == "rollback":  # on every rank at once (rank-consistent guards)
            self._new_lineage(trainer, wait=False)  # weights went back: samplers follow at once

    def on_step(self, trainer: Trainer, metrics: dict) -> None:
        if trainer.step % self.sync_every == 0:
            self._sync(trainer)
            self.pool.version = trainer.step
        now = time.perf_counter()
        window, blocked = now - self._window_start, self._blocked
        self._window_start, self._blocked = now, 0.0
        m = self.pool.pop_metrics()
        if self.source is not None:
            m.update(self.source.pop_metrics())
        m["sync_version"] = float(self.pool.version)
        m["sync_s"] = blocked
        m["sync_share"] = min(1.0, blocked / window) if window > 0 else 0.0
        # Keep every key present each step (async steps may see no request finish).
        for key in ("sampler_images_per_s", "sampler_roundtrip_s", "staleness_mean", "staleness_max",
                    "probe_max_abs_err"):
            if key in m:
                self._last[key] = m[key]
            elif key in self._last:
                m[key] = self._last[key]
        metrics.update({f"online/{k}": v for k, v in m.items()})
        metrics.update(self._sync_metrics)  # rank 0: the latest sync's sync/* (packet_mb, probe, ...)


def folder_dataset(cfg: RunConfig) -> ImageFolderDataset:
    d = cfg.data
    if not d.path or not d.prompt:
        raise ValueError("online MaPO needs data.path (a folder of target images) and data.prompt")
    return ImageFolderDataset(d.path, d.prompt, resolution=cfg.model.resolution,
                              random_crop=not d.center_crop, random_flip=d.random_flip, seed=cfg.train.seed,
                              on_error=d.on_error)


class OnlineData:
    """The trainer's data for online training (a `Runtime.data` factory, pickled to Ray Train workers):
    the target images as the dataset, `OnPolicyPairs` as the batch source and the weight-sync
    callback, on every rank.

    `actors` / `board`: the sampler actors and their `WeightBoard`, made by the Ray learner's driver
    (which owns and kills them); every rank's pool uses these handles. None (one process): the pool
    creates its own and shuts them down when the trainer closes.
    """

    def __init__(self, num_samplers: int | None = None, actors: list | None = None, board=None) -> None:
        self.num_samplers, self.actors, self.board = num_samplers, actors, board

    def __call__(self, cfg: RunConfig, setup, runtime) -> TrainingData:
        on, s = cfg.online, cfg.ray.sampler
        rank, world_size = runtime.rank, runtime.world_size
        if self.actors is None and world_size > 1:
            raise ValueError("online training with several learners needs the driver's sampler actors and "
                             "weight board (OnlineData(actors=..., board=...), as actors.learner passes "
                             "them)")
        dataset = folder_dataset(cfg)
        pool = SamplerPool(cfg, self.num_samplers, actors=self.actors, board=self.board, rank=rank)
        try:
            source = OnPolicyPairs(pool, setup.latent_encoder, dataset.prompt, cfg.optim.batch_size, on.mode,
                                   on.max_staleness, s.sync_every, cfg.optim.grad_accum, on.buffer_size,
                                   on.samples_per_request, cfg.train.seed, rank=rank, world_size=world_size)
        except Exception:
            pool.shutdown()
            raise
        callbacks = [OnlineSyncCallback(pool, source, s.sync_every, publisher=rank == 0,
                                        world_size=world_size)]

        def close() -> None:
            buf = source.buffer
            source.close()
            log.info("online %s, rank %d: %d samples requested, %d trained on, %d stale dropped, "
                     "%d sampler restarts seen", cfg.objective.name, rank, source.requested, buf.taken,
                     buf.stale_dropped, pool.restarts)
            pool.shutdown()  # kills only actors this pool created

        return TrainingData(dataset, None, source, callbacks, close)
