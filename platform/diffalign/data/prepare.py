"""Preparing a pair store (`diffalign.data.store`) from a pair source: the single-process pieces.

`diffalign.actors.prepare.prepare_store` plans the shards here, runs `prepare_pair_shard` and
`prepare_prompt_shard` on Ray Data actors that hold the VAE and text encoders, then writes the manifest
(`build_manifest`) and the bad-input report. Nothing here imports Ray or the models: the VAE and the
prompt encoder come in as arguments.

What a shard holds is what an epoch-0 read of the in-memory path computes: every source row
[start, stop) is validated (`PairStream._check`, counted in the shard's own `DataIssues`), transformed
with `item_rng(train.seed, 0, row)` (the first read's crop and flip), then encoded with
`encode_moments`; with `data.random_flip` the mirror image of that read is encoded too (view 1), as
`diffalign.train.cache.CachedPairs` caches it. Prompt ids number the stripped captions of the whole
source in first-seen order (one pass over the caption column, `source_captions`).

Records: `pairs-NNNNN.json` / `prompts-NNNNN.json` are written after their shard; a shard without its
record is unfinished. A shard with no valid row gets its record and no file (`file: null`; the manifest
lists it under `empty_shards`, not under `shards`). `spec.json` holds the setup every record was made
for (`store_spec`), whose digest each record repeats: a resume reuses only records of that digest.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.data import uri
from diffalign.data.issues import UNREADABLE_FILE, DataError, DataIssues, describe
from diffalign.data.latent_cache import encode_moments
from diffalign.data.store import (
    PAIR_SHARD,
    PROMPT_SHARD,
    STORE_DTYPES,
    STORE_FORMAT,
    write_json,
    write_pair_shard,
    write_prompt_shard,
)
from diffalign.data.transforms import item_rng

log = logging.getLogger(__name__)

PAIR_RECORD = "pairs-{:05d}.json"
PROMPT_RECORD = "prompts-{:05d}.json"
SPEC = "spec.json"
REPORT = "report.json"
MAX_EXAMPLES = 5  # example messages per issue kind, per shard and in the report


# --------------------------------------------------------------------------------------- planning

def plan_shards(num_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """Shard k covers source rows [k * shard_rows, min(num_rows, (k + 1) * shard_rows))."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    return [(a, min(num_rows, a + shard_rows)) for a in range(0, num_rows, shard_rows)]


def encoding_spec(cfg: Any) -> dict[str, Any]:
    """What a store of `cfg` holds and how it was made (the manifest's "encoding")."""
    p, d, m = cfg.prepare, cfg.data, cfg.model
    latents = bool(p.encode)
    return {
        "latents": latents,
        # A pixel store keeps the encoded images once; the run's transform crops and flips each read.
        "moments": (2 if p.latents == "moments" else 1) if latents else 1,
        "views": (2 if d.random_flip else 1) if latents else 1,
        "dtype": p.dtype,
        "resolution": m.resolution,
        "center_crop": bool(d.center_crop),
        "random_flip": bool(d.random_flip),
        "seed": cfg.train.seed,
        "sizes": latents and m.family == "sdxl",
        "embeddings": latents and bool(p.embeddings),
    }


