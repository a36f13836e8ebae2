"""Accounting for rows that a reader had to drop, so nothing disappears silently."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

logger = logging.getLogger("diffalign.data")

OnError = Literal["skip", "raise"]

# Issue kinds used by the readers. Ties are not errors (Pick-a-Pic has ~10% of them) but are counted too.
TIES_DROPPED = "ties_dropped"
MISSING_COLUMN = "missing_column"  # always fatal: raised at open time
MALFORMED_ROW = "malformed_row"
UNREADABLE_IMAGE = "unreadable_image"
MISSING_FILE = "missing_file"
MISSING_VALUE = "missing_value"
EMPTY_CAPTION = "empty_caption"
LABEL_OUT_OF_RANGE = "label_out_of_range"
UNREADABLE_FILE = "unreadable_file"  # data.on_error=skip: a shard whose footer cannot be read
UNREADABLE_BLOCK = "unreadable_block"  # a row group / page of a shard that cannot be read: its rows

# Kinds that are expected in clean data and therefore logged at DEBUG rather than WARNING.
BENIGN_KINDS = frozenset({TIES_DROPPED})


class DataError(ValueError):
    """A data problem that stops reading: a missing column, or any bad row with ``on_error="raise"``."""

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        source: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.source = source
        self.row = row
        self.column = column


def describe(source: str | None, location: str | None, column: str | None, detail: str) -> str:
    """One message format for every issue: file, then row (or line), then column, then what is wrong."""
    parts = [str(source) if source is not None else "<unknown source>"]
    if location is not None:
        parts.append(location)
    if column is not None:
        parts.append(f"column '{column}'")
    return f"{', '.join(parts)}: {detail}"


def check_on_error(on_error: str) -> OnError:
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    return on_error  # type: ignore[return-value]


class DataIssues:
    """Counts of dropped rows by kind, plus the first ``max_examples`` messages of each kind."""

    def __init__(self, max_examples: int = 5, log: logging.Logger | None = None) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.rows_seen = 0
        self.items_yielded = 0
        self._log = log or logger

    def add(self, kind: str, message: str | None = None, *, warn: bool | None = None) -> None:
        """Count one dropped row of ``kind``; log it (WARNING unless the kind is benign)."""
        self.counts[kind] += 1
        if message is None:
            return
        examples = self.examples.setdefault(kind, [])
        if len(examples) < self.max_examples:
            examples.append(message)
        if warn is None:
            warn = kind not in BENIGN_KINDS
        self._log.log(logging.WARNING if warn else logging.DEBUG, "skipped (%s) %s", kind, message)

    def count(self, kind: str) -> int:
        return self.counts.get(kind, 0)

    @property
    def total(self) -> int:
        """Dropped rows of every kind, ties included."""
        return sum(self.counts.values())

    @property
    def errors(self) -> int:
        """Dropped rows that point at bad data (ties excluded)."""
        return sum(n for k, n in self.counts.items() if k not in BENIGN_KINDS)

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def merge(self, other: DataIssues) -> DataIssues:
        """Fold ``other`` into this one (e.g. per-worker accounts); returns ``self``."""
        self.counts.update(other.counts)
        for kind, msgs in other.examples.items():
            mine = self.examples.setdefault(kind, [])
            mine.extend(msgs[: max(0, self.max_examples - len(mine))])
        self.rows_seen += other.rows_seen
        self.items_yielded += other.items_yielded
        return self

    def report(self) -> str:
        head = f"data: {self.items_yielded} items from {self.rows_seen} rows"
        if not self.counts:
            return head + ", nothing dropped"
        lines = [head + f", {self.total} dropped:"]
        for kind, n in self.summary().items():
            lines.append(f"  {kind}: {n}")
            for msg in self.examples.get(kind, []):
                lines.append(f"    - {msg}")
            shown = len(self.examples.get(kind, []))
            if 0 < shown < n:
                lines.append(f"    ... and {n - shown} more")
        return "\n".join(lines)

    def log_summary(self, prefix: str = "") -> None:
        level = logging.WARNING if self.errors else logging.INFO
        self._log.log(level, "%s%s", prefix, self.report())

    def __repr__(self) -> str:
        return f"DataIssues({self.summary()}, rows_seen={self.rows_seen}, items_yielded={self.items_yielded})"

    def __getstate__(self) -> dict:
        # Loggers pickle fine by name in 3.10+, but keep the state plain for DataLoader workers.
        state = self.__dict__.copy()
        state["_log"] = self._log.name
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["_log"] = logging.getLogger(state["_log"])
        self.__dict__.update(state)
