"""Pairs listed in a JSONL/CSV file, and a folder of images with one prompt (personalization)."""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from diffalign.data import uri
from diffalign.data.issues import (
    MALFORMED_ROW,
    MISSING_COLUMN,
    MISSING_FILE,
    MISSING_VALUE,
    UNREADABLE_IMAGE,
    DataError,
    DataIssues,
    check_on_error,
    describe,
)
from diffalign.data.stream import EpochItems, PairStream, RawPair, _RowProblem
from diffalign.data.transforms import IMAGE_EXTENSIONS, PairTransform, decode_image


class PairFileDataset(PairStream):
    """(prompt, chosen_path, rejected_path) rows from a ``.jsonl`` or ``.csv`` file.

    Relative image paths are resolved against the listing file's folder. The listing may be a storage
    URI (``s3://bucket/pairs.jsonl``), read through :mod:`diffalign.data.uri`: its relative image
    paths are then URIs too, and any image URI is read as bytes (kept encoded by ``materialize``).
    The listing itself is read at construction (it is small); images are decoded while streaming.
    A CSV header without a required column, or a JSONL file where no row has it, raises
    :class:`DataError` here. A row lacking a value, a missing or unreadable image, or an unparsable
    JSONL line is counted in ``.issues`` and skipped (or raised with ``on_error="raise"``). Other
    keyword arguments go to :class:`PairStream`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        format: str = "auto",
        prompt_column: str = "prompt",
        chosen_column: str = "chosen_path",
        rejected_column: str = "rejected_path",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # A URI stays a string (pyarrow filesystem); a local path is a Path, as before.
        self.path: Path | str = str(path) if uri.is_uri(path) else Path(path)
        if not (self.path.is_file() if isinstance(self.path, Path) else uri.is_file(self.path)):
            raise FileNotFoundError(f"pair listing not found: {self.path}")
        if format == "auto":
            format = "csv" if uri.strip_query(str(self.path)).lower().endswith(".csv") else "jsonl"
        if format not in ("jsonl", "csv"):
            raise ValueError(f"format must be 'auto', 'jsonl' or 'csv', got {format!r}")
        self.format = format
        self.base_dir: Path | str = self.path.parent if isinstance(self.path, Path) else uri.parent(self.path)
        self.columns = (prompt_column, chosen_column, rejected_column)
        # Each row: (location, record dict or None, parse error or None).
        self._rows: list[tuple[str, dict[str, Any] | None, str | None]] = (
            self._read_csv() if format == "csv" else self._read_jsonl()
        )

    def _missing_column(self, column: str, detail: str) -> DataError:
        return DataError(
            describe(str(self.path), None, column, detail),
            kind=MISSING_COLUMN,
            source=str(self.path),
            column=column,
        )

    def _open_text(self, newline: str | None) -> IO[str]:
        if isinstance(self.path, Path):
            return open(self.path, newline=newline, encoding="utf-8")
        # The same newline handling as open() in text mode, over the listing's bytes.
        return io.TextIOWrapper(io.BytesIO(uri.read_bytes(self.path)), encoding="utf-8", newline=newline)

    def _read_csv(self) -> list[tuple[str, dict[str, Any] | None, str | None]]:
        with self._open_text(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for column in self.columns:
                if column not in header:
                    raise self._missing_column(column, f"missing required column (header: {header})")
            rows = []
            for record in reader:
                # csv fills absent trailing fields with None and puts surplus ones under key None.
                rows.append((f"line {reader.line_num}", record, None))
        return rows

    def _read_jsonl(self) -> list[tuple[str, dict[str, Any] | None, str | None]]:
        rows: list[tuple[str, dict[str, Any] | None, str | None]] = []
        seen: set[str] = set()
        with self._open_text(newline=None) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    rows.append((f"line {n}", None, f"invalid JSON: {e}"))
                    continue
                if not isinstance(record, dict):
                    rows.append((f"line {n}", None, f"expected a JSON object, got {type(record).__name__}"))
                    continue
                seen.update(record)
                rows.append((f"line {n}", record, None))
        if any(r is not None for _, r, _ in rows):
            for column in self.columns:
                if column not in seen:
                    raise self._missing_column(column, "no row has this required key")
        return rows

    def _source_rows(self) -> int:
        return len(self._rows)

    def read_blocks(self) -> list[int]:
        """Row counts, in row order, of chunks of 1024 listing rows (all in memory: any split is cheap).
        They sum to the listing's rows (before ``max_samples``)."""
        n = len(self._rows)
        return [1024] * (n // 1024) + ([n % 1024] if n % 1024 else [])

    def _iter_raw(self, start: int, stop: int) -> Iterator[RawPair]:
        prompt_col, chosen_col, rejected_col = self.columns
        for i in range(start, stop):
            location, record, error = self._rows[i]
            raw = RawPair(
                source=str(self.path),
                location=location,
                row=i,
                index=i,
                prompt=None,
                first=None,
                second=None,
                label=None,
                prompt_column=prompt_col,
                first_column=chosen_col,
                second_column=rejected_col,
                label_column=None,
            )
            if record is None:
                raw.problem = (MALFORMED_ROW, None, error or "unreadable row")
            else:
                raw.prompt = record.get(prompt_col)
                raw.first = record.get(chosen_col)
                raw.second = record.get(rejected_col)
                for column in self.columns:
                    value = record.get(column)
                    if value is None or (
                        isinstance(value, str) and not value.strip() and column != prompt_col
                    ):
                        raw.problem = (MISSING_VALUE, column, "missing value")
                        break
            yield raw

    def _resolve(self, raw: RawPair, column: str, value: Any) -> Any:
        text = str(value).strip()
        if uri.is_uri(text):
            return self._read_uri(column, text)
        path = Path(text)
        if path.is_absolute():
            return path
        if isinstance(self.base_dir, Path):
            return self.base_dir / path
        return self._read_uri(column, uri.join(self.base_dir, path.as_posix()))

    def _read_uri(self, column: str, target: str) -> bytes:
        """An image at a URI as bytes: decode_image opens local paths only."""
        try:
            return uri.read_bytes(target)
        except OSError as e:
            if not uri.exists(target):
                raise _RowProblem(MISSING_FILE, column, f"file not found: {target}") from e
            raise _RowProblem(
                UNREADABLE_IMAGE, column, f"unreadable image ({target}): {type(e).__name__}: {e}"
            ) from e


class ImageFolderDataset(EpochItems):
    """A folder of images (jpg/png/webp/bmp) that all share one prompt, e.g. "a photo of sks dog".

    Yields ``{"prompt", "image", "original_size", "crop_top_left"}`` (chosen images only; rejected
    ones come from on-policy sampling). Every file is decoded once here: unreadable files are reported
    in ``.issues`` and left out (or raised with ``on_error="raise"``); fewer than ``min_images`` or more
    than ``max_images`` readable images raises :class:`DataError`.
    """

    def __init__(
        self,
        folder: str | Path,
        prompt: str,
        *,
        resolution: int = 512,
        random_crop: bool = False,
        random_flip: bool = False,
        transform: PairTransform | None = None,
        min_images: int = 1,
        max_images: int | None = None,
        seed: int = 0,
        on_error: str = "skip",
        max_examples: int = 5,
    ) -> None:
        # A storage URI (s3://...) too: the few target images are then read once and kept as bytes.
        self.folder = folder if uri.is_uri(folder) else Path(folder)
        self._bytes: dict[str, bytes] = {}
        if not (uri.is_dir(folder) if uri.is_uri(folder) else self.folder.is_dir()):
            raise FileNotFoundError(f"image folder not found: {self.folder}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        self.prompt = prompt.strip()
        self.transform = transform or PairTransform(resolution, random_crop, random_flip)
        self.seed = seed
        self.epoch = 0
        self.on_error = check_on_error(on_error)
        self.issues = DataIssues(max_examples)
        if isinstance(self.folder, Path):
            candidates: list = sorted(
                p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
        else:
            candidates = [f for f in uri.list_files(self.folder)
                          if Path(uri.strip_query(f)).suffix.lower() in IMAGE_EXTENSIONS]
            self._bytes = {f: uri.read_bytes(f) for f in candidates}
        self.paths: list = []
        for path in candidates:
            self.issues.rows_seen += 1
            try:
                decode_image(self._source(path))
            except Exception as e:  # any decoder failure means the file is unusable
                message = describe(str(path), None, None, f"unreadable image: {type(e).__name__}: {e}")
                if self.on_error == "raise":
                    raise DataError(message, kind=UNREADABLE_IMAGE, source=str(path)) from e
                self.issues.add(UNREADABLE_IMAGE, message)
                continue
            self.paths.append(path)
        self.issues.items_yielded = len(self.paths)
        n = len(self.paths)
        exts = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        if n < min_images:
            raise DataError(
                f"{self.folder}: {n} readable images ({exts}), need at least {min_images}"
                + (f"; {self.issues.total} unreadable" if self.issues.total else ""),
                source=str(self.folder),
            )
        if max_images is not None and n > max_images:
            raise DataError(
                f"{self.folder}: {n} images, at most {max_images} allowed", source=str(self.folder)
            )
        if self.issues.total:
            self.issues.log_summary(prefix=f"{self.folder}: ")

    def __len__(self) -> int:
        return len(self.paths)

    def _source(self, path: str | Path) -> str | Path | bytes:
        return self._bytes.get(path, path) if isinstance(path, str) else path

    def _make_item(self, i: int, rng: random.Random) -> dict[str, Any]:
        image = decode_image(self._source(self.paths[i]))
        return {"prompt": self.prompt, **self.transform.single(image, rng)}
