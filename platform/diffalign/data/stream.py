"""Format-independent streaming of preference pairs: sharding, per-item RNG, validation, bad-row
accounting and materialization into a map-style dataset.

A reader (``pickapic.py``: parquet / HF on disk; ``files.py``: JSONL / CSV listings) subclasses
:class:`PairStream` and only says how many rows it has and how to read a range of them as
:class:`RawPair`. Every reader's randomness goes through :class:`EpochSeeded`, so an item's crop / flip
depends on (seed, epoch, row index) alone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from diffalign.data.issues import (
    BENIGN_KINDS,
    EMPTY_CAPTION,
    LABEL_OUT_OF_RANGE,
    MISSING_FILE,
    MISSING_VALUE,
    TIES_DROPPED,
    UNREADABLE_IMAGE,
    DataError,
    DataIssues,
    check_on_error,
    describe,
)
from diffalign.data.transforms import PairTransform, decode_image, item_rng


class EpochSeeded:
    """``seed`` + ``epoch`` of a reader; ``_rng(epoch, index)`` is the RNG of one item's transform."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Changes random crops / flips (and stream shuffling) per epoch, reproducibly."""
        self.epoch = epoch

    def _rng(self, epoch: int, index: int) -> random.Random:
        return item_rng(self.seed, epoch, index)