def relevant_identity(identity: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of `model_identity(bundle)` that the stored tensors depend on."""
    out: dict[str, Any] = {"family": identity.get("family")}
    if spec["latents"]:
        out.update(vae=identity.get("vae"), vae_dtype=identity.get("vae_dtype"))
    if spec["embeddings"]:
        out.update(text_encoders=identity.get("text_encoders"),
                   text_encoder_dtype=identity.get("text_encoder_dtype"),
                   tokenizer_max_length=identity.get("tokenizer_max_length"),
                   max_sequence_length=identity.get("max_sequence_length"))
    return out


def store_spec(cfg: Any, *, identity: Mapping[str, Any], source: Mapping[str, Any],
               num_prompts: int) -> dict[str, Any]:
    """Everything a store's bytes depend on: a resume into the same output must agree on all of it."""
    spec = encoding_spec(cfg)
    return {
        "format": STORE_FORMAT,
        "encoding": spec,
        "model": relevant_identity(identity, spec),
        "source": {k: source[k] for k in ("kind", "path", "split", "rows", "digest")},
        "plan": {"shard_rows": cfg.prepare.shard_rows, "prompt_shard_rows": cfg.prepare.prompt_shard_rows,
                 "prompts": num_prompts if spec["embeddings"] else 0},
    }


def spec_digest(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_differences(stored: Any, now: Any, prefix: str = "") -> list[str]:
    """`field: store X, now Y` for every leaf where two specs differ."""
    if isinstance(stored, Mapping) and isinstance(now, Mapping):
        out = []
        for key in sorted(set(stored) | set(now), key=str):
            out += spec_differences(stored.get(key, "<absent>"), now.get(key, "<absent>"),
                                    f"{prefix}{key}.")
        return out
    return [] if stored == now else [f"{prefix.rstrip('.')}: store {stored!r}, now {now!r}"]


# --------------------------------------------------------------------------------------- the source

def _parquet_file(path: Any) -> Any:
    import pyarrow.parquet as pq

    if isinstance(path, str) and uri.is_uri(path):
        return pq.ParquetFile(uri.open_input(path))
    return pq.ParquetFile(path)


def open_source(cfg: Any) -> Any:
    """`open_pair_stream(cfg)`: a missing column or an unreadable parquet footer is the reader's
    `DataError` naming the file (and the column), raised here, before any work."""
    from diffalign.data.factory import open_pair_stream

    stream = open_pair_stream(cfg)
    left_out = stream.issues.count(UNREADABLE_FILE)
    if left_out:  # training may skip a bad shard (data.on_error=skip); a store is made once, whole
        raise DataError(f"{left_out} source file(s) cannot be read; fix or remove them, then prepare again:\n"
                        + stream.issues.report(), kind=UNREADABLE_FILE)
    return stream


def source_captions(stream: Any) -> list[str | None]:
    """The stripped caption of every source row [0, num_rows) (None: missing, not text or empty),
    read from the caption column only where the format allows it (parquet, HF on disk)."""
    n = stream.num_rows
    out: list[str | None] = []

    def add(values: Iterable[Any]) -> None:
        for v in values:
            if len(out) >= n:
                return
            s = v.strip() if isinstance(v, str) else None
            out.append(s or None)

    column = getattr(stream, "caption_column", None)
    if getattr(stream, "format", None) == "parquet" and hasattr(stream, "files"):
        for f in stream.files:
            if len(out) >= n:
                break
            pf = _parquet_file(f)
            try:
                for batch in pf.iter_batches(batch_size=65536, columns=[column]):
                    add(batch.column(0).to_pylist())
                    if len(out) >= n:
                        break
            finally:
                pf.close()
    elif getattr(stream, "format", None) == "hf" and hasattr(stream, "hf_dataset"):
        table = stream.hf_dataset.with_format("arrow")
        for a in range(0, n, 65536):
            add(table[a:min(n, a + 65536)].column(column).to_pylist())
    else:  # listings (JSONL / CSV) are in memory already: their rows read no image
        add(raw.prompt for raw in stream._iter_raw(0, n))
    if len(out) != n:
        raise DataError(f"caption pass read {len(out)} rows of the {n} the reader has")
    return out


def unique_prompts(captions: Iterable[str | None]) -> tuple[list[str], dict[str, int]]:
    """(prompts in first-seen order, prompt -> id)."""
    ids: dict[str, int] = {}
    for c in captions:
        if c is not None and c not in ids:
            ids[c] = len(ids)
    return list(ids), ids


def source_files(stream: Any) -> list[str]:
    """The files a reader reads (images named by listings are not fingerprinted)."""
    if getattr(stream, "format", None) == "hf" and hasattr(stream, "hf_dataset"):
        return [str(f["filename"]) for f in getattr(stream.hf_dataset, "cache_files", [])]
    if hasattr(stream, "files"):
        return [str(f) for f in stream.files]
    if hasattr(stream, "path"):
        return [str(stream.path)]
    return []


def file_fingerprints(files: Sequence[str]) -> list[dict[str, Any]]:
    """Path, size and mtime (pyarrow `FileInfo`) of each file."""
    out = []
    for f in files:
        fs, inner = uri.filesystem(f)
        info = fs.get_file_info(inner)
        mtime = info.mtime_ns if info.mtime_ns is not None else None
        out.append({"path": f, "size": info.size, "mtime_ns": mtime})
    return out


def source_info(cfg: Any, stream: Any) -> dict[str, Any]:
    d = cfg.data
    files = file_fingerprints(source_files(stream))
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    return {"kind": d.kind, "path": d.path, "split": getattr(d, "split", "train"), "rows": stream.num_rows,
            "max_samples": d.max_samples, "files": files, "digest": digest}


# --------------------------------------------------------------------------------------- shards

def _image_bytes(value: Any) -> bytes:
    """An image as a reader gives it (bytes, an HF {bytes, path} struct, a path or URI) -> its bytes."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, Path)):
        return uri.read_bytes(str(value))
    raise TypeError(f"cannot store an image given as {type(value).__name__}")


def _examples(issues: DataIssues) -> list[dict[str, str]]:
    return [{"kind": k, "message": m} for k in sorted(issues.examples) for m in issues.examples[k]]


class _Encoder:
    """Encodes images `batch_size` at a time in the order they come, whatever the rows they belong
    to, so a shard's batches (and their rounding) depend on its rows alone."""

    def __init__(self, vae: Any, batch_size: int, moments: int, dtype: torch.dtype) -> None:
        self.vae, self.batch_size, self.moments, self.dtype = vae, batch_size, moments, dtype
        self.pending: list[torch.Tensor] = []
        self.out: list[torch.Tensor] = []  # (b, moments, C, h, w) in the store dtype

    def add(self, images: Iterable[torch.Tensor]) -> None:
        self.pending.extend(images)
        while len(self.pending) >= self.batch_size:
            self._encode(self.batch_size)

    @torch.no_grad()
    def _encode(self, k: int) -> None:
        batch, self.pending = torch.stack(self.pending[:k]), self.pending[k:]
        mean, std = encode_moments(self.vae, batch)
        both = torch.stack([mean, std], dim=1) if self.moments == 2 else mean[:, None]
        self.out.append(both.to(self.dtype))

    def finish(self) -> torch.Tensor | None:
        if self.pending:
            self._encode(len(self.pending))
        return torch.cat(self.out) if self.out else None


def prepare_pair_shard(stream: Any, start: int, stop: int, root: str, shard: int, *, vae: Any,
                       spec: Mapping[str, Any], prompt_ids: Mapping[str, int], batch_size: int,
                       digest: str | None = None, max_examples: int = MAX_EXAMPLES) -> dict[str, Any]:
    """Validates, transforms and (with `spec["latents"]`) encodes source rows [start, stop) of `stream`
    into pair shard `shard` of `root`, then writes its record; returns the record.

    `prompt_ids` maps the prompts of these rows to their ids. Latents are (n, views, [chosen, rejected],
    moments, C, h, w) in `spec["dtype"]`; view 1 is the mirror image of view 0 (the first read)."""
    issues = DataIssues(max_examples)
    dtype = STORE_DTYPES[spec["dtype"]]
    views = int(spec["views"])
    encoder = _Encoder(vae, batch_size, int(spec["moments"]), dtype) if spec["latents"] else None
    prompts: list[str] = []
    ids: list[int] = []
    index: list[int] = []
    sizes: list[list[list[int]]] = []
    chosen_bytes: list[bytes] = []
    rejected_bytes: list[bytes] = []
    for raw in stream._iter_raw(start, stop):
        issues.rows_seen += 1
        checked = stream._check(raw, issues)
        if checked is None:
            continue
        record, chosen, rejected = checked
        if record.prompt not in prompt_ids:
            raise DataError(describe(raw.source, raw.location, None,
                                     f"caption {record.prompt!r} was not in the caption pass: the source "
                                     "changed while it was prepared"))
        prompts.append(record.prompt)
        ids.append(int(prompt_ids[record.prompt]))
        index.append(int(raw.index))
        if encoder is None:
            chosen_bytes.append(_image_bytes(record.chosen))
            rejected_bytes.append(_image_bytes(record.rejected))
            continue
        item = stream.transform(chosen, rejected, item_rng(spec["seed"], 0, raw.index))
        pixels = [item["chosen"], item["rejected"]]
        if views == 2:
            pixels += [p.flip(-1) for p in pixels]
        encoder.add(pixels)
        original, crop = tuple(item["original_size"]), tuple(item["crop_top_left"])
        row_sizes = [[*original, *crop]]
        if views == 2:
            row_sizes.append([*original, *stream.transform.mirrored_crop(original, crop)])
        sizes.append(row_sizes)
    issues.items_yielded = n = len(prompts)

    entry: dict[str, Any] = {"file": None, "bytes": 0}
    if n:
        common = dict(prompts=prompts, prompt_ids=ids, source_index=index)
        if encoder is not None:
            lat = encoder.finish()
            lat = lat.view(n, views, 2, *lat.shape[1:])
            size_t = torch.tensor(sizes, dtype=torch.int64) if spec["sizes"] else None
            entry = write_pair_shard(root, shard, latents=lat, sizes=size_t, **common)
        else:
            entry = write_pair_shard(root, shard, chosen=chosen_bytes, rejected=rejected_bytes, **common)
    record = {
        "shard": shard, "start": start, "stop": stop, "rows": n, "rows_seen": issues.rows_seen,
        "file": entry["file"], "bytes": entry["bytes"], "issues": issues.summary(),
        "examples": _examples(issues), "spec_digest": digest,
    }
    write_json(uri.join(root, PAIR_RECORD.format(shard)), record)
    return record


@torch.no_grad()
def prepare_prompt_shard(prompts: Sequence[str], root: str, shard: int, prompt_encoder: Any,
                         batch_size: int, *, dtype: str = "bfloat16", start: int = 0,
                         digest: str | None = None) -> dict[str, Any]:
    """Text-encoder outputs of `prompts` (ids [start, start + len)) as prompt shard `shard` of `root`,
    in the encoders' dtype cast to the store dtype, then its record; returns the record."""
    if not prompts:
        raise ValueError("a prompt shard needs at least one prompt")
    store_dtype = STORE_DTYPES[dtype]
    embeds, pooled = [], []
    for a in range(0, len(prompts), batch_size):
        e, p = prompt_encoder.text_embeddings(list(prompts[a:a + batch_size]))
        embeds.append(e.to(store_dtype).cpu())
        if p is not None:
            pooled.append(p.to(store_dtype).cpu())
    entry = write_prompt_shard(root, shard, torch.cat(embeds), torch.cat(pooled) if pooled else None)
    record = {"shard": shard, "start": start, "stop": start + len(prompts), "rows": len(prompts),
              "file": entry["file"], "bytes": entry["bytes"], "spec_digest": digest}
    write_json(uri.join(root, PROMPT_RECORD.format(shard)), record)
    return record


# --------------------------------------------------------------------------------------- manifest

def merged_issues(records: Iterable[Mapping[str, Any]], max_examples: int = MAX_EXAMPLES) -> DataIssues:
    """The shard records' counts and examples as one account, in shard order."""
    total = DataIssues(max_examples)
    for r in records:
        part = DataIssues(max_examples)
        part.counts.update(r.get("issues", {}))
        for ex in r.get("examples", []):
            part.examples.setdefault(ex["kind"], []).append(ex["message"])
        part.rows_seen, part.items_yielded = r.get("rows_seen", 0), r.get("rows", 0)
        total.merge(part)
    return total


def build_manifest(*, spec: Mapping[str, Any], digest: str, identity: Mapping[str, Any],
                   source: Mapping[str, Any], pair_records: Sequence[Mapping[str, Any]],
                   prompt_records: Sequence[Mapping[str, Any]], num_prompts: int,
                   run: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest of a finished store; `run` (timings, what this run made) is the only part that
    differs between two runs that prepared the same store."""
    issues = merged_issues(pair_records)
    shard_keys = ("shard", "file", "rows", "start", "stop", "bytes")
    return {
        "format": STORE_FORMAT,
        "pairs": sum(int(r["rows"]) for r in pair_records),
        "rows": int(source["rows"]),
        "shard_rows": spec["plan"]["shard_rows"],
        "shards": [{k: r[k] for k in shard_keys} for r in pair_records if r["rows"]],
        "empty_shards": [r["shard"] for r in pair_records if not r["rows"]],
        "prompt_shards": [{k: r[k] for k in shard_keys} for r in prompt_records],
        "prompts": num_prompts,
        "encoding": dict(spec["encoding"]),
        "model": dict(identity),
        "source": dict(source),
        "dropped": issues.summary(),
        "spec_digest": digest,
        "files": {"pair_shard": PAIR_SHARD, "prompt_shard": PROMPT_SHARD, "pair_record": PAIR_RECORD,
                  "prompt_record": PROMPT_RECORD},
        "run": dict(run),
    }


def build_report(manifest: Mapping[str, Any], pair_records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The bad-input report: counts by kind and example messages (file, row, column, problem)."""
    issues = merged_issues(pair_records)
    return {
        "rows": manifest["rows"], "pairs": manifest["pairs"], "dropped": issues.summary(),
        "dropped_total": issues.total, "examples": {k: list(v) for k, v in sorted(issues.examples.items())},
        "by_shard": {str(r["shard"]): r["issues"] for r in pair_records if r.get("issues")},
        "text": issues.report(),
    }


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
