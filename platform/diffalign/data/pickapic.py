"""Pick-a-Pic v2 style preference pairs, streamed from parquet or from an HF dataset saved on disk.

Columns: ``caption`` (str), ``jpg_0`` / ``jpg_1`` (encoded images), ``label_0`` in {0, 0.5, 1} where 1
means image 0 is preferred. Ties are dropped and counted; bad rows are reported, counted and skipped
(or raised with ``on_error="raise"``).

``PairStream`` is the shared streaming machinery (sharding, per-item RNG, bad-row accounting,
materialization) that the JSONL/CSV reader in ``files.py`` reuses.
"""

from __future__ import annotations

import glob as globlib
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
    MISSING_COLUMN,
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


class PairStream(IterableDataset):
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

    def set_epoch(self, epoch: int) -> None:
        """Changes random crops / flips / shuffling per epoch, reproducibly."""
        self.epoch = epoch

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
            items = _shuffled(items, self.shuffle_buffer, item_rng(self.seed, self.epoch, -1 - start))
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
            item = self.transform(chosen, rejected, item_rng(self.seed, self.epoch, raw.index))
            yield {"prompt": record.prompt, **item}

    def _check(self, raw: RawPair, issues: DataIssues) -> tuple[PairRecord, Any, Any] | None:
        """Validate one row; on a problem count it (or raise) and return None."""
        try:
            return self._validate(raw)
        except _RowProblem as p:
            message = describe(raw.source, raw.location, p.column, p.detail)
            if self.on_error == "raise" and p.kind not in BENIGN_KINDS:
                raise DataError(
                    message, kind=p.kind, source=raw.source, row=raw.row, column=p.column
                ) from p.__cause__
            issues.add(p.kind, message)
            return None

    def _validate(self, raw: RawPair) -> tuple[PairRecord, Any, Any]:
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


class MaterializedPairs(Dataset):
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item(i, self.epoch)

    def item(self, i: int, epoch: int) -> dict[str, Any]:
        """Pair i with the crop / flip of `epoch` (no state changed: safe from reader threads)."""
        r = self.records[i]
        item = self.transform(
            decode_image(r.chosen), decode_image(r.rejected), item_rng(self.seed, epoch, r.index)
        )
        return {"prompt": r.prompt, **item}


# -- Pick-a-Pic -------------------------------------------------------------------------------------


def _is_hf_saved_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in ("state.json", "dataset_dict.json", "dataset_info.json")
    )


def _expand_parquet(source: str | Path | Sequence[str | Path]) -> list[Path]:
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise FileNotFoundError(f"no *.parquet files in directory {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            found = sorted(Path(f) for f in globlib.glob(str(s)))
            if not found:
                raise FileNotFoundError(f"no parquet file matches {s}")
            files.extend(found)
    return files


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "reading a dataset saved with save_to_disk needs the `datasets` package "
            "(pip install datasets, or the project's [ray] extra)"
        ) from e
    return datasets