class EpochItems(EpochSeeded, Dataset):
    """Map-style dataset whose item i depends only on (seed, epoch, ``_item_index(i)``).

    Subclasses implement ``__len__`` and ``_make_item``.
    """

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item(i, self.epoch)

    def item(self, i: int, epoch: int) -> dict[str, Any]:
        """Item i with the crop / flip of `epoch` (no state changed: safe from reader threads)."""
        return self._make_item(i, self._rng(epoch, self._item_index(i)))

    def _item_index(self, i: int) -> int:
        """The index that seeds item i's randomness (a source row index survives subsetting)."""
        return i

    def _make_item(self, i: int, rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class RawPair:
    """One source row before validation. ``label`` is label_0 (1: first preferred); None = already ordered."""

    source: str
    location: str  # "row 12" / "line 13", for messages
    row: int  # row within ``source``
    index: int  # global row index: drives sharding and the per-item RNG
    prompt: Any
    first: Any
    second: Any
    label: Any = None
    prompt_column: str = "caption"
    first_column: str = "jpg_0"
    second_column: str = "jpg_1"
    label_column: str | None = "label_0"
    problem: tuple[str, str | None, str] | None = None  # (kind, column, detail) found while reading


@dataclass
class PairRecord:
    """A validated row: still-encoded images (bytes / paths) so it is cheap to keep many in memory."""

    prompt: str
    chosen: Any
    rejected: Any
    index: int
    source: str
    location: str


class _RowProblem(Exception):
    def __init__(self, kind: str, column: str | None, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.column, self.detail = kind, column, detail


def shard_bounds(num_rows: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Contiguous, balanced [start, stop) of shard ``shard``; shards partition ``range(num_rows)``."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    return num_rows * shard // num_shards, num_rows * (shard + 1) // num_shards


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class PairStream(EpochSeeded, IterableDataset):
    """Base streaming reader of preference pairs.

    Sharding: rows are split into contiguous balanced blocks over ``world_size * num_workers`` shards
    (``rank`` from the constructor, the DataLoader worker from ``get_worker_info()``), so every row is
    read by exactly one worker of one rank. ``max_samples`` caps the source rows considered (before
    sharding and before dropping ties/bad rows), so every rank agrees on the same subset.

    ``.issues`` is reset at the start of each pass and summarized in the log at its end. With DataLoader
    workers each worker process keeps (and logs) its own account; the parent's ``.issues`` is not updated.
    """

    def __init__(
        self,
        *,
        resolution: int = 512,
        random_crop: bool = False,
        random_flip: bool = False,
        transform: PairTransform | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_samples: int | None = None,
        shuffle_buffer: int = 0,
        on_error: str = "skip",
        max_examples: int = 5,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if max_samples is not None and max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {max_samples}")
        self.transform = transform or PairTransform(resolution, random_crop, random_flip)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_samples = max_samples
        self.shuffle_buffer = shuffle_buffer
        self.on_error = check_on_error(on_error)
        self.max_examples = max_examples
        self.epoch = 0
        self.issues = DataIssues(max_examples)

    # -- to implement in subclasses -------------------------------------------------------------
    def _source_rows(self) -> int:
        raise NotImplementedError

    def _iter_raw(self, start: int, stop: int) -> Iterator[RawPair]:
        raise NotImplementedError

    def _resolve(self, raw: RawPair, column: str, value: Any) -> Any:
        """Turn a stored image value into something ``decode_image`` takes (files.py resolves paths)."""
        return value

    # -- shared machinery -------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """Source rows considered (after ``max_samples``), before sharding and dropping."""
        n = self._source_rows()
        return n if self.max_samples is None else min(n, self.max_samples)

    def shard_range(self) -> tuple[int, int]:
        """Rows [start, stop) that this rank (and DataLoader worker, if any) reads."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return shard_bounds(self.num_rows, self.rank * num_workers + worker, self.world_size * num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, stop = self.shard_range()
        issues = self.issues = DataIssues(self.max_examples)
        items = self._items(start, stop, issues)
        if self.shuffle_buffer > 1:
            items = _shuffled(items, self.shuffle_buffer, self._rng(self.epoch, -1 - start))
        for item in items:
            issues.items_yielded += 1
            yield item
        issues.log_summary(prefix=f"{type(self).__name__} epoch {self.epoch} rows [{start}, {stop}): ")

    def _items(self, start: int, stop: int, issues: DataIssues) -> Iterator[dict[str, Any]]:
        for raw in self._iter_raw(start, stop):
            issues.rows_seen += 1
            checked = self._check(raw, issues)
            if checked is None:
                continue
            record, chosen, rejected = checked
            item = self.transform(chosen, rejected, self._rng(self.epoch, raw.index))
            yield {"prompt": record.prompt, **item}

    def _check(self, raw: RawPair, issues: DataIssues,
               decode: bool = True) -> tuple[PairRecord, Any, Any] | None:
        """Validate one row; on a problem count it (or raise) and return None. `decode=False` trusts
        images already checked once (the images returned are then None)."""
        try:
            return self._validate(raw, decode)
        except _RowProblem as p:
            message = describe(raw.source, raw.location, p.column, p.detail)
            if self.on_error == "raise" and p.kind not in BENIGN_KINDS:
                raise DataError(
                    message, kind=p.kind, source=raw.source, row=raw.row, column=p.column
                ) from p.__cause__
            issues.add(p.kind, message)
            return None

    def _validate(self, raw: RawPair, decode: bool = True) -> tuple[PairRecord, Any, Any]:
        if raw.problem is not None:
            raise _RowProblem(*raw.problem)
        first_preferred = True
        if raw.label_column is not None:
            label = raw.label
            if _is_missing(label):
                raise _RowProblem(MISSING_VALUE, raw.label_column, "missing label")
            try:
                label = float(label)
            except (TypeError, ValueError) as e:
                raise _RowProblem(
                    LABEL_OUT_OF_RANGE, raw.label_column, f"label {label!r} is not a number"
                ) from e
            if label == 0.5:
                raise _RowProblem(TIES_DROPPED, raw.label_column, "tie (label 0.5)")
            if label not in (0.0, 1.0):
                raise _RowProblem(
                    LABEL_OUT_OF_RANGE, raw.label_column, f"label {label!r} not in {{0, 0.5, 1}}"
                )
            first_preferred = label == 1.0
        if _is_missing(raw.prompt):
            raise _RowProblem(MISSING_VALUE, raw.prompt_column, "missing caption")
        if not isinstance(raw.prompt, str):
            raise _RowProblem(MISSING_VALUE, raw.prompt_column, f"caption is {type(raw.prompt).__name__}")
        prompt = raw.prompt.strip()
        if not prompt:
            raise _RowProblem(EMPTY_CAPTION, raw.prompt_column, "empty caption")
        values, images = [], []
        for column, value in ((raw.first_column, raw.first), (raw.second_column, raw.second)):
            if _is_missing(value):
                raise _RowProblem(MISSING_VALUE, column, "missing image")
            value = self._resolve(raw, column, value)
            if not decode:
                values.append(value)
                images.append(None)
                continue
            if isinstance(value, Path) and not value.is_file():
                raise _RowProblem(MISSING_FILE, column, f"file not found: {value}")
            try:
                images.append(decode_image(value))
            except Exception as e:  # PIL raises many types on corrupt data; all mean "unreadable"
                where = f" ({value})" if isinstance(value, Path) else ""
                raise _RowProblem(
                    UNREADABLE_IMAGE, column, f"unreadable image{where}: {type(e).__name__}: {e}"
                ) from e
            values.append(value)
        if not first_preferred:
            values.reverse()
            images.reverse()
        record = PairRecord(prompt, values[0], values[1], raw.index, raw.source, raw.location)
        return record, images[0], images[1]

    def materialize(self) -> MaterializedPairs:
        """Read this rank's rows once into a map-style dataset (for small sets / shuffling samplers).

        Images are validated now and kept encoded; the transform (with its randomness) still runs
        per ``__getitem__``. Ignores DataLoader workers: call it in the main process.
        """
        start, stop = shard_bounds(self.num_rows, self.rank, self.world_size)
        issues = self.issues = DataIssues(self.max_examples)
        records = []
        for raw in self._iter_raw(start, stop):
            issues.rows_seen += 1
            checked = self._check(raw, issues)
            if checked is not None:
                records.append(checked[0])
        issues.items_yielded = len(records)
        issues.log_summary(prefix=f"{type(self).__name__} materialized rows [{start}, {stop}): ")
        return MaterializedPairs(records, self.transform, seed=self.seed, issues=issues)


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Bounded shuffle buffer (as in webdataset): memory stays at ``size`` items."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class MaterializedPairs(EpochItems):
    """Map-style pairs from :meth:`PairStream.materialize`; decodes and transforms per item."""

    def __init__(
        self,
        records: Sequence[PairRecord],
        transform: PairTransform,
        *,
        seed: int = 0,
        issues: DataIssues | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.issues = issues or DataIssues()

    def __len__(self) -> int:
        return len(self.records)

    def _item_index(self, i: int) -> int:
        return self.records[i].index

    def _make_item(self, i: int, rng: random.Random) -> dict[str, Any]:
        r = self.records[i]
        return {"prompt": r.prompt, **self.transform(decode_image(r.chosen), decode_image(r.rejected), rng)}
