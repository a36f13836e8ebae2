"""A learner's data path at scale: peak memory, time to first step and steps/s at 10k, 100k and 300k pairs.

    .venv/bin/python benchmarks/data_scale.py                      # defaults: 10k,100k,300k pairs, 30 steps
    .venv/bin/python benchmarks/data_scale.py --pairs 200,400 --steps 2 --image-px 16 --skip-prepare \
        --rounds 1                                                  # smoke (tests/test_benchmarks.py)

Every row is one learner in a fresh subprocess (`--child` mode of this file, one intra-op thread) that
builds the trainer of `configs/tiny/dpo.yaml` with `diffalign.train.driver.build_trainer(cfg)` plus
`train.progress=false tracking.mlflow=false train.eval_every=0 data.heldout_pairs=0 guard.enabled=false`
(the guard off so that no step is skipped on the random store latents), steps once, then `--steps` more.
- `first_step_s`: from the start of `build_trainer` to the end of the first `train_step()` (imports
  excluded; `process_to_first_step_s` counts from the parent's launch of the process, interpreter and
  imports included). For the old path this holds its up-front read, decode and VAE encode of every pair.
- `steps_per_s`: the `--steps` steps after the first.
- `peak_rss_mib`: the child's `VmHWM` from `/proc/self/status` (not `ru_maxrss`, which survives exec and
  reports the parent's peak): libraries, model, optimizer state and data together.
The steps/s comparison with the in-memory path is also made in one process (`--interleaved-steps`):
the in-memory learner and the store and raw learners at its size and at the largest, stepped
round-robin with the order rotating each round as the other CPU benchmarks do, so that other work on
the machine slows them alike (`interleaved_median_step_ms` on those rows).
Each row runs `--rounds` times (default 3; the rounds after the first interleaved over all rows, in a
different order each): on a small shared machine other work slows single runs by up to 2x, so a row's
times are its best round's and its peak the highest; every round's figures are kept in the row's
"rounds". The data of every size stays on disk until the last round and the one-process comparison
(about 4.6 GB at the defaults).

Sources, per pair count in `--pairs`:
- `raw_parquet`: a Pick-a-Pic-style parquet (`diffalign.data.demo_files.write_pickapic_parquet`,
  `--image-px` JPEGs stored per row, row groups of `--row-group-size`), `data.kind=pickapic
  data.cache_latents=false`: read lazily a block of `data.read_block_rows` rows at a time
  (`diffalign.data.lazy.LazyPairs`, `diffalign.train.data_order.BlockOrder`), decoded and VAE-encoded
  per step. The same child then times the up-front check of the pre-lazy raw path
  (`PairStream.materialize()`: every row read, validated and decoded, the encoded rows kept) with its
  resident-set growth, the cost the lazy path removes (`upfront_check_s`, `upfront_check_mib`).
- `store`: a pair store of random bf16 latents with the tiny model's identity at its resolution
  (`write_demo_store`: both flips, mean + std, one prompt embedding per pair), `data.kind=store`, read by
  byte ranges.
- `in_memory`: the old path, `data.cache_latents=true` on the same parquet (`CachedPairs`: every pair
  read, decoded and VAE-encoded into float32 RAM when the trainer is built), only at sizes up to
  `--in-memory-max`.
At the largest size the store and raw sources also run with 2 learners: two concurrent children of rank
0 / 1 of world size 2 (`build_trainer(cfg, rank=r, world_size=2)`, no torch.distributed: only which
rows each reads changes); the row reports the max of their peaks, the slower one's steps/s and the rows
each read (`trainer.data_issues.rows_seen` for raw: rows read from the file and validated; distinct
pairs read for the store).

Prepare throughput (`--skip-prepare` skips it): the prepare job (`diffalign.actors.prepare.prepare_store`,
`configs/tiny/prepare.yaml`) on a `--prepare-pairs` parquet with 1 and 2 Ray Data actors, each in a child
that starts its own local Ray (own temp dir) and shuts it down after.

Results: `<out-dir>/data_scale-cpu.json`, a list of rows {source, pairs, bytes_per_pair, learners,
peak_rss_mib, first_step_s, steps_per_s, ...} (prepare rows have kind "prepare"), and `.md` beside it:
the table, the ratios against the targets, the extrapolation to Pick-a-Pic v2 at SD1.5 / SDXL size, the
prepare throughput, the machine and the command. Data goes under `--work-dir` (default a temp dir),
removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny" / "dpo.yaml"
PREPARE_CONFIG = REPO / "configs" / "tiny" / "prepare.yaml"
SOURCES = ("raw_parquet", "store", "in_memory")
ROW_KEYS = ("source", "pairs", "bytes_per_pair", "learners", "peak_rss_mib", "first_step_s", "steps_per_s")
MIB = 2**20

# Pick-a-Pic v2 and the SD models, for the extrapolation.
PICKAPIC_V2_PAIRS = 851_000
PICKAPIC_V2_PROMPTS = 58_960  # unique prompts in train: the figure recalled from Diffusion-DPO, unverified
MODELS = {  # name: (px, latent C, h, w, embedding tokens x width, pooled width)
    "SD1.5": (512, 4, 64, 64, (77, 768), 0),
    "SDXL": (1024, 4, 128, 128, (77, 2048), 1280),
}
TARGETS = {"store_rss": 1.2, "store_first_step": 1.5, "steps_vs_in_memory": 1.0}


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--pairs", default="10000,100000,300000", help="comma list of pair counts")
    p.add_argument("--steps", type=int, default=30, help="timed steps after the first")
    p.add_argument("--interleaved-steps", type=int, default=100,
                   help="round-robin steps per learner of the one-process steps/s comparison (0: skip)")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of each learner row (interleaved); times are the best round's")
    p.add_argument("--image-px", type=int, default=64, help="side of the parquet's JPEGs")
    p.add_argument("--row-group-size", type=int, default=512)
    p.add_argument("--distinct-images", type=int, default=64, help="JPEGs cycled through (stored per row)")
    p.add_argument("--in-memory-max", type=int, default=None,
                   help="largest pair count the in-memory path runs at (default: the smallest of --pairs)")
    p.add_argument("--no-upfront-check", dest="upfront_check", action="store_false",
                   help="skip timing the pre-lazy up-front check of the raw parquet")
    p.add_argument("--prepare-pairs", type=int, default=2000)
    p.add_argument("--prepare-actors", default="1,2")
    p.add_argument("--skip-prepare", action="store_true")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results")
    p.add_argument("--work-dir", default=None, help="where the data goes (default a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the data under --work-dir")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds per learner process")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None:
        args.pairs = sorted({int(x) for x in args.pairs.split(",") if x.strip()})
        if not args.pairs or min(args.pairs) < 16:
            p.error("--pairs takes pair counts >= 16")
        if args.in_memory_max is None:
            args.in_memory_max = args.pairs[0]
        args.prepare_actors = [int(x) for x in args.prepare_actors.split(",") if x.strip()]
    return args


# ----------------------------------------------------------------------------- children


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _learner_child(spec: dict) -> dict:
    """One learner: build, first step, `steps` more; its peak RSS; then the pre-lazy up-front check."""
    t_import = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from diffalign.config import load_config
    from diffalign.train.cache import CachedPairs
    from diffalign.train.driver import build_trainer

    cfg = load_config(str(CONFIG), spec["overrides"])
    rank, world, steps = spec["rank"], spec["world"], spec["steps"]
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, device="cpu", rank=rank, world_size=world)
    t_built = time.perf_counter()
    trainer.train_step()
    t1 = time.perf_counter()
    wall_first = time.time()
    step_s = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        ts = time.perf_counter()
        trainer.train_step()
        step_s.append(time.perf_counter() - ts)
    t2 = time.perf_counter()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    hwm = _vm_hwm_kib()
    positions = {i for k in range(steps + 1) for _, i in trainer.order.positions(k)}
    issues = trainer.data_issues
    data = trainer.train_data
    out = {
        "rank": rank, "world": world, "import_s": round(t0 - t_import, 3),
        "build_s": round(t_built - t0, 3),
        "first_step_s": round(t1 - t0, 3), "first_step_wall": wall_first,
        "steps_per_s": round(steps / (t2 - t1), 3) if steps else None,
        "median_step_ms": round(1e3 * statistics.median(step_s), 1) if steps else None,
        # minor page faults per timed step: memory the allocator maps afresh every step (see the README)
        "page_faults_per_step": round(faults / steps) if steps else None,
        "peak_rss_mib": round(hwm / 1024, 1),
        # Raw: rows read from the file and validated (whole blocks); store: distinct pairs read (the
        # trained ones, and pair 0, which build_trainer reads to see what the items hold).
        "rows_read": issues.rows_seen if issues is not None else len(positions | {0}),
        "rows_trained": len(positions), "rows_in_dataset": len(data),
        "rank_rows": sorted(positions) if spec.get("rank_rows") else None,
    }
    if isinstance(data, CachedPairs):
        out["cache_mib"] = round(data.nbytes / MIB, 1)
        out["prompt_cache_mib"] = round(getattr(trainer.setup.prompt_encoder, "nbytes", 0) / MIB, 1)
    if spec.get("upfront"):
        out.update(_upfront_check(cfg, trainer))
    trainer.close()
    return out


def _upfront_check(cfg, trainer) -> dict:
    """The raw path before lazy reads: every row read, validated and decoded when the dataset is opened,
    the encoded rows kept (`PairStream.materialize`); seconds and resident-set growth over the learner's."""
    import measure
    from diffalign.data.factory import open_pair_stream

    measure.release_freed_memory()
    reset = measure.reset_peak_rss()
    before = measure.rss_bytes()
    t0 = time.perf_counter()
    pairs = open_pair_stream(cfg).materialize()
    dt = time.perf_counter() - t0
    grown = (measure.peak_rss_bytes() - before) / MIB if reset else None
    return {"upfront_check_s": round(dt, 2), "upfront_check_rows": len(pairs),
            "upfront_check_mib": round(grown, 1) if grown is not None else None}


