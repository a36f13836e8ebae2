"""Pick-a-Pic v2 style preference pairs, streamed from parquet or from an HF dataset saved on disk.

Columns: ``caption`` (str), ``jpg_0`` / ``jpg_1`` (encoded images: bytes, or HF ``Image`` structs
``{bytes, path}``), ``label_0`` in {0, 0.5, 1} where 1 means image 0 is preferred. Ties are dropped and
counted; bad rows are reported, counted and skipped (or raised with ``on_error="raise"``). Sharding,
validation and materialization are :class:`PairStream`'s.

Parquet sources are local paths or storage URIs (``s3://``, ``gs://``, ``file://``), read through
:mod:`diffalign.data.uri` (pyarrow filesystems); a folder is searched recursively and, in a Hub snapshot
layout (``data/<split>-00000-of-00002.parquet``), only the files of the requested split are read.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffalign.data import uri
from diffalign.data.issues import MISSING_COLUMN, UNREADABLE_FILE, DataError, describe
from diffalign.data.stream import PairStream, RawPair

log = logging.getLogger(__name__)

_HF_MARKERS = ("state.json", "dataset_dict.json", "dataset_info.json")
# The Hub's shard names: `<split>-00000-of-00002.parquet`, any split name (Pick-a-Pic v2 has
# `validation_unique`).
_HUB_SHARD = re.compile(r"(?P<split>\w+(?:\.\w+)*)-\d+-of-\d+\.parquet")
# Names that are taken as splits in `<split>-*.parquet`, `<split>.parquet` or a `<split>/` folder
# (with the requested split and the Hub-pattern ones), as the Hub's data-file patterns do.
_SPLIT_WORDS = frozenset(
    {"train", "training", "validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation"}
)

ParquetPath = Path | str  # a local Path, or a URI string


def _is_hf_saved_dir(path: str | Path) -> bool:
    if uri.is_uri(path):
        return uri.is_dir(path) and any(uri.is_file(uri.join(path, name)) for name in _HF_MARKERS)
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in _HF_MARKERS)


def _is_parquet(path: str) -> bool:
    return uri.strip_query(path).lower().endswith(".parquet")


def _relative(path: str, root: str) -> str:
    """`path` below `root`, "/"-separated (queries stripped), for reading split names off folders."""
    path, root = uri.strip_query(path), uri.strip_query(root).rstrip("/")
    return path[len(root) + 1 :] if path.startswith(root + "/") else posixpath.basename(path)


def _split_of(relative: str, words: set[str]) -> str | None:
    """The split a file belongs to by its name (`train-00000-of-00002.parquet`, `train-x.parquet`,
    `train.parquet`) or, failing that, its nearest folder named like a split (`train/0000.parquet`)."""
    parts = relative.split("/")
    name = parts[-1]
    match = _HUB_SHARD.fullmatch(name)
    if match:
        return match["split"]
    stem = name[: -len(".parquet")] if name.lower().endswith(".parquet") else name
    word = stem.split("-", 1)[0]
    if word in words:
        return word
    return next((folder for folder in reversed(parts[:-1]) if folder in words), None)


def _select_split(
    files: list[Any], relative: list[str], split: str | None, what: str, named: bool = False
) -> list[Any]:
    """The files of `split` among `files` (`relative`: their paths below the folder searched), or
    all of them if none names a split.

    Files that name no split are read whatever the split (a folder of `train-0.parquet` and
    `extra.parquet` reads both, as before splits were recognized). `named`: the files are what a glob
    named, so they are all read when they hold one split only, whichever it is.
    """
    words = set(_SPLIT_WORDS) | {
        m["split"] for r in relative if (m := _HUB_SHARD.fullmatch(posixpath.basename(r)))
    }
    if split is not None:
        words.add(split)
    splits = [_split_of(r, words) for r in relative]
    found = sorted({s for s in splits if s is not None})
    if not found or (named and len(found) == 1):
        return files
    if split is None:
        if len(found) > 1:
            raise ValueError(f"{what} holds several splits {found}: choose one with split= (data.split)")
        split = found[0]
    if split not in found:
        raise FileNotFoundError(f"{what}: no parquet files of split {split!r} (splits found: {found})")
    shared = sum(s is None for s in splits)
    if shared:
        log.info("%s: %d parquet files name no split and are read with split %r", what, shared, split)
    return [f for f, s in zip(files, splits) if s == split or s is None]


def _visible(relative: str) -> bool:
    # Hidden folders (a Hub snapshot's `.cache/huggingface/`) hold download state, not data.
    return not any(part.startswith(".") for part in relative.split("/"))


def _glob_root(pattern: str) -> str:
    """The part of `pattern` before its first component with a glob character."""
    head = uri.strip_query(pattern)
    parts = head.split("/")
    first = next(i for i, p in enumerate(parts) if uri.has_glob(p))
    return "/".join(parts[:first]) or ("/" if head.startswith("/") else ".")


def _expand_local_glob(pattern: str, split: str | None) -> list[Path]:
    hits = uri.glob(pattern)  # absolute paths
    root = str(Path(_glob_root(pattern)).expanduser().absolute())
    hits = _select_split(hits, [_relative(h, root) for h in hits], split, pattern, named=True)
    # A relative pattern gives relative paths, as glob.glob did.
    cwd = os.getcwd() + os.sep
    relative = not Path(pattern).is_absolute() and not pattern.startswith("~")
    return [Path(h[len(cwd) :]) if relative and h.startswith(cwd) else Path(h) for h in hits]


def _expand_parquet(source: Any, split: str | None = None) -> list[ParquetPath]:
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    files: list[ParquetPath] = []
    for s in sources:
        if uri.is_uri(s):
            files.extend(_expand_uri(str(s), split))
            continue
        p = Path(s)
        if p.is_dir():
            # Recursive: a Hub snapshot keeps its shards under data/.
            found = [f for f in sorted(p.rglob("*.parquet")) if f.is_file()]
            relative = [f.relative_to(p).as_posix() for f in found]
            keep = [i for i, r in enumerate(relative) if _visible(r)]
            if not keep:
                raise FileNotFoundError(f"no *.parquet files in directory {p}")
            files.extend(_select_split([found[i] for i in keep], [relative[i] for i in keep], split, str(p)))
        elif p.is_file():
            files.append(p)
        else:
            found = _expand_local_glob(str(s), split) if uri.has_glob(str(s)) else []
            if not found:
                raise FileNotFoundError(f"no parquet file matches {s}")
            files.extend(found)
    return files


def _expand_uri(source: str, split: str | None) -> list[str]:
    """The local cases of :func:`_expand_parquet` for a URI, through pyarrow's filesystem."""
    if uri.is_dir(source):
        found = [f for f in uri.list_files(source, recursive=True) if _is_parquet(f)]
        found = [f for f in found if _visible(_relative(f, source))]
        if not found:
            raise FileNotFoundError(f"no *.parquet files under {source}")
        return _select_split(found, [_relative(f, source) for f in found], split, source)
    if uri.is_file(source):
        return [source]
    found = uri.glob(source) if uri.has_glob(source) else []
    if not found:
        raise FileNotFoundError(f"no parquet file matches {source}")
    root = _glob_root(source)
    return _select_split(found, [_relative(f, root) for f in found], split, source, named=True)


