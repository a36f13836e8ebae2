"""Reads the next micro-batches' items in background threads while the current step computes.

What a micro-batch holds is a function of its number alone: the batch order gives (epoch, index)
pairs and each item's random crop / flip comes from (seed, epoch, index) (`read_items`). Reading
ahead therefore changes no result, and a resumed or rolled-back run reads the same items. Threads,
not processes: PIL's decode and resize and the tensor conversion release the GIL, and the encoded
rows are shared without pickling. With cached latents there is nothing to decode and no thread runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor


def read_items(dataset, positions: Sequence[tuple[int, int]]) -> list[dict]:
    """Items at (epoch, index) positions; datasets with per-epoch augmentation expose `item(i, epoch)`."""
    item = getattr(dataset, "item", None)
    if item is None:
        return [dataset[i] for _, i in positions]
    return [item(i, epoch) for epoch, i in positions]


class ReadAhead:
    """`get(k)` returns micro-batch k's items and starts reading k+1 .. k+depth in the background.

    `positions(k)` runs in the calling thread (the batch order caches its permutation and is not
    shared); `read(positions)` runs in `workers` threads. `workers=0` reads in the calling thread.
    """

    def __init__(self, positions: Callable[[int], list], read: Callable[[list], list], workers: int = 0,
                 depth: int = 2) -> None:
        if workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {workers}")
        self.positions, self.read, self.depth = positions, read, depth
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="diffalign-read") if workers else None
        self.pending: dict[int, Future] = {}

    def get(self, k: int) -> list:
        if self.pool is None:
            return self.read(self.positions(k))
        fut = self.pending.pop(k, None)
        for stale in [j for j in self.pending if not k < j <= k + self.depth]:
            self.pending.pop(stale).cancel()  # after a restore or rollback the step moved
        for j in range(k + 1, k + 1 + self.depth):
            if j not in self.pending:
                self.pending[j] = self.pool.submit(self.read, self.positions(j))
        return fut.result() if fut is not None else self.read(self.positions(k))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pending.clear()