def _prepare_child(spec: dict) -> dict:
    """The prepare job with `actors` actors on its own local Ray (own temp dir), stopped after."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from diffalign.config import load_config

    cfg = load_config(str(PREPARE_CONFIG), spec["overrides"])
    tmp = tempfile.mkdtemp(prefix="ray-ds-", dir="/tmp")
    try:
        ray.init(address="local", num_cpus=max(4, spec["actors"] + 1), include_dashboard=False,
                 log_to_driver=False, object_store_memory=256 * MIB, _temp_dir=tmp,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        from diffalign.actors.prepare import prepare_store

        manifest = prepare_store(cfg, progress=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    root = Path(cfg.prepare.output)
    nbytes = sum(f.stat().st_size for f in root.iterdir() if f.suffix == ".safetensors")
    return {"pairs": manifest["pairs"], "store_bytes": nbytes, **manifest["run"]}


def _interleaved_child(spec: dict) -> dict:
    """Several learners in one process, stepped round-robin (the order rotating every round), so that
    load from other work on the machine hits each alike: their step-time ratios from one run."""
    import torch

    torch.set_num_threads(1)
    from diffalign.config import load_config
    from diffalign.train.driver import build_trainer

    trainers = {}
    for name, overrides in spec["learners"].items():
        trainers[name] = build_trainer(load_config(str(CONFIG), overrides), device="cpu")
        for _ in range(spec["warmup"]):
            trainers[name].train_step()
    names = list(trainers)
    times: dict[str, list[float]] = {k: [] for k in names}
    faults = dict.fromkeys(names, 0)
    for rnd in range(spec["steps"]):
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            trainers[name].train_step()
            times[name].append(time.perf_counter() - t0)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    for t in trainers.values():
        t.close()
    return {name: {"median_step_ms": round(1e3 * statistics.median(v), 2),
                   "mean_step_ms": round(1e3 * statistics.mean(v), 2), "steps": len(v),
                   "page_faults_per_step": round(faults[name] / len(v))}
            for name, v in times.items()}


def child_main(spec: dict) -> None:
    run = {"prepare": _prepare_child, "interleaved": _interleaved_child}.get(spec["mode"], _learner_child)
    print(json.dumps(run(spec)), flush=True)


def _spawn(spec: dict, log_path: Path) -> tuple[subprocess.Popen, float, object]:
    paths = (str(REPO / "platform"), os.environ.get("PYTHONPATH"))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in paths if p))
    log = open(log_path, "w")
    t = time.time()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO)
    return proc, t, log


def _collect(proc: subprocess.Popen, launched: float, log, log_path: Path, timeout: float) -> dict:
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
        log.close()
        return {"error": f"timed out after {timeout:.0f} s (log {log_path})"}
    log.close()
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            res = json.loads(line)
            if "first_step_wall" in res:
                res["process_to_first_step_s"] = round(res.pop("first_step_wall") - launched, 3)
            return res
    tail = " | ".join(Path(log_path).read_text().strip().splitlines()[-6:])
    return {"error": f"child exited {proc.returncode}: {tail}"}


def run_children(specs: list[dict], logs: list[Path], timeout: float) -> list[dict]:
    """Runs the children concurrently (one spec: alone) and returns their results in order."""
    started = [_spawn(s, lp) for s, lp in zip(specs, logs)]
    return [_collect(p, t, log, lp, timeout) for (p, t, log), lp in zip(started, logs)]


# ----------------------------------------------------------------------------- data


def tiny_bundle():
    import torch
    from diffalign.config import load_config
    from diffalign.models.build import build_policy

    cfg = load_config(str(CONFIG), [])
    torch.manual_seed(cfg.train.seed)
    return cfg, build_policy(cfg)[0]


def photo_like_jpeg(px: int, seed: int = 0) -> bytes:
    """`fixtures.photo_like_jpeg` (the recipe of data_pipeline.py) from `seed`: about 70 KiB at 512 px,
    unlike the demo files' noise images."""
    import fixtures
    import numpy as np

    return fixtures.photo_like_jpeg(px, np.random.default_rng(seed))


