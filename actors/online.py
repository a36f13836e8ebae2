"""Online preference training for personalization: chosen = the user's target images, rejected = what
the current policy generates for the identifier prompt, sampled on Ray `SamplerActor`s while the
learner trains. MaPO is the method (reference-free); DPO / xDPO take the same on-policy pairs with
a reference (colocated or on a `ReferenceActor`).

Both runtimes build their trainer with the one driver (`diffalign.train.driver`) and `OnlineData`:
- one learner process + the sampler pool (`recipes/mapo_personalize.py`, `diffalign.train.driver.run`);
- the Ray Train learner (`diffalign.actors.learner`, ray.enabled=true): N workers; rank 0 owns the
  pool and syncs it, draws the rejected samples of every rank in one request and scatters them
  (so all ranks train on fresh samples of the same policy version).

Versions are learner steps: the weights after optimizer step k are policy version k, synced to the
samplers every ray.sampler.sync_every steps. A rejected sample made by version v and used at step s
has staleness s - v; samples older than online.max_staleness are never trained on.

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


class ReplayBuffer:
    """Rejected samples waiting to be trained on, each used once, oldest first.

    A sample is fresh at learner version `current` when 0 <= current - version <= max_staleness;
    anything else is evicted and counted in `stale_dropped` (a negative age means the sample came
    from weights a guard rollback threw away). Beyond `capacity` the oldest samples are dropped
    (`overflow_dropped`).
    """

    def __init__(self, capacity: int, max_staleness: int) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.capacity, self.max_staleness = capacity, max_staleness
        self._items: deque[Sample] = deque()
        self.stale_dropped = 0
        self.overflow_dropped = 0
        self.added = 0
        self.taken = 0

    def __len__(self) -> int:
        return len(self._items)

    def is_fresh(self, sample: Sample, current_version: int) -> bool:
        return 0 <= current_version - sample.version <= self.max_staleness

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
    return [Sample(p, s, lat, v) for p, s, lat, v in
            zip(result["prompts"], result["seeds"], result["latents"], result["versions"])]


class OnPolicyPairs:
    """The Trainer's `batch_source`: target images as chosen, on-policy samples as rejected.

    Returns {"prompts", "chosen_latents", "rejected_latents", "original_sizes", "crop_top_lefts"};
    chosen latents come from the learner's VAE encoder, rejected ones straight from the samplers
    (the pipeline's latent output is in the same scaled space).
    """

    # Defaults are the config's (OnlineConfig, SamplerPoolConfig): written once, there.
    def __init__(self, pool: SamplerPool | None, latent_encoder, prompt: str, batch_size: int,
                 mode: str = OnlineConfig.mode, max_staleness: int = OnlineConfig.max_staleness,
                 sync_every: int = SamplerPoolConfig.sync_every, grad_accum: int = 1,
                 buffer_size: int = OnlineConfig.buffer_size,
                 samples_per_request: int = OnlineConfig.samples_per_request, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if (pool is None) != (rank != 0):
            raise ValueError("the sampler pool belongs to rank 0 (and only to rank 0)")
        if mode not in MODES:
            raise ValueError(f"online.mode must be one of {MODES}, got {mode!r}")
        if max_staleness < sync_every - 1:
            # Even a sample made right now can be sync_every - 1 versions old: nothing would be fresh.
            raise ValueError(f"online.max_staleness={max_staleness} must be >= ray.sampler.sync_every - 1 "
                             f"= {sync_every - 1}")
        self.pool, self.encode, self.prompt = pool, latent_encoder, prompt
        self.batch_size, self.mode, self.grad_accum = batch_size, mode, grad_accum
        self.rank, self.world_size = rank, world_size
        self.samples_per_request = max(1, samples_per_request)
        self.buffer = ReplayBuffer(max(buffer_size, batch_size * world_size), max_staleness)
        # Samples kept ready or in flight in async mode. Requests run in submission order behind the
        # syncs, so a batch requested at step s (policy version >= s - sync_every + 1) and used j steps
        # later is at most j + sync_every - 1 versions old: j <= max_staleness - sync_every + 1.
        ahead_steps = max(0, max_staleness - sync_every + 1)
        per_step = batch_size * grad_accum * world_size
        self.lookahead = min(self.buffer.capacity, per_step * ahead_steps)
        self.in_flight: list[SampleRequest] = []
        self._next_seed = seed * 1_000_000
        self._window: dict[str, list[float]] = {"ages": [], "wait": []}

    # ------------------------------------------------------------------ sampling

    def _seeds(self, n: int) -> list[int]:
        out = list(range(self._next_seed, self._next_seed + n))
        self._next_seed += n
        return out

    def _submit(self, n: int) -> None:
        self.in_flight.append(self.pool.submit([self.prompt] * n, self._seeds(n)))

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

    def rejected(self, n: int, version: int) -> list[Sample]:
        """`n` fresh on-policy samples for learner `version`; blocks until they exist."""
        t0 = time.perf_counter()
        got: list[Sample] = []
        if self.mode == "sync":
            self.buffer.add(_samples(self.pool.request([self.prompt] * n, self._seeds(n))))
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

    def rejected_for_rank(self, n: int, version: int) -> list[Sample]:
        """This rank's `n` samples: rank 0 requests n * world_size and scatters them (a collective:
        every rank calls it at the same micro-step, as the training loop does)."""
        if self.world_size == 1:
            return self.rejected(n, version)
        import torch.distributed as dist

        chunks = None
        if self.rank == 0:
            got = self.rejected(n * self.world_size, version)
            chunks = [got[r * n:(r + 1) * n] for r in range(self.world_size)]
        mine: list = [None]
        dist.scatter_object_list(mine, chunks, src=0)
        return mine[0]

    def __call__(self, items: Sequence[dict], micro_step: int) -> dict:
        version = micro_step // self.grad_accum
        batch = collate_pairs(items)
        images = batch.pop("images")
        rejected = self.rejected_for_rank(len(items), version)
        batch["chosen_latents"] = self.encode(images)
        batch["rejected_latents"] = torch.stack([s.latents for s in rejected]).to(batch["chosen_latents"])
        batch["rejected_seeds"] = [s.seed for s in rejected]
        batch["rejected_versions"] = [s.version for s in rejected]
        return batch

    # ------------------------------------------------------------------ metrics

    def pop_metrics(self) -> dict[str, float]:
        w, self._window = self._window, {"ages": [], "wait": []}
        out = {"buffer_size": float(len(self.buffer)), "stale_dropped": float(self.buffer.stale_dropped),
               "in_flight": float(self._in_flight_samples()), "wait_s": sum(w["wait"])}
        if w["ages"]:
            out["staleness_mean"] = sum(w["ages"]) / len(w["ages"])
            out["staleness_max"] = float(max(w["ages"]))
        return out

    def close(self) -> None:
        self.in_flight = []  # the pool's shutdown ends the calls still running


class OnlineSyncCallback(Callback):
    """Trainer callback: syncs the learner's policy to the pool every `sync_every` steps (version =
    trainer.step; the first sync, in on_start, before any step) and adds the online/* metrics."""

    def __init__(self, pool: SamplerPool, source: OnPolicyPairs | None = None,
                 sync_every: int = SamplerPoolConfig.sync_every) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.pool, self.source, self.sync_every = pool, source, sync_every
        self._last: dict[str, float] = {}

    def _sync(self, trainer: Trainer, wait: bool = False) -> dict[str, float]:
        return self.pool.sync_all(trainer.setup.trainable_modules, trainer.step, wait=wait)

    def on_start(self, trainer: Trainer) -> None:
        # After a resume restore (fit restores before on_start), so the samplers get those weights.
        self._sync(trainer, wait=True)

    def on_event(self, trainer: Trainer, event: dict) -> None:
        if event.get("kind") == "rollback":
            self._sync(trainer)  # weights went back: samplers follow at once

    def on_step(self, trainer: Trainer, metrics: dict) -> None:
        if trainer.step % self.sync_every == 0:
            self._sync(trainer)
        m = self.pool.pop_metrics()
        if self.source is not None:
            m.update(self.source.pop_metrics())
        m["sync_version"] = float(self.pool.version)
        # Keep every key present each step (async steps may see no request finish).
        for key in ("sampler_images_per_s", "sampler_roundtrip_s", "staleness_mean", "staleness_max",
                    "probe_max_abs_err"):
            if key in m:
                self._last[key] = m[key]
            elif key in self._last:
                m[key] = self._last[key]
        metrics.update({f"online/{k}": v for k, v in m.items()})

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        self.pool.collect_syncs(block=True)  # a sync still in flight is checked too


def folder_dataset(cfg: RunConfig) -> ImageFolderDataset:
    d = cfg.data
    if not d.path or not d.prompt:
        raise ValueError("online MaPO needs data.path (a folder of target images) and data.prompt")
    return ImageFolderDataset(d.path, d.prompt, resolution=cfg.model.resolution,
                              random_crop=not d.center_crop, random_flip=d.random_flip, seed=cfg.train.seed,
                              on_error=d.on_error)


class OnlineData:
    """The trainer's data for online training (a `Runtime.data` factory, pickled to Ray Train workers):
    the target images as the dataset, `OnPolicyPairs` as the batch source and, on rank 0, the sampler
    pool with its weight-sync callback; the pool shuts down when the trainer closes."""

    def __init__(self, num_samplers: int | None = None) -> None:
        self.num_samplers = num_samplers

    def __call__(self, cfg: RunConfig, setup, runtime) -> TrainingData:
        on, s = cfg.online, cfg.ray.sampler
        rank, world_size = runtime.rank, runtime.world_size
        dataset = folder_dataset(cfg)
        pool = SamplerPool(cfg, self.num_samplers) if rank == 0 else None
        try:
            source = OnPolicyPairs(pool, setup.latent_encoder, dataset.prompt, cfg.optim.batch_size, on.mode,
                                   on.max_staleness, s.sync_every, cfg.optim.grad_accum, on.buffer_size,
                                   on.samples_per_request, cfg.train.seed, rank=rank, world_size=world_size)
        except Exception:
            if pool is not None:
                pool.shutdown()
            raise
        callbacks = [OnlineSyncCallback(pool, source, s.sync_every)] if pool is not None else []

        def close() -> None:
            buf = source.buffer
            source.close()
            if pool is not None:
                log.info("online %s: %d samples trained on, %d stale dropped, %d sampler restarts",
                         cfg.objective.name, buf.taken, buf.stale_dropped, pool.restarts)
                pool.shutdown()

        return TrainingData(dataset, None, source, callbacks, close)