@contextmanager
def _parquet_file(path: ParquetPath) -> Iterator[Any]:
    """A ``pq.ParquetFile``; a URI is read through its pyarrow filesystem, never a local copy."""
    import pyarrow.parquet as pq

    if isinstance(path, Path):
        yield pq.ParquetFile(path)
        return
    with uri.open_input(path) as f:
        yield pq.ParquetFile(f)


def _chunks(n: int, size: int) -> list[int]:
    """`n` rows as consecutive pieces of at most `size` rows."""
    return [size] * (n // size) + ([n % size] if n % size else [])


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
    """Pick-a-Pic v2 pairs from parquet (file, directory, glob or list; local or a storage URI) or an
    HF dataset on disk.

    ``format``: "auto" (HF if ``source`` is a ``save_to_disk`` directory or a ``datasets.Dataset``),
    "parquet" or "hf". ``split`` picks the split of a saved ``DatasetDict``, and of a parquet folder
    (searched recursively) whose files name splits: ``<split>-00000-of-00002.parquet`` (a Hub snapshot),
    ``<split>-*.parquet``, ``<split>.parquet`` or files in a ``<split>/`` folder; ``None`` takes the only
    split there is. A glob reads what it matches, choosing by ``split`` only if that spans several
    splits. Rows are read ``batch_rows`` at a time (parquet: within one row group) so memory stays
    bounded. A required column missing from any file, or a file that is no parquet, raises
    :class:`DataError` here, in either ``on_error`` mode. Other keyword arguments go to :class:`PairStream`.
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
            is_path = isinstance(source, (str, Path)) and not uri.has_glob(source)
            format = "hf" if is_hf_object or (is_path and _is_hf_saved_dir(source)) else "parquet"
        self.format = format
        if format == "hf":
            self._open_hf(source, split)
        else:
            self._open_parquet(source, split)

    # parquet ---------------------------------------------------------------------------------------
    def _open_parquet(self, source: Any, split: str | None = "train") -> None:
        import pyarrow as pa

        self.files: list[ParquetPath] = _expand_parquet(source, split)
        # Per file: row counts of its row groups (footer only, no data read).
        self._row_groups: list[list[int]] = []
        readable = []
        for path in self.files:
            try:
                with _parquet_file(path) as pf:
                    self._check_columns(pf.schema_arrow.names, str(path))
                    meta = pf.metadata
                    self._row_groups.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
                readable.append(path)
            except FileNotFoundError:
                raise
            except (pa.ArrowInvalid, OSError) as e:  # a bad footer: truncated, or not parquet at all
                message = describe(str(path), None, None, f"unreadable parquet file: {type(e).__name__}: {e}")
                if self.on_error == "raise" or len(self.files) == 1:
                    raise DataError(message, source=str(path)) from e
                # data.on_error=skip: one bad shard of many is left out, named and counted.
                self.issues.add(UNREADABLE_FILE, message)
        if not readable:
            raise DataError(f"no readable parquet file in {source}: {self.issues.report()}",
                            source=str(source))
        self.files = readable
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
        offset = 0
        for path, groups in zip(self.files, self._row_groups):
            file_rows = sum(groups)
            if offset + file_rows <= start:
                offset += file_rows
                continue
            if offset >= stop:
                return
            with _parquet_file(path) as pf:
                yield from self._iter_file(pf, str(path), groups, offset, start, stop)
            offset += file_rows

    def _iter_file(
        self, pf: Any, path: str, groups: list[int], offset: int, start: int, stop: int
    ) -> Iterator[RawPair]:
        """Rows [start, stop) of the file `pf` whose first row is global row `offset`."""
        file_start = offset
        for rg, n in enumerate(groups):
            lo, hi = offset, offset + n
            offset = hi
            if hi <= start or lo >= stop:
                continue
            batch_lo = lo
            for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=[rg], columns=self.columns):
                batch_hi = batch_lo + batch.num_rows
                a, b = max(batch_lo, start), min(batch_hi, stop)
                if a < b:
                    yield from self._rows(batch.slice(a - batch_lo, b - a), path, a, a - file_start)
                batch_lo = batch_hi
                if batch_lo >= stop:
                    return

    # HF datasets --------------------------------------------------------------------------------
    def _open_hf(self, source: Any, split: str | None) -> None:
        if hasattr(source, "with_format") and hasattr(source, "column_names"):
            dataset, name = source, f"<{type(source).__name__}>"
        else:
            name = str(source)
            if uri.is_uri(name):
                # datasets would need fsspec (s3fs, gcsfs) for that; parquet reads through pyarrow.
                raise ValueError(
                    f"{name}: a datasets save_to_disk folder is read from a local path only; write it as "
                    "parquet (Dataset.to_parquet) to read it from storage"
                )
            datasets = _import_datasets()
            dataset = datasets.load_from_disk(name)
        if not hasattr(dataset, "with_format") or isinstance(dataset, dict):
            splits = list(dataset.keys())
            if split is None and len(splits) == 1:
                split = splits[0]
            if split is None:
                raise ValueError(f"{name} holds several splits {splits}: choose one with split= (data.split)")
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

    def read_blocks(self) -> list[int]:
        """Row counts, in global row order, of the units that are cheap to read on their own: each
        parquet row group (pieces of at most ``batch_rows * 16`` rows if it is bigger), or chunks of
        that many rows of an HF dataset. They sum to the source's rows (before ``max_samples``)."""
        size = self.batch_rows * 16
        if self.format == "hf":
            return _chunks(self._total, size)
        return [piece for groups in self._row_groups for n in groups for piece in _chunks(n, size)]

    def _iter_raw(self, start: int, stop: int) -> Iterator[RawPair]:
        if self.format == "hf":
            return self._iter_hf(start, stop)
        return self._iter_parquet(start, stop)