def decode_costs(image_px: int, reps: int = 20) -> dict:
    """Median seconds of one `decode_image` and the bytes of one JPEG: the benchmark's demo image
    (noise) at `image_px`, and photo-like JPEGs at 512 and 1024 px (what an up-front check of real
    Pick-a-Pic rows decodes; real images differ)."""
    from diffalign.data.demo_files import demo_images
    from diffalign.data.transforms import decode_image

    def cost(data: bytes) -> dict:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            decode_image(data)
            times.append(time.perf_counter() - t0)
        return {"decode_s": statistics.median(times), "bytes": len(data)}

    return {"demo": {"px": image_px, **cost(demo_images(1, image_px, red=True, seed=0)[0])},
            **{f"photo_{px}": {"px": px, **cost(photo_like_jpeg(px))} for px in (512, 1024)}}


def dir_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


def learner_overrides(source: str, path: Path, out: Path, steps: int) -> list[str]:
    base = [f"train.output_dir={out}", "train.progress=false", "tracking.mlflow=false",
            "train.eval_every=0", "data.heldout_pairs=0", "guard.enabled=false",
            f"train.max_steps={steps + 1}"]
    if source == "store":
        return [*base, "data.kind=store", f"data.path={path}"]
    cache = "true" if source == "in_memory" else "false"
    return [*base, "data.kind=pickapic", f"data.path={path}", f"data.cache_latents={cache}"]


