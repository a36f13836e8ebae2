"""Parsing of the small text specs users write on the command line and in configs: prompt files,
seed lists, scorer lists and model paths. A leaf: it imports nothing of diffalign, so the config,
training and evaluation all read them the same way.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Reward scorers by name (diffalign.eval builds them); dino compares with reference images, which
# only evaluation has.
SCORER_NAMES = ("aesthetic", "clip", "dino", "hpsv2", "imagereward", "pickscore")
EVAL_ONLY_SCORERS = ("dino",)
# Column names holding prompts, tried in order: Pick-a-Pic (caption), PartiPrompts (Prompt), generic ones.
PROMPT_COLUMNS = ("caption", "Prompt", "prompt", "text")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _pick_column(columns: Sequence[str], source: str) -> str:
    for name in PROMPT_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"{source}: no prompt column; expected one of {list(PROMPT_COLUMNS)}, found {list(columns)}"
    )


def _prompts_from_json(data: Any, source: str) -> list[str]:
    if isinstance(data, dict):  # {"prompts": [...]} or {style: [...]} (HPDv2 benchmark files per style)
        lists = [v for v in data.values() if isinstance(v, list)]
        if not lists:
            raise ValueError(f"{source}: a JSON object without any list of prompts")
        data = [p for lst in lists for p in lst]
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of prompts, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out.append(str(item[_pick_column(list(item), f"{source}[{i}]")]))
        else:
            raise ValueError(f"{source}[{i}]: expected a string or an object with a prompt, got {item!r}")
    return out


def load_prompts(path: str | os.PathLike[str], limit: int | None = None, dedupe: bool = True) -> list[str]:
    """Prompts from a file, detected by extension and columns.

    - ``.txt`` (or any other suffix): one prompt per line, blank lines skipped;
    - ``.parquet``: a Pick-a-Pic split (``caption`` column) or any table with a ``Prompt``/``prompt``
      column;
    - ``.tsv`` / ``.csv``: PartiPrompts (``Prompt`` column) or a ``prompt``/``caption`` column;
    - ``.json``: the HPDv2 test list (objects with ``prompt``), a list of strings, or an object of such
      lists (one per style); ``.jsonl``: one object or string per line.

    Whitespace is stripped, empty prompts dropped and, with ``dedupe``, repeats removed in order (a
    Pick-a-Pic split repeats each caption once per image pair). ``limit`` keeps the first prompts.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(p).names
        col = _pick_column(names, str(p))
        raw = [str(v) for v in pq.read_table(p, columns=[col]).column(col).to_pylist() if v is not None]
    elif suffix in (".tsv", ".csv"):
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            col = _pick_column(reader.fieldnames or [], str(p))
            raw = [row[col] or "" for row in reader]
    elif suffix == ".json":
        raw = _prompts_from_json(json.loads(p.read_text(encoding="utf-8")), str(p))
    elif suffix == ".jsonl":
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        raw = _prompts_from_json([json.loads(ln) for ln in lines], str(p))
    else:
        raw = p.read_text(encoding="utf-8").splitlines()
    prompts = [s.strip() for s in raw if s and s.strip()]
    if dedupe:
        prompts = list(dict.fromkeys(prompts))
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"no prompts in {str(p)!r}")
    return prompts


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """``"0,1,2"``, ``"0-3"`` (inclusive) or a mix, an int, or a list of ints."""
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return [int(s) for s in spec]
    seeds: list[int] = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep and lo:
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise ValueError(f"no seeds in {spec!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"repeated seeds in {spec!r}")
    return seeds


def parse_scorers(spec: str) -> dict[str, str | None]:
    """``"clip:/models/clip,pickscore"`` -> ``{"clip": "/models/clip", "pickscore": None}`` (None: the
    scorer's default release)."""
    out: dict[str, str | None] = {}
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        name, _, path = part.partition(":")
        name = name.strip().lower()
        if name in out:
            raise ValueError(f"scorer {name!r} given twice in {spec!r}")
        out[name] = path.strip() or None
    if not out:
        raise ValueError(f"no scorers in {spec!r}")
    return out


def looks_local(path: str) -> bool:
    # A hub id is exactly "owner/name"; anything else (absolute, relative with ./, nested) is a local path.
    p = str(path)
    if p.startswith(("/", ".", "~")):
        return True
    return p.count("/") != 1 or p.endswith(CHECKPOINT_SUFFIXES + (".safetensors",))


def resolve_path(path: str | os.PathLike[str] | None, default: str | None, what: str) -> str:
    """The local directory or hub id to load ``what`` from; a missing local path fails naming it."""
    if path is None:
        if default is None:
            raise ValueError(f"{what}: no default checkpoint exists; pass path=<local directory>")
        return default
    p = os.path.expanduser(os.fspath(path))
    if not os.path.exists(p) and looks_local(p):
        raise FileNotFoundError(f"{what}: path {p!r} does not exist")
    return p