class PickAPicPairs(PairStream):
    """Pick-a-Pic v2 pairs from parquet (file, directory, glob or list) or an HF dataset on disk.

    ``format``: "auto" (HF if ``source`` is a ``save_to_disk`` directory or a ``datasets.Dataset``),
    "parquet" or "hf". ``split`` picks the split of a saved ``DatasetDict``. Rows are read
    ``batch_rows`` at a time (parquet: within one row group) so memory stays bounded.
    A required column missing from any file raises :class:`DataError` here, in either ``on_error`` mode.
    Other keyword arguments go to :class:`PairStream`.
    """

    def __init__(
        self,
        source: Any,
        *,
        format: str = "auto",
        split: str | None = "train",
        caption_column: str = "caption",
        image_columns: tuple[str, str] = ("jpg_0", "jpg_1"),
        label_column: str = "label_0",
        batch_rows: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if format not in ("auto", "parquet", "hf"):
            raise ValueError(f"format must be 'auto', 'parquet' or 'hf', got {format!r}")
        self.caption_column = caption_column
        self.image_columns = tuple(image_columns)
        self.label_column = label_column
        self.columns = [caption_column, *self.image_columns, label_column]
        self.batch_rows = max(1, int(batch_rows))
        is_hf_object = hasattr(source, "with_format") and hasattr(source, "column_names")
        if format == "auto":
            is_path = isinstance(source, (str, Path))
            format = "hf" if is_hf_object or (is_path and _is_hf_saved_dir(Path(source))) else "parquet"
        self.format = format
        if format == "hf":
            self._open_hf(source, split)
        else:
            self._open_parquet(source)

    # parquet ---------------------------------------------------------------------------------------
    def _open_parquet(self, source: Any) -> None:
        import pyarrow.parquet as pq

        self.files = _expand_parquet(source)
        # Per file: row counts of its row groups (footer only, no data read).
        self._row_groups: list[list[int]] = []
        for path in self.files:
            pf = pq.ParquetFile(path)
            self._check_columns(pf.schema_arrow.names, str(path))
            meta = pf.metadata
            self._row_groups.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self._total = sum(sum(groups) for groups in self._row_groups)

    def _check_columns(self, names: Sequence[str], source: str) -> None:
        for column in self.columns:
            if column not in names:
                raise DataError(
                    describe(source, None, column, f"missing required column (columns: {list(names)})"),
                    kind=MISSING_COLUMN,
                    source=source,
                    column=column,
                )

    def _iter_parquet(self, start: int, stop: int) -> Iterator[RawPair]:
        import pyarrow.parquet as pq

        offset = 0
        for path, groups in zip(self.files, self._row_groups):
            file_rows = sum(groups)
            if offset + file_rows <= start:
                offset += file_rows
                continue
            if offset >= stop:
                return
            pf = pq.ParquetFile(path)
            file_start = offset
            for rg, n in enumerate(groups):
                lo, hi = offset, offset + n
                offset = hi
                if hi <= start or lo >= stop:
                    continue
                batch_lo = lo
                for batch in pf.iter_batches(
                    batch_size=self.batch_rows, row_groups=[rg], columns=self.columns
                ):
                    batch_hi = batch_lo + batch.num_rows
                    a, b = max(batch_lo, start), min(batch_hi, stop)
                    if a < b:
                        yield from self._rows(batch.slice(a - batch_lo, b - a), str(path), a, a - file_start)
                    batch_lo = batch_hi
                    if batch_lo >= stop:
                        break
            offset = file_start + file_rows

    # HF datasets --------------------------------------------------------------------------------
    def _open_hf(self, source: Any, split: str | None) -> None:
        if hasattr(source, "with_format") and hasattr(source, "column_names"):
            dataset, name = source, f"<{type(source).__name__}>"
        else:
            datasets = _import_datasets()
            name = str(source)
            dataset = datasets.load_from_disk(name)
        if not hasattr(dataset, "with_format") or isinstance(dataset, dict):
            splits = list(dataset.keys())
            if split is None and len(splits) == 1:
                split = splits[0]
            if split not in dataset:
                raise ValueError(f"{name}: split {split!r} not found (splits: {splits})")
            dataset, name = dataset[split], f"{name}[{split}]"
        self._check_columns(dataset.column_names, name)
        self.hf_dataset = dataset
        self.hf_name = name
        self._total = len(dataset)

    def _iter_hf(self, start: int, stop: int) -> Iterator[RawPair]:
        # The arrow format gives memory-mapped tables (respecting any select/shuffle indices)
        # without decoding image features.
        table_view = self.hf_dataset.with_format("arrow")
        for a in range(start, stop, self.batch_rows):
            b = min(a + self.batch_rows, stop)
            table = table_view[a:b].select(self.columns)
            yield from self._rows(table, self.hf_name, a, a)

    # shared ------------------------------------------------------------------------------------------
    def _rows(self, table: Any, source: str, index0: int, row0: int) -> Iterator[RawPair]:
        cols = [table.column(c).to_pylist() for c in self.columns]
        for k, (prompt, first, second, label) in enumerate(zip(*cols)):
            yield RawPair(
                source=source,
                location=f"row {row0 + k}",
                row=row0 + k,
                index=index0 + k,
                prompt=prompt,
                first=first,
                second=second,
                label=label,
                prompt_column=self.caption_column,
                first_column=self.image_columns[0],
                second_column=self.image_columns[1],
                label_column=self.label_column,
            )

    def _source_rows(self) -> int:
        return self._total

    def _iter_raw(self, start: int, stop: int) -> Iterator[RawPair]:
        if self.format == "hf":
            return self._iter_hf(start, stop)
        return self._iter_parquet(start, stop)
