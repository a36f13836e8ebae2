"""Raw pair files read lazily: a map-style view whose memory is one or two read blocks, whatever the
dataset's size.

`LazyPairs` wraps a `PairStream` reader (parquet, HF on disk, JSONL / CSV) and reads rows when the
trainer asks for them, a read block (a parquet row group, or a chunk) at a time; nothing is decoded
or checked up front. Its `read_blocks` make the trainer use `diffalign.train.data_order.BlockOrder`,
which gives each rank its own run of blocks, so a rank reads only the rows it trains on.

A row is validated when first read (the decode the transform needs anyway) and counted in `.issues`
as the up-front check did. A bad row is replaced by the next good row of its block (then the next
blocks): a function of the data alone, so a resumed run reads what an uninterrupted one did. With
`on_error: raise` the first bad row raises, naming its file and row.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from diffalign.data.issues import UNREADABLE_BLOCK, DataError, DataIssues
from diffalign.data.stream import EpochItems, PairStream


class LazyPairs(EpochItems):
    """Source rows [start, stop) of `stream`, read on demand (see the module doc). `seed` seeds each
    item's crop / flip with (seed, epoch, source row), as the in-memory path does."""

    def __init__(self, stream: PairStream, start: int = 0, stop: int | None = None, *,
                 seed: int | None = None, block_rows: int = 256, cache_blocks: int = 2) -> None:
        self.stream = stream
        total = stream.num_rows
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"rows [{start}, {stop}) outside the source's {total} rows")
        self.transform = stream.transform
        self.seed = stream.seed if seed is None else seed
        self.epoch = 0
        self.issues = DataIssues(stream.max_examples)
        if self.start == 0:  # what the reader left out at open (a bad shard), counted once
            self.issues.merge(stream.issues)
        self.source = getattr(stream, "path", None) or getattr(stream, "files", None) or type(stream).__name__
        # Block bounds over [start, stop), from the reader's natural units (row groups).
        sizes = stream.read_blocks() if hasattr(stream, "read_blocks") else [total]
        # Pieces of at most block_rows rows: what a block holds in memory is bounded in rows.
        sizes = [min(block_rows, n - k) for n in sizes for k in range(0, n, block_rows)]
        edges = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        cuts = np.unique(np.clip(edges, self.start, self.stop))
        self._edges = cuts - self.start  # local block edges, from 0 to len(self)
        self.cache_blocks = max(1, cache_blocks)
        self._blocks: OrderedDict[int, list] = OrderedDict()
        # One bit per row (not a set): which rows were checked, which were bad; a reloaded block is
        # not decoded or counted again.
        self._checked = np.zeros(len(self), dtype=bool)
        self._bad = np.zeros(len(self), dtype=bool)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.stop - self.start

    holds_pixels = True  # items are decoded pixel pairs (the driver asks without reading a block)

    @property
    def read_blocks(self) -> list[int]:
        """Sizes of the read blocks of this view, in row order (the BlockOrder's units)."""
        return np.diff(self._edges).tolist()

    def _block_of(self, i: int) -> int:
        return int(np.searchsorted(self._edges, i, side="right") - 1)

    def _block(self, b: int) -> list:
        """Block b's rows as (index, checked) pairs, validated once (checked is None for a bad row)."""
        with self._lock:
            rows = self._blocks.get(b)
            if rows is not None:
                self._blocks.move_to_end(b)
                return rows
            lo, hi = self.start + int(self._edges[b]), self.start + int(self._edges[b + 1])
            try:
                rows, fresh, bad, found = self._read_block(lo, hi)
            except DataError:
                raise
            except Exception as e:  # a corrupt page or row group: name where, count (or raise) its rows
                where = self._where(lo, hi)
                message = f"{where} cannot be read: {type(e).__name__}: {e}"
                if self.stream.on_error == "raise":
                    raise DataError(message, kind=UNREADABLE_BLOCK, source=where) from e
                self.issues.add(UNREADABLE_BLOCK, message)
                span = slice(lo - self.start, hi - self.start)
                self.issues.rows_seen += int((~self._checked[span]).sum())
                self._checked[span], self._bad[span] = True, True
                rows = [(index, None) for index in range(lo, hi)]
            else:  # counted once the whole block was read, so a failed read counts nothing twice
                self.issues.merge(found)
                self._checked[fresh] = True
                self._bad[bad] = True
            self._blocks[b] = rows
            while len(self._blocks) > self.cache_blocks:
                self._blocks.popitem(last=False)
            return rows

    def _where(self, lo: int, hi: int) -> str:
        """The file (and its rows) holding source rows [lo, hi), for messages."""
        files, groups = getattr(self.stream, "files", None), getattr(self.stream, "_row_groups", None)
        if files and groups:
            offset = 0
            for path, sizes in zip(files, groups):
                if offset <= lo < offset + sum(sizes):
                    return f"{path} rows [{lo - offset}, {hi - offset})"
                offset += sum(sizes)
        return f"{self.source} rows [{lo}, {hi})"

    def _read_block(self, lo: int, hi: int) -> tuple[list, list[int], list[int], DataIssues]:
        """(rows, local rows checked for the first time, local rows found bad, their account)."""
        rows, fresh, bad = [], [], []
        found = DataIssues(self.issues.max_examples)
        for raw in self.stream._iter_raw(lo, hi):
            local = raw.index - self.start
            if self._bad[local]:
                rows.append((raw.index, None))
                continue
            first = not self._checked[local]
            checked = self.stream._check(raw, found, decode=first)
            if first:
                fresh.append(local)
                found.rows_seen += 1
                found.items_yielded += checked is not None
            if checked is None:
                bad.append(local)
                rows.append((raw.index, None))
            else:  # the encoded images, not the decoded ones: a block of JPEG bytes is small
                rows.append((raw.index, checked[0]))
        return rows, fresh, bad, found

    def _record(self, i: int):
        """The record of local row i, or of its replacement when row i is bad."""
        b = self._block_of(i)
        rows = self._block(b)
        j = i - int(self._edges[b])
        for k in range(len(rows)):
            record = rows[(j + k) % len(rows)][1]
            if record is not None:
                return record
        n_blocks = len(self._edges) - 1
        for step in range(1, n_blocks):
            rows = self._block((b + step) % n_blocks)
            record = next((r for _, r in rows if r is not None), None)
            if record is not None:
                return record
        raise DataError(f"no usable pairs in {self.source} rows [{self.start}, {self.stop}): "
                        f"{self.issues.report()}")

    def item(self, i: int, epoch: int) -> dict[str, Any]:
        """Row i (or its replacement) with the crop / flip of `epoch`; safe from reader threads."""
        from diffalign.data.transforms import decode_image

        record = self._record(i)
        rng = self._rng(epoch, record.index)
        return {"prompt": record.prompt,
                **self.transform(decode_image(record.chosen), decode_image(record.rejected), rng)}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_blocks"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
