"""Pick-a-Pic v2 style preference pairs, streamed from parquet or from an HF dataset saved on disk.

Columns: ``caption`` (str), ``jpg_0`` / ``jpg_1`` (encoded images), ``label_0`` in {0, 0.5, 1} where 1
means image 0 is preferred. Ties are dropped and counted; bad rows are reported, counted and skipped
(or raised with ``on_error="raise"``). Sharding, validation and materialization are :class:`PairStream`'s.
"""

from __future__ import annotations

import glob as globlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from diffalign.data.issues import MISSING_COLUMN, DataError, describe
from diffalign.data.stream import PairStream, RawPair


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
