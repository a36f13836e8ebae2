"""Deterministic batch order from (seed, position): resuming at step k reads exactly the batches an
uninterrupted run would, and each distributed rank reads its own disjoint slice."""

from __future__ import annotations

import torch


class BatchOrder:
    def __init__(
        self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_items < 1:
            raise ValueError("the training dataset is empty")
        self.n, self.bsz, self.seed = num_items, batch_size, seed
        self.rank, self.world = rank, world_size
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 7_777 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def positions(self, micro_step: int) -> list[tuple[int, int]]:
        """(epoch, item index) of each item of this rank's micro-batch `micro_step` (0-based, global
        count); the epoch picks the item's random crop / flip."""
        global_bsz = self.bsz * self.world
        start = micro_step * global_bsz + self.rank * self.bsz
        out = []
        for pos in range(start, start + self.bsz):
            epoch, i = divmod(pos, self.n)
            out.append((epoch, int(self._perm_for(epoch)[i])))
        return out

    def indices(self, micro_step: int) -> list[int]:
        """Item indices of this rank's micro-batch `micro_step`."""
        return [i for _, i in self.positions(micro_step)]


class BlockOrder:
    """Batch order for sources read a block at a time (raw parquet / JSONL read lazily,
    `diffalign.data.lazy.LazyPairs`): shuffled blocks, each rank its own run of them.

    Epoch e: the blocks are permuted (seeded by (seed, e)); every `window` consecutive blocks of that
    permutation form a group whose rows are shuffled together. The epoch's row sequence is split into
    `world_size` contiguous parts, part r is rank r's, so a rank touches only its own blocks (plus at
    most one shared at each end of its part) and each row is read by one rank once per epoch. A rank's
    micro-batch k holds positions [k * batch_size, (k + 1) * batch_size) of its own part, continued into
    the next epoch's part at the end. A function of (seed, epoch, step, rank) alone: resume is exact.
    Memory: the block permutation and one group's rows, not one entry per row of the dataset.
    """

    def __init__(self, blocks: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 window: int = 4) -> None:
        import numpy as np

        self.sizes = np.asarray(blocks, dtype=np.int64)
        self.n = int(self.sizes.sum())
        if self.n < max(1, world_size):
            raise ValueError(f"the training dataset has {self.n} rows, fewer than the {world_size} ranks")
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.bsz, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.window = max(1, window)
        self.lo = self.n * rank // world_size
        self.part = self.n * (rank + 1) // world_size - self.lo
        self._epochs: dict[int, tuple] = {}
        self._groups: dict[tuple[int, int], torch.Tensor] = {}

    def _epoch(self, epoch: int) -> tuple:
        import numpy as np

        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 7_777 + epoch)
            perm = torch.randperm(len(self.sizes), generator=g).numpy()
            groups = [perm[i:i + self.window] for i in range(0, len(perm), self.window)]
            offsets = np.concatenate([[0], np.cumsum([self.sizes[b].sum() for b in groups])]).astype(np.int64)
            self._epochs = {epoch: (groups, offsets)}  # one epoch at a time (two at a boundary)
        return self._epochs[epoch]

    def _group_rows(self, epoch: int, gi: int, groups) -> torch.Tensor:
        key = (epoch, gi)
        if key not in self._groups:
            rows = torch.cat([torch.arange(int(self.starts[b]), int(self.starts[b] + self.sizes[b]))
                              for b in groups[gi]])
            g = torch.Generator().manual_seed((self.seed * 7_777 + epoch) * 100_003 + gi)
            if len(self._groups) >= 4:
                self._groups.pop(next(iter(self._groups)))
            self._groups[key] = rows[torch.randperm(len(rows), generator=g)]
        return self._groups[key]

    def row(self, epoch: int, q: int) -> int:
        """Item index at position q of epoch `epoch`'s row sequence (all ranks)."""
        import numpy as np

        groups, offsets = self._epoch(epoch)
        gi = int(np.searchsorted(offsets, q, side="right") - 1)
        return int(self._group_rows(epoch, gi, groups)[q - int(offsets[gi])])

    def positions(self, micro_step: int) -> list[tuple[int, int]]:
        out = []
        for p in range(micro_step * self.bsz, (micro_step + 1) * self.bsz):
            epoch, off = divmod(p, self.part)
            out.append((epoch, self.row(epoch, self.lo + off)))
        return out

    def indices(self, micro_step: int) -> list[int]:
        return [i for _, i in self.positions(micro_step)]


def batch_order(dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                window: int = 4) -> BatchOrder | BlockOrder:
    """The order a dataset is read in: by blocks when it is read a block at a time (`read_blocks`),
    else one permutation of every item (random access is cheap: in memory, or a pair store)."""
    blocks = getattr(dataset, "read_blocks", None)
    if blocks is not None:
        return BlockOrder(list(blocks), batch_size, seed, rank, world_size, window)
    return BatchOrder(len(dataset), batch_size, seed, rank, world_size)
