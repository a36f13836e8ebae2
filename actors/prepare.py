"""The prepare job: a pair store (`diffalign.data.store`) of the data section's source for the model
section's encoders, made once on Ray Data and read by every run (`data.kind=store`).

`prepare_store(cfg)`, on the driver:
1. opens the source (a missing column or an unreadable file is a `DataError` naming it, before any
   work), reads its caption column once (prompt ids: unique stripped captions in first-seen order) and
   fingerprints its files (size, mtime);
2. joins or starts Ray (`ensure_ray`) and takes the model identity (VAE / text-encoder weights) from
   one task that builds the bundle as the actors will;
3. checks the output: a store made for another setup (`spec.json`, or any record of another digest) is
   refused with the fields that differ; nothing there is deleted;
4. runs every pair and prompt shard that has no record of this setup's digest through
   `ray.data.from_items(tasks).map_batches(ShardWorker, ...)`: a fixed pool of `prepare.num_actors`
   actors, each building the VAE and text encoders once; every shard and its record are written by
   the actor that made it, so a killed prepare resumes with the shards it had finished;
5. writes the bad-input report, then `manifest.json` last, and logs the counts (and to MLflow when
   `tracking.mlflow`).

`DIFFALIGN_PREPARE_SHARD_DELAY` (seconds, read here and passed to the actors) sleeps before each shard:
a test hook that widens the window in which a prepare is part done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffalign.config import ConfigError, RunConfig
from diffalign.data import uri
from diffalign.data.issues import DataError
from diffalign.data.prepare import (
    PAIR_RECORD,
    PROMPT_RECORD,
    REPORT,
    SPEC,
    build_manifest,
    build_report,
    encoding_spec,
    merged_issues,
    now_iso,
    open_source,
    plan_shards,
    prepare_pair_shard,
    prepare_prompt_shard,
    relevant_identity,
    source_captions,
    source_info,
    spec_differences,
    spec_digest,
    store_spec,
    unique_prompts,
)
from diffalign.data.store import MANIFEST, StoreError, model_identity, read_json, write_json

log = logging.getLogger(__name__)

DELAY_ENV = "DIFFALIGN_PREPARE_SHARD_DELAY"


# --------------------------------------------------------------------------------------- actors

def _build_encoders(cfg: RunConfig) -> Any:
    """The bundle as every process builds it (seeded with train.seed), without its UNet."""
    from diffalign.models.build import build_bundle

    torch.manual_seed(cfg.train.seed)
    bundle = build_bundle(cfg)
    bundle.unet = None  # a prepare never runs the denoiser
    return bundle


def bundle_identity(cfg: RunConfig) -> dict[str, Any]:
    """`model_identity` of the bundle the actors build (run as a Ray task, where the models load)."""
    return model_identity(_build_encoders(cfg))


class ShardWorker:
    """A Ray Data callable class: opens the source and builds the encoders once per actor, then
    prepares one shard per call (`batch_size=1`: a batch is one task)."""

    def __init__(self, cfg: RunConfig, root: str, spec: dict, digest: str, identity: dict,
                 delay: float = 0.0) -> None:
        torch.set_num_threads(max(1, int(cfg.prepare.cpus_per_actor)))
        self.root, self.spec, self.digest, self.delay = root, spec, digest, float(delay)
        self.batch_size = cfg.prepare.batch_size
        self.stream = open_source(cfg)
        self.vae = self.prompt_encoder = None
        if spec["latents"]:
            from diffalign.models.conditioning import PromptEncoder

            bundle = _build_encoders(cfg)
            mine = relevant_identity(model_identity(bundle), spec)
            if mine != relevant_identity(identity, spec):
                raise StoreError("a prepare actor built other encoders than the driver planned for: "
                                 + "; ".join(spec_differences(relevant_identity(identity, spec), mine)))
            use_gpu = cfg.prepare.gpus_per_actor > 0 and torch.cuda.is_available()
            device = torch.device("cuda" if use_gpu else "cpu")
            self.vae = bundle.vae.to(device).eval().requires_grad_(False)
            for enc in bundle.text_encoders:
                enc.to(device).eval().requires_grad_(False)
            self.prompt_encoder = PromptEncoder(bundle)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for text in batch["task"]:
            task = json.loads(str(text))
            if self.delay:
                time.sleep(self.delay)
            t0 = time.perf_counter()
            try:
                if task["kind"] == "pairs":
                    record = prepare_pair_shard(
                        self.stream, task["start"], task["stop"], self.root, task["shard"], vae=self.vae,
                        spec=self.spec, prompt_ids=task["prompt_ids"], batch_size=self.batch_size,
                        digest=self.digest)
                else:
                    record = prepare_prompt_shard(
                        task["prompts"], self.root, task["shard"], self.prompt_encoder, self.batch_size,
                        dtype=self.spec["dtype"], start=task["start"], digest=self.digest)
            except DataError as e:
                # A bad row under data.on_error=raise: handed to the driver as data (a raised
                # exception would reach it as Ray's wrapper without the DataError's fields).
                error = {"message": str(e), "kind": e.kind, "source": e.source, "row": e.row,
                         "column": e.column}
                out.append(json.dumps({"kind": task["kind"], "shard": task["shard"], "error": error}))
                continue
            out.append(json.dumps({"kind": task["kind"], "seconds": time.perf_counter() - t0,
                                   "record": record}))
        return {"result": np.array(out, dtype=object)}


# --------------------------------------------------------------------------------------- driver

def _absolute(path: str | None) -> str | None:
    if path is None or uri.is_uri(path):
        return path
    return str(Path(path).expanduser().absolute())


def _with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    data = dataclasses.replace(cfg.data, path=_absolute(cfg.data.path))
    prepare = dataclasses.replace(cfg.prepare, output=_absolute(cfg.prepare.output),
                                  report=_absolute(cfg.prepare.report))
    return dataclasses.replace(cfg, data=data, prepare=prepare)


def _check_fits(cfg: RunConfig) -> None:
    import ray

    p = cfg.prepare
    need = {"CPU": p.num_actors * p.cpus_per_actor, "GPU": p.num_actors * p.gpus_per_actor}
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        parts = ", ".join(f"{k}: need {n:g}, cluster has {h:g}" for k, (n, h) in short.items())
        raise ConfigError(f"prepare.num_actors={p.num_actors} actors do not fit the cluster ({parts}); lower "
                          "prepare.num_actors, prepare.cpus_per_actor or prepare.gpus_per_actor")


def _identity(cfg: RunConfig, encoding: dict) -> dict[str, Any]:
    if not (encoding["latents"] or encoding["embeddings"]):
        return {"family": cfg.model.family}  # a pixel store depends on no model
    import ray

    task = ray.remote(bundle_identity).options(num_cpus=cfg.prepare.cpus_per_actor, max_retries=0)
    return ray.get(task.remote(cfg))


def _existing_records(root: str) -> dict[str, dict]:
    """File name -> record of every pair / prompt record in `root`."""
    if not uri.is_dir(root):
        return {}
    out = {}
    for f in uri.list_files(root):
        name = f.rsplit("/", 1)[-1].split("?")[0] if uri.is_uri(f) else Path(f).name
        if name.endswith(".json") and name.startswith(("pairs-", "prompts-")):
            record = read_json(f)
            if record is not None:
                out[name] = record
    return out


def _refuse(root: str, reason: str, lines: list[str]) -> None:
    shown = lines[:12] + ([f"... and {len(lines) - 12} more"] if len(lines) > 12 else [])
    raise StoreError(f"prepare.output={root} holds a store prepared for another setup ({reason}):\n  "
                     + "\n  ".join(shown) + f"\nremove it (rm -r {root}) to prepare it again, or set "
                     "prepare.output to another folder; nothing was changed")


def _check_output(root: str, spec: dict, digest: str, records: dict[str, dict]) -> None:
    """Refuses an output that holds shards of another setup."""
    stored = read_json(uri.join(root, SPEC))
    if stored is not None and stored.get("digest") != digest:
        stored = {k: v for k, v in stored.items() if k != "digest"}
        _refuse(root, SPEC, spec_differences(stored, spec) or ["spec digest differs"])
    if stored is None:
        manifest = read_json(uri.join(root, MANIFEST))
        if manifest is not None and manifest.get("spec_digest") != digest:
            made = {"encoding": manifest.get("encoding"), "source": manifest.get("source", {}).get("digest")}
            now = {"encoding": spec["encoding"], "source": spec["source"]["digest"]}
            _refuse(root, MANIFEST, spec_differences(made, now) or ["spec digest differs"])
    other = sorted(name for name, r in records.items() if r.get("spec_digest") != digest)
    if other:
        _refuse(root, "shard records",
                [f"{name}: spec digest {records[name].get('spec_digest')}, now {digest}" for name in other])


def _remove_partial_writes(root: str) -> None:
    """Temporary files of writes a killed prepare did not finish (never a finished file)."""
    if uri.is_uri(root) or not uri.is_dir(root):
        return
    for f in uri.list_files(root):
        if f.endswith(".tmp"):
            uri.delete_file(f)


def _run_tasks(cfg: RunConfig, tasks: list[dict], root: str, spec: dict, digest: str, identity: dict,
               progress: bool) -> list[dict]:
    """The tasks through a Ray Data actor pool; returns their results (kind, seconds, record)."""
    import ray
    from tqdm.auto import tqdm

    p = cfg.prepare
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver's own bar counts shards
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map_batches(
        ShardWorker, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(p.num_actors, len(tasks))),  # a fixed pool
        num_cpus=p.cpus_per_actor, num_gpus=p.gpus_per_actor or None,
        fn_constructor_kwargs=dict(cfg=cfg, root=root, spec=spec, digest=digest, identity=identity,
                                   delay=delay))
    results = []
    bar = tqdm(total=len(tasks), desc="preparing shards", unit="shard", disable=not progress)
    rows = iter(ds.iter_rows())
    try:
        for row in rows:
            result = json.loads(row["result"])
            if "error" in result:  # stop at the first bad row; the shards finished so far are kept
                raise DataError(**result["error"])
            results.append(result)
            bar.update(1)
    finally:
        bar.close()
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # ends the Ray Data execution (and its actors) early on an error
    return results


def _log_mlflow(cfg: RunConfig, manifest: dict, report: dict) -> None:
    import mlflow
    from diffalign.tracking import tracking_uri, use_experiment

    mlflow.set_tracking_uri(tracking_uri(cfg))
    use_experiment(mlflow, cfg.tracking.experiment, tracking_uri(cfg))  # artifacts beside its store
    with mlflow.start_run(run_name=cfg.tracking.run_name or "prepare", tags={"diffalign.job": "prepare"}):
        params = {f"prepare.{k}": v for k, v in dataclasses.asdict(cfg.prepare).items()}
        params.update({f"data.{k}": getattr(cfg.data, k, None)
                       for k in ("kind", "path", "split", "max_samples", "center_crop", "random_flip")})
        model_fields = ("family", "pretrained", "vae", "resolution", "tiny_seed", "mixed_precision")
        params.update({f"model.{k}": getattr(cfg.model, k) for k in model_fields})
        params["store.spec_digest"] = manifest["spec_digest"]
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        run = manifest["run"]
        metrics = {"prepare.pairs": manifest["pairs"], "prepare.rows": manifest["rows"],
                   "prepare.prompts": manifest["prompts"], "prepare.wall_s": run["wall_s"],
                   "prepare.pairs_per_s": run["pairs_per_s"], "prepare.shards_made": run["shards_made"],
                   "prepare.shards_reused": run["shards_reused"],
                   **{f"data.dropped.{k}": n for k, n in manifest["dropped"].items()}}
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_dict(report, "prepare_report.json")


def prepare_store(cfg: RunConfig, *, progress: bool | None = None) -> dict[str, Any]:
    """Prepares (or finishes) the store at `prepare.output`; returns its manifest. `manifest["run"]`
    holds what this run did: wall time, pairs/s, shards made and reused."""
    t0 = time.perf_counter()
    if not cfg.prepare.output:
        raise ConfigError("prepare.output is required: the store root, a folder or a URI (s3://...)")
    cfg = _with_absolute_paths(cfg)
    p, root = cfg.prepare, str(cfg.prepare.output)
    progress = cfg.train.progress if progress is None else progress

    stream = open_source(cfg)  # missing columns, unreadable files: DataError before any work
    n = stream.num_rows
    if n == 0:
        raise DataError(f"{cfg.data.path}: the source has no rows to prepare")
    captions = source_captions(stream)
    prompts, prompt_ids = unique_prompts(captions)
    source = source_info(cfg, stream)
    encoding = encoding_spec(cfg)

    from diffalign.actors.cluster import ensure_ray

    ensure_ray(cfg)
    _check_fits(cfg)
    identity = _identity(cfg, encoding)
    spec = store_spec(cfg, identity=identity, source=source, num_prompts=len(prompts))
    digest = spec_digest(spec)
    records = _existing_records(root)
    _check_output(root, spec, digest, records)
    write_json(uri.join(root, SPEC), {**spec, "digest": digest})
    _remove_partial_writes(root)
    present = set(uri.list_files(root)) if uri.is_dir(root) else set()

    def finished(record: dict | None) -> bool:
        return (record is not None and record.get("spec_digest") == digest
                and (record.get("file") is None or uri.join(root, record["file"]) in present))

    pair_plan = plan_shards(n, p.shard_rows)
    prompt_plan = plan_shards(len(prompts), p.prompt_shard_rows) if encoding["embeddings"] else []
    done_pairs = {k: r for k in range(len(pair_plan))
                  if finished(r := records.get(PAIR_RECORD.format(k)))}
    done_prompts = {k: r for k in range(len(prompt_plan))
                    if finished(r := records.get(PROMPT_RECORD.format(k)))}
    tasks: list[dict] = []
    for k, (a, b) in enumerate(prompt_plan):
        if k not in done_prompts:
            tasks.append({"kind": "prompts", "shard": k, "start": a, "prompts": prompts[a:b]})
    for k, (a, b) in enumerate(pair_plan):
        if k not in done_pairs:
            ids = {c: prompt_ids[c] for c in captions[a:b] if c is not None}
            tasks.append({"kind": "pairs", "shard": k, "start": a, "stop": b, "prompt_ids": ids})
    log.info("preparing %s: %d source rows, %d unique prompts; %d of %d pair shards and %d of %d prompt "
             "shards to make (the others are finished)", root, n, len(prompts),
             len(pair_plan) - len(done_pairs), len(pair_plan), len(prompt_plan) - len(done_prompts),
             len(prompt_plan))

    results = _run_tasks(cfg, tasks, root, encoding, digest, identity, progress) if tasks else []
    made_pairs = {r["record"]["shard"]: r["record"] for r in results if r["kind"] == "pairs"}
    made_prompts = {r["record"]["shard"]: r["record"] for r in results if r["kind"] == "prompts"}
    pair_records = [done_pairs.get(k) or made_pairs[k] for k in range(len(pair_plan))]
    prompt_records = [done_prompts.get(k) or made_prompts[k] for k in range(len(prompt_plan))]

    wall = time.perf_counter() - t0
    pairs_made = sum(r["rows"] for r in made_pairs.values())
    report_path = p.report or uri.join(root, REPORT)
    run = {"created": now_iso(), "wall_s": round(wall, 3), "pairs_made": pairs_made,
           "pairs_per_s": round(pairs_made / wall, 3) if wall > 0 else 0.0,
           "worker_s": round(sum(r["seconds"] for r in results), 3),
           "shards_made": len(made_pairs), "shards_reused": len(done_pairs),
           "prompt_shards_made": len(made_prompts), "prompt_shards_reused": len(done_prompts),
           "num_actors": min(p.num_actors, len(tasks)) if tasks else 0, "report": report_path}
    manifest = build_manifest(spec=spec, digest=digest, identity=identity, source=source,
                              pair_records=pair_records, prompt_records=prompt_records,
                              num_prompts=len(prompts) if encoding["embeddings"] else 0, run=run)
    report = build_report(manifest, pair_records)
    write_json(report_path, report)
    write_json(uri.join(root, MANIFEST), manifest)  # last: a store without it is incomplete

    issues = merged_issues(pair_records)
    level = logging.WARNING if issues.errors else logging.INFO
    log.log(level, "store %s: %d pairs from %d rows in %d shards (%d made, %d reused), %.1f s, %.2f pairs/s;"
            " %s", root, manifest["pairs"], n, len(pair_plan), len(made_pairs), len(done_pairs), wall,
            run["pairs_per_s"], issues.summary() or "nothing dropped")
    if cfg.tracking.mlflow:
        try:
            _log_mlflow(cfg, manifest, report)
        except Exception as e:  # noqa: BLE001 - the store is written; tracking is a record of it
            log.warning("MLflow logging of the prepare failed: %s: %s", type(e).__name__, e)
    return manifest
