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