# ----------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.own_work = args.work_dir is None
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="data_scale-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.rows: list[dict] = []
        self.data: dict[int, dict] = {}  # pairs -> what was written
        self.meta: dict = {}
        self.decode: dict | None = None
        self.timing_notes: list[str] = []

    def say(self, msg: str) -> None:
        print(f"[data_scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # ------------------------------------------------------------------------- data

    def write_data(self, n: int, bundle, resolution: int) -> dict:
        from diffalign.data.demo_files import write_demo_store, write_pickapic_parquet

        a = self.args
        parquet = self.work / f"pickapic-{n}.parquet"
        t0 = time.perf_counter()
        info = write_pickapic_parquet(parquet, n, image_size=a.image_px, row_group_size=a.row_group_size,
                                      distinct_images=min(a.distinct_images, n))
        t_pq = time.perf_counter() - t0
        store = self.work / f"store-{n}"
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        write_demo_store(str(store), bundle, pairs=n, resolution=resolution, shard_rows=4096,
                         dtype="bfloat16")
        t_st = time.perf_counter() - t0
        d = {"parquet": parquet, "store": store, "parquet_info": info,
             "parquet_file_bytes": parquet.stat().st_size, "store_bytes": dir_bytes(store),
             "parquet_write_s": round(t_pq, 1), "store_write_s": round(t_st, 1)}
        self.say(f"{n} pairs: parquet {d['parquet_file_bytes'] / MIB:.0f} MiB in {t_pq:.0f} s, "
                 f"store {d['store_bytes'] / MIB:.0f} MiB in {t_st:.0f} s")
        self.data[n] = d
        return d

    def _drop(self, n: int) -> None:
        d = self.data.get(n)
        if d is None or d.get("dropped"):
            return
        d["parquet"].unlink(missing_ok=True)
        shutil.rmtree(d["store"], ignore_errors=True)
        d["dropped"] = True

    # ------------------------------------------------------------------------- learner rows

    def _learners(self, source: str, n: int, learners: int, rnd: int) -> tuple[list[dict], float]:
        """Runs `learners` concurrent learner processes of `source` at `n` pairs (round `rnd`)."""
        a, d = self.args, self.data[n]
        path = d["store"] if source == "store" else d["parquet"]
        tag = f"{source}-{n}-x{learners}"
        specs, logs = [], []
        for r in range(learners):
            out = self.work / "runs" / f"{tag}-r{r}-{rnd}"
            specs.append({"mode": "learner", "overrides": learner_overrides(source, path, out, a.steps),
                          "rank": r, "world": learners, "steps": a.steps, "rank_rows": learners > 1,
                          "upfront": (source == "raw_parquet" and learners == 1 and a.upfront_check
                                      and rnd == 1)})
            logs.append(self.logs / f"{tag}-r{r}-{rnd}.log")
        self.say(f"{tag}, round {rnd}: {learners} learner(s) ...")
        t0 = time.perf_counter()
        results = run_children(specs, logs, a.child_timeout)
        return results, time.perf_counter() - t0

    @staticmethod
    def _round(results: list[dict], wall: float) -> dict:
        """One round of a row: the max over its ranks of peaks and times, the slower rank's steps/s
        (the slower rank gates a synchronized step)."""
        rates = [r["steps_per_s"] for r in results]
        medians = [r["median_step_ms"] for r in results]
        return {"peak_rss_mib": max(r["peak_rss_mib"] for r in results),
                "page_faults_per_step": max(r["page_faults_per_step"] or 0 for r in results),
                "first_step_s": max(r["first_step_s"] for r in results),
                "steps_per_s": min(rates) if None not in rates else None,
                "median_step_ms": max(medians) if None not in medians else None,
                **{k: max(r[k] for r in results) for k in ("import_s", "build_s", "process_to_first_step_s")},
                "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in results],
                "steps_per_s_per_rank": rates, "wall_s": round(wall, 1)}

    @staticmethod
    def _best(row: dict) -> None:
        """The row's figures over its rounds: the best time (the least disturbed by other work on the
        machine) and the highest peak."""
        rounds = row["rounds"]

        def pick(key, fn):
            vals = [r[key] for r in rounds if r.get(key) is not None]
            return fn(vals) if vals else None

        row.update(peak_rss_mib=pick("peak_rss_mib", max), first_step_s=pick("first_step_s", min),
                   steps_per_s=pick("steps_per_s", max), median_step_ms=pick("median_step_ms", min),
                   process_to_first_step_s=pick("process_to_first_step_s", min),
                   import_s=pick("import_s", min), build_s=pick("build_s", min),
                   page_faults_per_step=pick("page_faults_per_step", statistics.median))
        if row["learners"] > 1:
            best = max(rounds, key=lambda r: r["steps_per_s"] or 0)
            per_rank = zip(*[r["peak_rss_mib_per_rank"] for r in rounds])
            row["peak_rss_mib_per_rank"] = [max(v) for v in per_rank]
            row["steps_per_s_per_rank"] = best["steps_per_s_per_rank"]

    def learner_row(self, source: str, n: int, learners: int = 1) -> dict:
        a, d = self.args, self.data[n]
        store = source == "store"
        results, wall = self._learners(source, n, learners, 1)
        per_pair = d["store_bytes"] / n if store else d["parquet_info"]["bytes_per_pair"]
        row = {"kind": "learner", "source": source, "pairs": n, "bytes_per_pair": round(per_pair, 1),
               "learners": learners, "image_px": a.image_px,
               "data_mib": round((d["store_bytes"] if store else d["parquet_file_bytes"]) / MIB, 1)}
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            row.update(peak_rss_mib=None, first_step_s=None, steps_per_s=None, error="; ".join(errors))
            self.say(f"{row['source']}-{n}-x{learners}: FAILED {row['error']}")
            return self._add(row)
        row.update(rows_read_per_rank=[r["rows_read"] for r in results],
                   rows_trained_per_rank=[r["rows_trained"] for r in results],
                   rows_in_dataset_per_rank=[r["rows_in_dataset"] for r in results],
                   rounds=[self._round(results, wall)])
        if learners > 1:
            shared = set.intersection(*[set(r["rank_rows"]) for r in results])
            row["rows_trained_shared_by_ranks"] = len(shared)
        for key in ("cache_mib", "prompt_cache_mib", "upfront_check_s", "upfront_check_mib",
                    "upfront_check_rows"):
            if key in results[0]:
                row[key] = results[0][key]
        self._best(row)
        self._report(row, wall)
        return self._add(row)

    def rerun(self, row: dict, rnd: int) -> None:
        """Another round of a learner row: times again, the figures become the best over the rounds."""
        results, wall = self._learners(row["source"], row["pairs"], row["learners"], rnd)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            row.setdefault("round_errors", []).append("; ".join(errors))
            self.say(f"{row['source']}-{row['pairs']}-x{row['learners']}, round {rnd}: FAILED {errors}")
        else:
            row["rounds"].append(self._round(results, wall))
            self._best(row)
            self._report(row, wall)
        self.save()

    def _report(self, row: dict, wall: float) -> None:
        tag = f"{row['source']}-{row['pairs']}-x{row['learners']}"
        last = row["rounds"][-1]
        self.say(f"{tag}: this round peak {last['peak_rss_mib']} MiB, first step {last['first_step_s']} s, "
                 f"{last['steps_per_s']} steps/s, wall {wall:.0f} s; best {row['steps_per_s']} steps/s; "
                 f"rows read {row['rows_read_per_rank']}")
        if wall > 300:
            self.timing_notes.append(f"{tag} round {len(row['rounds'])} took {wall:.0f} s (over 5 min)")

    def _add(self, row: dict) -> dict:
        self.rows.append(row)
        self.save()
        return row

    def interleaved(self) -> None:
        """The steps/s comparison again with the learners in one process, stepped round-robin: the
        in-memory path at its size against the store and the raw parquet at that size and the largest.
        Adds `interleaved_median_step_ms` and `interleaved_steps_per_s` to those rows."""
        a = self.args
        mem = _find(self.rows, "in_memory")
        if mem is None:
            return
        wanted = [("in_memory", mem["pairs"]), ("store", mem["pairs"]), ("raw_parquet", mem["pairs"]),
                  ("store", a.pairs[-1]), ("raw_parquet", a.pairs[-1])]
        learners = {}
        for source, n in dict.fromkeys(wanted):
            d = self.data[n]
            path = d["store"] if source == "store" else d["parquet"]
            out = self.work / "runs" / f"il-{source}-{n}"
            learners[f"{source}-{n}"] = learner_overrides(source, path, out, a.interleaved_steps + 3)
        self.say(f"interleaved: {', '.join(learners)}, {a.interleaved_steps} round-robin steps each ...")
        spec = {"mode": "interleaved", "learners": learners, "warmup": 2, "steps": a.interleaved_steps}
        (res,) = run_children([spec], [self.logs / "interleaved.log"], a.child_timeout)
        if "error" in res:
            self.say(f"interleaved: FAILED {res['error']}")
            self.interleaved_error = res["error"]
            return
        for name, r in res.items():
            source, n = name.rsplit("-", 1)
            row = _find(self.rows, source, int(n))
            row["interleaved_median_step_ms"] = r["median_step_ms"]
            row["interleaved_steps_per_s"] = round(1e3 / r["median_step_ms"], 3)
            row["interleaved_steps"] = r["steps"]
            row["interleaved_page_faults_per_step"] = r["page_faults_per_step"]
        self.say("interleaved: " + ", ".join(f"{k} {v['median_step_ms']} ms" for k, v in res.items()))
        self.save()

    # ------------------------------------------------------------------------- prepare rows

    def prepare_rows(self) -> None:
        from diffalign.data.demo_files import write_pickapic_parquet

        a, n = self.args, self.args.prepare_pairs
        base = {"kind": "prepare", "source": "prepare", "pairs": n, "learners": 0, "peak_rss_mib": None,
                "first_step_s": None, "steps_per_s": None, "image_px": a.image_px}
        try:
            import diffalign.actors.prepare as prep

            why = None if hasattr(prep, "prepare_store") else "diffalign.actors.prepare has no prepare_store"
        except Exception as e:  # noqa: BLE001 - reported as the reason the rows are absent
            why = f"diffalign.actors.prepare not importable: {type(e).__name__}: {e}"
        if why is not None:
            for k in a.prepare_actors:
                self._add({**base, "actors": k, "bytes_per_pair": None, "pairs_per_s": None, "absent": why})
            self.say(f"prepare rows absent: {why}")
            return
        parquet = self.work / f"prepare-source-{n}.parquet"
        write_pickapic_parquet(parquet, n, image_size=a.image_px, row_group_size=min(a.row_group_size, 256),
                               distinct_images=min(a.distinct_images, n))
        shard_rows = max(16, -(-n // 8))  # 8 pair shards: work for 2 actors at once
        for k in a.prepare_actors:
            out = self.work / f"prepare-store-{n}-x{k}"
            shutil.rmtree(out, ignore_errors=True)
            overrides = [f"data.path={parquet}", f"prepare.output={out}", f"prepare.num_actors={k}",
                         f"prepare.shard_rows={shard_rows}", "prepare.cpus_per_actor=1",
                         "tracking.mlflow=false", "train.progress=false",
                         f"train.output_dir={self.work / 'runs' / f'prepare-x{k}'}"]
            self.say(f"prepare {n} pairs with {k} actor(s) ...")
            t0 = time.perf_counter()
            (res,) = run_children([{"mode": "prepare", "overrides": overrides, "actors": k}],
                                  [self.logs / f"prepare-x{k}.log"], a.child_timeout)
            row = {**base, "actors": k, "shard_rows": shard_rows,
                   "process_wall_s": round(time.perf_counter() - t0, 1)}
            if "error" in res:
                row.update(bytes_per_pair=None, pairs_per_s=None, absent=res["error"])
                self.say(f"prepare x{k}: FAILED {res['error']}")
                self._add(row)
                continue
            made, shard_s, pool = res["pairs_made"], res["worker_s"], max(1, res["num_actors"])
            row.update(bytes_per_pair=round(res["store_bytes"] / max(1, res["pairs"]), 1),
                       pairs_per_s=res["pairs_per_s"], wall_s=res["wall_s"], worker_s=shard_s,
                       pairs_made=made, shards_made=res["shards_made"],
                       prompt_shards_made=res.get("prompt_shards_made"))
            if shard_s:
                row.update(encode_pairs_per_s_per_actor=round(made / shard_s, 2),
                           # the pool's rate once its actors run: the shard seconds split over the actors
                           steady_pairs_per_s=round(made * pool / shard_s, 2),
                           startup_s=round(res["wall_s"] - shard_s / pool, 1))
            self.say(f"prepare x{k}: {row['pairs_per_s']} pairs/s ({row['wall_s']} s)")
            self._add(row)

    # ------------------------------------------------------------------------- the run

    def run(self) -> None:
        a = self.args
        cfg, bundle = tiny_bundle()
        resolution = cfg.model.resolution
        d = cfg.data
        self.meta = {"resolution": resolution, "batch_size": cfg.optim.batch_size,
                     "read_block_rows": d.read_block_rows, "shuffle_blocks": d.shuffle_blocks,
                     "latent_sampling": d.latent_sampling, "random_flip": d.random_flip}
        self.decode = decode_costs(a.image_px)
        largest = a.pairs[-1]
        try:
            for n in a.pairs:
                self.write_data(n, bundle, resolution)
                self.learner_row("raw_parquet", n)
                self.learner_row("store", n)
                if n <= a.in_memory_max:
                    self.learner_row("in_memory", n)
                if n == largest:
                    self.learner_row("store", n, learners=2)
                    self.learner_row("raw_parquet", n, learners=2)
                if not a.keep and a.rounds == 1 and not a.interleaved_steps:
                    self._drop(n)  # nothing reads this size again
            # Further rounds, each in another order, so that load from other work on the machine at one
            # moment does not decide a row's time.
            todo = [r for r in self.rows if r.get("kind") == "learner" and "rounds" in r]
            for rnd in range(2, a.rounds + 1):
                shift = (rnd - 1) * max(1, len(todo) // a.rounds)
                order = todo[shift:] + todo[:shift]
                for row in (order if rnd % 2 else order[::-1]):
                    self.rerun(row, rnd)
            if a.interleaved_steps:
                self.interleaved()
            if not a.keep:
                for n in list(self.data):
                    self._drop(n)
            if not a.skip_prepare:
                self.prepare_rows()
        finally:
            self.save()
            if not a.keep:
                for n in list(self.data):
                    self._drop(n)
                if self.own_work:
                    shutil.rmtree(self.work, ignore_errors=True)
                else:
                    for p in self.work.glob("prepare-*"):
                        if p.is_dir():
                            shutil.rmtree(p, ignore_errors=True)
                        else:
                            p.unlink()
                    shutil.rmtree(self.work / "runs", ignore_errors=True)

    def save(self) -> None:
        import measure

        out = Path(self.args.out_dir) if self.args.out_dir else measure.RESULTS_DIR
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_scale-cpu.json").write_text(json.dumps(self.rows, indent=1, default=str) + "\n")
        (out / "data_scale-cpu.md").write_text(render_markdown(self))


# ----------------------------------------------------------------------------- the report


def _find(rows: list[dict], source: str, pairs: int | None = None, learners: int = 1) -> dict | None:
    for r in rows:
        if (r.get("kind") == "learner" and r["source"] == source and r["learners"] == learners
                and (pairs is None or r["pairs"] == pairs) and r.get("peak_rss_mib") is not None):
            return r
    return None


def _get(row: dict | None, key: str) -> float | None:
    return None if row is None else row.get(key)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _verdict(x: float | None, target: float, at_most: bool) -> str:
    if x is None:
        return "not measured"
    ok = x <= target if at_most else x >= target
    return ("met" if ok else "**missed**") + f" ({'<=' if at_most else '>='} {target:g})"


def ratios(rows: list[dict], pairs: list[int]) -> list[dict]:
    """The ratios the targets name, for the store and the raw parquet."""
    small, large = pairs[0], pairs[-1]
    mem = _find(rows, "in_memory")
    out = []

    def add(what, value, target, at_most=True):
        out.append({"what": what, "value": value, "target": target, "at_most": at_most})

    for src in ("store", "raw_parquet"):
        s, lg = _find(rows, src, small), _find(rows, src, large)
        add(f"{src}: peak learner RSS, {large:,} / {small:,} pairs",
            _ratio(_get(lg, "peak_rss_mib"), _get(s, "peak_rss_mib")), TARGETS["store_rss"])
        add(f"{src}: time to first step, {large:,} / {small:,} pairs",
            _ratio(_get(lg, "first_step_s"), _get(s, "first_step_s")), TARGETS["store_first_step"])
        if mem is None:
            continue
        m = mem["pairs"]
        same = _find(rows, src, m)
        if _get(mem, "interleaved_median_step_ms") is not None:
            add(f"{src} steps/s at {large:,} pairs / in_memory at {m:,}, one process, round-robin",
                _ratio(_get(mem, "interleaved_median_step_ms"), _get(lg, "interleaved_median_step_ms")),
                TARGETS["steps_vs_in_memory"], False)
            if m != large:
                add(f"the same, both at {m:,} pairs",
                    _ratio(_get(mem, "interleaved_median_step_ms"), _get(same, "interleaved_median_step_ms")),
                    TARGETS["steps_vs_in_memory"], False)
        add(f"{src} steps/s at {large:,} pairs / in_memory steps/s at {m:,} pairs, separate processes",
            _ratio(_get(lg, "steps_per_s"), mem["steps_per_s"]), TARGETS["steps_vs_in_memory"], False)
        add(f"the same from median step times ({large:,} vs {m:,} pairs)",
            _ratio(_get(mem, "median_step_ms"), _get(lg, "median_step_ms")), TARGETS["steps_vs_in_memory"],
            False)
        if m != large:
            add(f"{src} / in_memory steps/s, both at {m:,} pairs",
                _ratio(_get(same, "steps_per_s"), mem["steps_per_s"]), TARGETS["steps_vs_in_memory"], False)
        add(f"{src} / in_memory time to first step, both at {m:,} pairs",
            _ratio(_get(same, "first_step_s"), mem["first_step_s"]), None)
    return out


def _gib(b: float) -> str:
    return f"{b / 2**30:,.1f} GiB"


def _store_sizes() -> tuple[list[str], dict]:
    n, u = PICKAPIC_V2_PAIRS, PICKAPIC_V2_PROMPTS
    lines = ["| model | latents | per pair, both flips, mean + std | without flips | whole store, flips | "
             "without flips | prompt embedding (bf16) | all prompts |", "|---|---|---|---|---|---|---|---|"]
    per = {}
    for name, (px, c, h, w, (tok, width), pooled) in MODELS.items():
        lat = c * h * w
        flips, noflip = 2 * 2 * 2 * lat * 2, 1 * 2 * 2 * lat * 2
        emb = tok * width * 2 + pooled * 2
        per[name] = {"lat": lat, "flips": flips, "noflip": noflip, "emb": emb}
        emb_formula = f"{tok}x{width}x2" + (f" + {pooled}x2" if pooled else "")
        lines.append(
            f"| {name} ({px} px) | {c}x{h}x{w} | 2x2x2x{lat:,}x2 = {flips:,} B ({flips // 1024:,} KiB) | "
            f"1x2x2x{lat:,}x2 = {noflip:,} B ({noflip // 1024:,} KiB) | {n:,} x {flips // 1024:,} KiB = "
            f"{_gib(n * flips)} | {n:,} x {noflip // 1024:,} KiB = {_gib(n * noflip)} | "
            f"{emb_formula} = {emb:,} B ({emb / 1024:,.1f} KiB) | {u:,} x {emb / 1024:,.1f} KiB = "
            f"{_gib(u * emb)} |")
    return lines, per


def _upfront_lines(rows: list[dict], decode: dict | None) -> list[str]:
    n = PICKAPIC_V2_PAIRS
    up = [r for r in rows if r.get("kind") == "learner" and r["source"] == "raw_parquet"
          and r["learners"] == 1 and r.get("upfront_check_s") is not None]
    if not up:
        return []
    lines = ["", "### The up-front check the lazy raw path removes", "",
             "Before lazy reads, opening raw files ran `PairStream.materialize()`: every row read, validated "
             "and decoded, its encoded images kept in RAM, before the first step, on every learner. Measured "
             "here in the raw-parquet learner process after its steps (seconds; resident-set growth):", "",
             "| pairs | seconds | us per pair | resident-set growth | per pair |", "|---|---|---|---|---|"]
    for r in up:
        mib, k = r.get("upfront_check_mib"), r["pairs"]
        grown = "—" if mib is None else f"{mib:,.0f} MiB"
        each = "—" if mib is None else f"{mib * MIB / k:,.0f} B"
        lines.append(f"| {k:,} | {r['upfront_check_s']:.1f} | {1e6 * r['upfront_check_s'] / k:.0f} | {grown} "
                     f"| {each} |")
    last = up[-1]
    us = 1e6 * last["upfront_check_s"] / last["pairs"]
    lines += ["", f"At {n:,} pairs of these {last.get('image_px')} px JPEGs ({last['bytes_per_pair']:,.0f} B "
              f"of images per pair): {n:,} x {us:.0f} us = {n * us / 1e6 / 60:.1f} min."]
    if decode:
        demo = decode["demo"]
        lines += ["", "Real images are larger. One `decode_image` (median of 20 here):", "",
                  "| image | bytes | ms per decode |", "|---|---|---|",
                  f"| the benchmark's demo image, {demo['px']} px (noise) | {demo['bytes']:,} | "
                  f"{1e3 * demo['decode_s']:.2f} |"]
        for key in ("photo_512", "photo_1024"):
            d = decode[key]
            lines.append(f"| photo-like JPEG, {d['px']} px (smooth texture, q90) | {d['bytes']:,} | "
                         f"{1e3 * d['decode_s']:.2f} |")
        lines += ["", "The check over real-size rows, per pair = measured per pair - 2 demo decodes + 2 "
                  "photo-like decodes; memory = 2 x the JPEG's bytes per pair (an illustration: real "
                  "Pick-a-Pic images are neither these sizes nor all JPEG):", ""]
        for key in ("photo_512", "photo_1024"):
            d = decode[key]
            t = us * 1e-6 - 2 * demo["decode_s"] + 2 * d["decode_s"]
            lines.append(f"- {d['px']} px: {n:,} x ({us:.0f} - 2 x {1e6 * demo['decode_s']:.0f} + 2 x "
                         f"{1e6 * d['decode_s']:.0f} us) = {n * t / 60:,.0f} min ({n * t / 3600:.1f} h) per "
                         f"learner, holding {n:,} x 2 x {d['bytes'] / 1024:,.0f} KiB = "
                         f"{_gib(n * 2 * d['bytes'])} per learner.")
    lines += ["", "The lazy path reads and checks a row when a step first asks for it: the first step reads "
              "the blocks of its rows only, and a rank only its own part's blocks."]
    return lines


def extrapolation(rows: list[dict], pairs: list[int], meta: dict, decode: dict | None) -> str:
    n, u = PICKAPIC_V2_PAIRS, PICKAPIC_V2_PROMPTS
    table, per = _store_sizes()
    lines = [f"## Extrapolation to Pick-a-Pic v2 ({n:,} pairs)", "",
             f"Unique prompts: **N = {u:,} (unverified)**: the train-split count recalled from the "
             "Diffusion-DPO paper, not checked against the dataset card here; the prompt part scales with "
             "N (N x 77 x 768 x 2 B for SD1.5, N x (77 x 2048 + 1280) x 2 B for SDXL), the pair part does "
             "not.", "",
             "Per pair a bf16 store keeps views x [chosen, rejected] x moments x C x h x w x 2 bytes (views "
             "2 with both flips, 1 without; moments 2: mean + std, for `latent_sampling: sample`), plus ~40 "
             "bytes of prompt text, source index and prompt id (SDXL: + views x 4 int64 sizes).", "",
             *table, "",
             "### Memory per learner", "",
             "The in-memory path (`data.cache_latents=true`, `CachedPairs`) holds float32 latents, 8 per "
             "pair with flips and sampling (2 views x 2 images x mean + std), in every learner's RAM, plus "
             "the prompt-embedding cache (`CachedPromptEncoder`, one row per unique prompt, on the training "
             "device):", "",
             "| model | per pair | per learner, all pairs | prompt cache (bf16) |", "|---|---|---|---|"]
    for name, p in per.items():
        fp32 = 8 * p["lat"] * 4
        lines.append(f"| {name} | 8x{p['lat']:,}x4 = {fp32:,} B ({fp32 // 1024:,} KiB) | {n:,} x "
                     f"{fp32 // 1024:,} KiB = {_gib(n * fp32)} | {u:,} x {p['emb'] / 1024:,.1f} KiB = "
                     f"{_gib(u * p['emb'])} |")
    sd, xl = per["SD1.5"]["flips"], per["SDXL"]["flips"]
    bsz = meta.get("batch_size", 8)
    lines += ["", "The store path holds what a step reads, not the dataset. `PairStore.item` reads one "
              "pair's whole latent row by a byte range (both views and both moments: the bf16 per-pair size "
              f"above) and converts it to float32 before sampling one view, so a micro-batch of {bsz} pairs "
              f"holds {bsz} x 3 x the bf16 row (SD1.5: {bsz} x 3 x {sd // 1024} KiB = "
              f"{bsz * 3 * sd / MIB:.0f} MiB, SDXL {bsz * 3 * xl / MIB:.0f} MiB) plus its prompt embeddings; "
              f"the batch order holds one int64 per pair ({n:,} x 8 B = {n * 8 / MIB:.1f} MiB). Both are "
              "independent of the latent cache's N x per-pair term above."]
    small, large = pairs[0], pairs[-1]
    for src, label in (("store", "Store"), ("raw_parquet", "Raw parquet, lazy")):
        s, lg = _find(rows, src, small), _find(rows, src, large)
        if s and lg and large > small:
            slope = (lg["peak_rss_mib"] - s["peak_rss_mib"]) / (large - small)
            lines.append(f"- {label}, measured (tiny model: libraries + model + optimizer dominate): peak "
                         f"RSS {s['peak_rss_mib']:.0f} MiB at {small:,} pairs, {lg['peak_rss_mib']:.0f} MiB "
                         f"at {large:,}: {slope * 1e5:+.1f} MiB per 100k pairs, {slope * n:+.0f} MiB at "
                         f"{n:,} if it were linear in N.")
    rb, sb = meta.get("read_block_rows", 256), meta.get("shuffle_blocks", 4)
    held = rb * (sb + 1)
    text = (f"- The lazy raw path keeps at most `data.shuffle_blocks + 1` = {sb + 1} read blocks of "
            f"`data.read_block_rows` = {rb} rows of encoded images: {held:,} rows x the source's bytes per "
            "pair")
    if decode:
        b5, b10 = decode["photo_512"]["bytes"], decode["photo_1024"]["bytes"]
        text += (f" (with the photo-like JPEGs below: {held:,} x 2 x {b5 / 1024:.0f} KiB = "
                 f"{held * 2 * b5 / MIB:.0f} MiB at 512 px, {held * 2 * b10 / MIB:.0f} MiB at 1024 px)")
    lines.append(text + ", whatever N.")
    lines += _upfront_lines(rows, decode)
    return "\n".join(lines)


def _learner_table(learners: list[dict]) -> str:
    import measure

    cols = [("source", "source"), ("pairs", "pairs"), ("learners", "learners"),
            ("bytes_per_pair", "bytes/pair", 0), ("data_mib", "data MiB", 0),
            ("peak_rss_mib", "peak RSS MiB", 0),
            ("first_step_s", "first step s", 2), ("steps_per_s", "steps/s", 2),
            ("median_step_ms", "median step ms", 1),
            ("page_faults_per_step", "page faults per step", 0),
            ("interleaved_median_step_ms", "one-process median step ms", 1),
            ("process_to_first_step_s", "launch to first step s", 1),
            ("rows_read", "rows read per rank"), ("notes", "notes")]
    table = []
    for r in learners:
        t = dict(r)
        t["rows_read"] = ", ".join(f"{x:,}" for x in r.get("rows_read_per_rank", [])) or None
        notes = []
        if r.get("cache_mib") is not None:
            notes.append(f"latent cache {r['cache_mib']} MiB, prompt cache {r.get('prompt_cache_mib')} MiB")
        if r.get("upfront_check_s") is not None:
            notes.append(f"up-front check {r['upfront_check_s']} s, +{r.get('upfront_check_mib')} MiB")
        if r.get("peak_rss_mib_per_rank"):
            notes.append(f"per rank: {r['peak_rss_mib_per_rank']} MiB, {r['steps_per_s_per_rank']} steps/s")
        if r.get("error"):
            notes.append("FAILED: " + r["error"][:300])
        t["notes"] = "; ".join(notes) or None
        table.append(t)
    return measure.markdown_table(table, cols)


def _prepare_section(prep: list[dict], args: argparse.Namespace) -> list[str]:
    import measure

    lines = ["", "## Prepare throughput", "",
             f"`diffalign.actors.prepare.prepare_store` with `configs/tiny/prepare.yaml` (tiny VAE + text "
             f"encoder, 32 px, both flips, mean + std, bf16) over a {prep[0]['pairs']:,}-pair parquet of "
             f"{args.image_px} px JPEGs in {prep[0].get('shard_rows', '?')}-row shards, each run on its own "
             "local Ray (a Ray Data actor pool of that size, 1 CPU per actor). `pairs/s`: pairs made / the "
             "job's wall time (Ray Data start-up, the actors building their encoders and the identity task "
             "included); `encode pairs/s per actor`: pairs / the actors' summed shard seconds; `steady "
             "pairs/s`: pairs x actors / summed shard seconds, the pool's rate once it runs; `start-up s`: "
             "job wall time - shard seconds / actors.", ""]
    lines += [f"- {r['actors']} actor(s): absent ({r['absent']})" for r in prep if r.get("absent")]
    ok = [r for r in prep if not r.get("absent")]
    if not ok:
        return lines
    lines.append(measure.markdown_table(ok, [
        ("actors", "actors"), ("pairs", "pairs"), ("pairs_per_s", "pairs/s", 1), ("wall_s", "job wall s", 1),
        ("worker_s", "actor shard s", 1), ("encode_pairs_per_s_per_actor", "encode pairs/s per actor", 1),
        ("steady_pairs_per_s", "steady pairs/s", 1), ("startup_s", "start-up s", 1),
        ("bytes_per_pair", "store bytes/pair", 0)]))
    one = next((r for r in ok if r["actors"] == 1), None)
    for r in ok:
        if one is None or r is one or not one.get("pairs_per_s"):
            continue
        steady = ""
        if r.get("steady_pairs_per_s") and one.get("steady_pairs_per_s"):
            steady = f", steady {r['steady_pairs_per_s'] / one['steady_pairs_per_s']:.2f}x"
        lines.append(f"\n{r['actors']} actors / 1 actor: {r['pairs_per_s'] / one['pairs_per_s']:.2f}x end to "
                     f"end{steady} (on {os.cpu_count()} cores shared with other work).")
    return lines


def render_markdown(bench: Bench) -> str:
    import measure

    rows, args, m = bench.rows, bench.args, bench.meta
    learners = [r for r in rows if r.get("kind") == "learner"]
    parts = [
        "One learner per row, each in a fresh process: the tiny model of `configs/tiny/dpo.yaml` "
        f"({m.get('resolution', '?')} px, batch {m.get('batch_size', '?')} pairs, full fine-tune, DPO with a "
        f"frozen colocated reference, `latent_sampling={m.get('latent_sampling', '?')}`, one intra-op "
        f"thread); build, first step, {args.steps} timed steps. Raw parquet: {args.image_px} px JPEGs "
        f"stored per row, row groups of {args.row_group_size}, read in blocks of `data.read_block_rows="
        f"{m.get('read_block_rows', '?')}`, `data.shuffle_blocks={m.get('shuffle_blocks', '?')}`. Store: "
        "bf16 random latents, both flips, mean + std, one prompt embedding per pair. `first step s`: start "
        "of `build_trainer` to the end of the first step; `launch to first step s` adds the interpreter and "
        "imports. `steps/s`: the timed steps over their total time; `median step ms`: their median. Each "
        f"row ran {args.rounds} time(s), the rounds interleaved over the rows; the times are the best "
        "round's (the least disturbed by other work on this shared machine; every round is in the JSON), "
        "the peak the highest. `one-process median step ms`: the in-memory path and the store and raw "
        "parquet at its size and at the largest, built in one process and stepped round-robin (the order "
        f"rotating every round, {args.interleaved_steps} steps each), so that load from other work hits "
        "them alike: the steps/s ratios against the in-memory path come from it first. `page faults per "
        "step`: minor page faults over the timed steps / steps (median of the rounds). Peak "
        "RSS: the process's `VmHWM` (libraries, model, optimizer, data). Rows read: raw, rows read from the "
        "file and validated (`data_issues.rows_seen`: whole blocks); store, distinct pairs read.", "",
        _learner_table(learners), "",
        "## Ratios against the targets", "",
        "| ratio | value | target |", "|---|---|---|",
    ]
    for q in ratios(rows, args.pairs):
        val = "—" if q["value"] is None else f"{q['value']:.2f}"
        tgt = "(for reference)" if q["target"] is None else _verdict(q["value"], q["target"], q["at_most"])
        parts.append(f"| {q['what']} | {val} | {tgt} |")
    singles = [r for r in learners if r["learners"] == 1 and len(r.get("rounds", [])) > 1]
    if singles:
        spread = max(max(x["steps_per_s"] for x in r["rounds"]) / min(x["steps_per_s"] for x in r["rounds"])
                     for r in singles)
        faults = ", ".join(f"{r['source']} {r['pairs']:,}: {r.get('page_faults_per_step')}" for r in singles)
        parts += ["", " ".join([
            f"The separate-process step times varied up to {spread:.1f}x between the rounds of one row",
            "(other work on this shared machine; every round is in the JSON), which is why the one-process",
            "round-robin ratios come first. Minor page faults per timed step (median of the rounds):",
            f"{faults}: every path maps fresh memory for its step's tensors (glibc hands large freed blocks",
            "back to the OS), at the same order for all sources."])]
    two = [r for r in learners if r["learners"] > 1 and r.get("peak_rss_mib") is not None]
    if two:
        parts += ["", "Two learners (rank 0 / 1 of world size 2, concurrent):", ""]
        for r in two:
            parts.append(
                f"- {r['source']} at {r['pairs']:,} pairs: rows read {r['rows_read_per_rank']}, trained on "
                f"{r['rows_trained_per_rank']} ({r.get('rows_trained_shared_by_ranks')} trained by both), of "
                f"{r['rows_in_dataset_per_rank'][0]:,}; peak RSS per rank {r['peak_rss_mib_per_rank']} MiB; "
                f"steps/s per rank {r['steps_per_s_per_rank']}.")
    if bench.data:
        parts += ["", "Data written for the run: " + "; ".join(
            f"{n:,} pairs: parquet {d['parquet_file_bytes'] / MIB:,.0f} MiB in {d['parquet_write_s']} s, "
            f"store {d['store_bytes'] / MIB:,.0f} MiB in {d['store_write_s']} s"
            for n, d in sorted(bench.data.items())) + "."]
    if bench.timing_notes:
        parts += ["", "Slow rows: " + "; ".join(bench.timing_notes) + "."]
    parts += ["", extrapolation(rows, args.pairs, m, bench.decode)]
    prep = [r for r in rows if r.get("kind") == "prepare"]
    if prep:
        parts += _prepare_section(prep, args)
    info = dict(measure.machine("cpu"), torch_threads=1)  # each learner process runs one thread
    parts += ["", "## Machine", measure.describe_machine(info), "", "## Command", "```",
              measure.command_line(), "```", ""]
    return "# Data path at scale (cpu)\n\n" + "\n".join(parts)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child_main(json.loads(args.child))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    bench = Bench(args)
    bench.say(f"work dir {bench.work}; pairs {args.pairs}; steps {args.steps}; image {args.image_px} px")
    bench.run()
    import measure

    out = Path(args.out_dir) if args.out_dir else measure.RESULTS_DIR
    print((out / "data_scale-cpu.md").read_text())


if __name__ == "__main__":
    main()
