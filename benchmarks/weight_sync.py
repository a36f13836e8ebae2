"""Learner -> sampler weight sync: time to hand one policy version to N receiver actors, per transport.

Online training hands the learner's trainable weights to the sampler actors every
`ray.sampler.sync_every` steps. This script times that hand-over with plain torch and Ray (not through
`diffalign.actors`), so each transport is measured on its own terms:

- `object_store`: what the platform does (`SamplerPool.sync_all`): the learner snapshots its weights
  into CPU copies (`trainable_state_dict`), `ray.put`s them once, every receiver `ray.get`s them and
  copies them into its model (`load_trainable_state_dict`). The learner only waits for the snapshot
  and the put (`learner_blocked`); a sync is done when every receiver has loaded.
- `broadcast`: `torch.distributed.broadcast` from the learner (rank 0) to the receivers, inside the
  same Ray actors, which form one process group (gloo on CPU, nccl on CUDA: nccl needs one GPU per
  rank). Receivers receive straight into their model tensors; tensors under `--bucket-mb` are packed
  into one buffer per bucket so that small adapter tensors do not pay a collective each.
- `rdt`: Ray Direct Transport: a learner method returns its weight tensors with
  `.options(tensor_transport=...)` and Ray moves them to the receivers out of band (gloo on CPU, nccl
  on CUDA; Ray's nccl group needs cupy and one GPU per rank). Each receiver copies them into its model.
- `rdt_ipc` (CUDA only): the same with Ray's `cuda_ipc` transport (receivers on the learner's GPU).
A transport that cannot run on the machine is skipped with its reason printed and written.

Payloads (a dict of tensors with real parameter shapes; no model is run):
- `full_fp32` / `full_bf16`: every UNet parameter (`--size sd15`: the SD1.5 UNet config of
  `fixtures.SD15_UNET` instantiated on the meta device, 859,520,964 parameters; `--size tiny`: the tiny
  random UNet of the tests, a few MB);
- `lora<r>_fp32` / `lora<r>_bf16`: peft-style adapters (lora_A: r x in, lora_B: out x r) on every
  `diffalign.models.lora.UNET_TARGETS` Linear (to_q / to_k / to_v / to_out.0 of every attention block).
The learner holds the state in the payload's dtype (no fp32 -> bf16 cast is timed).

Timing: every round syncs one new policy version with each transport, the order rotating each round
(so load from other processes hits every transport alike); median and min over `--rounds` after
`--warmup` rounds. After every sync each receiver checks that it holds the new version (a marker in
the first element of every tensor), and after the last round the full weights of every receiver are
compared with the learner's. Memory: the learner's peak resident set (VmHWM, reset before each sync)
and its growth during a sync; on CUDA the peak allocated device memory during a sync.

Share of a training step: sync / (step + sync), with `--step-s` (default: tiny: the median of a few
`Trainer.train_step`s of `configs/tiny/mapo.yaml` built by `diffalign.train.driver.build_trainer`,
measured here; sd15: the MaPO step of `results/step_time-sd15-h100.json`, bf16, 8 pairs, H100).

    python benchmarks/weight_sync.py --size tiny,sd15 --receivers 2          # CPU
    python benchmarks/weight_sync.py --size sd15 --device cuda --payloads full_bf16,lora4_bf16,lora16_bf16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import measure
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
TRANSPORTS = ("object_store", "broadcast", "rdt", "rdt_ipc")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SD15_STEP_FILE = BENCH / "results" / "step_time-sd15-h100.json"
SD15_STEP_FALLBACK_S = 0.392  # the MaPO row of that file, should it be missing
MIB = 2**20


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help="tiny, sd15, or both as tiny,sd15 (default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--receivers", type=int, default=2, help="receiver actors (default %(default)s)")
    p.add_argument("--payloads", default="full_fp32,full_bf16,lora4_fp32,lora4_bf16,lora16_fp32,lora16_bf16",
                   help="comma list of full_<dtype> / lora<rank>_<dtype>, dtype fp32 or bf16")
    p.add_argument("--transports", default="auto",
                   help="comma list of object_store, broadcast, rdt, rdt_ipc; auto: object_store,broadcast "
                        "on CPU, all four on CUDA")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per payload (tiny 20, sd15 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default %(default)s)")
    p.add_argument("--bucket-mb", type=float, default=16.0,
                   help="broadcast: tensors under this size are packed into buckets of it (0: one "
                        "collective per tensor; default %(default)s)")
    p.add_argument("--step-s", type=float, default=None,
                   help="training step time in s for the share of a step (default: see the docstring)")
    p.add_argument("--step-source", default=None, help="where --step-s comes from (written to the JSON)")
    p.add_argument("--sync-timeout-s", type=float, default=300.0,
                   help="the longest one sync, setup call or check may take (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (CPU default 1)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    args.sizes = _choices(args.size, ("tiny", "sd15"), "--size")
    args.payload_specs = [parse_payload(x) for x in _split(args.payloads)]
    if not args.payload_specs:
        p.error("--payloads: give at least one payload")
    if args.transports == "auto":
        args.transport_list = (["object_store", "broadcast"] if args.device == "cpu" else list(TRANSPORTS))
    else:
        # Set up in this order: Ray's gloo group (rdt) reuses an existing torch.distributed world, while
        # broadcast's init_process_group would fail once Ray has created one.
        chosen = _choices(args.transports, TRANSPORTS, "--transports")
        args.transport_list = sorted(chosen, key=TRANSPORTS.index)
    for name, value, low in (("--receivers", args.receivers, 1), ("--warmup", args.warmup, 0),
                             ("--rounds", args.rounds, 1)):
        if value is not None and value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if args.bucket_mb < 0:
        p.error(f"--bucket-mb must be >= 0, got {args.bucket_mb}")
    if args.step_s is not None and args.step_s <= 0:
        p.error(f"--step-s must be > 0, got {args.step_s}")
    if args.sync_timeout_s <= 0:
        p.error(f"--sync-timeout-s must be > 0, got {args.sync_timeout_s}")
    if args.step_s is not None and len(args.sizes) > 1:
        p.error("--step-s applies to one --size; run the sizes separately to give each its step time")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    return args


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    got = _split(text)
    bad = [x for x in got if x not in allowed]
    if bad or not got:
        raise SystemExit(f"{flag}: {bad or text!r} not among {', '.join(allowed)}")
    return list(dict.fromkeys(got))


def parse_payload(name: str) -> dict:
    """`full_fp32` -> {kind: full, rank: None, dtype: fp32}; `lora16_bf16` -> {kind: lora, rank: 16, ...}."""
    kind, _, dtype = name.partition("_")
    if dtype not in DTYPES:
        raise SystemExit(f"--payloads: {name!r}: the dtype after '_' must be fp32 or bf16")
    if kind == "full":
        return {"name": name, "kind": "full", "rank": None, "dtype": dtype}
    if kind.startswith("lora") and kind[4:].isdigit() and int(kind[4:]) >= 1:
        return {"name": name, "kind": "lora", "rank": int(kind[4:]), "dtype": dtype}
    raise SystemExit(f"--payloads: {name!r} is not full_<dtype> or lora<rank>_<dtype>")


# ----------------------------------------------------------------------------- payload shapes


def unet_shapes(size: str) -> tuple[dict[str, tuple[int, ...]], list[tuple[str, int, int]]]:
    """Parameter shapes of the UNet, and the (name, in, out) of every LoRA target Linear."""
    from diffalign.models.lora import UNET_TARGETS

    if size == "tiny":
        import fixtures

        unet = fixtures.build_unet("tiny")
    else:
        import fixtures
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):  # shapes only: no 3.4 GB of weights built
            unet = UNet2DConditionModel(**fixtures.SD15_UNET)
    full = {n: tuple(p.shape) for n, p in unet.named_parameters()}
    targets = [(n, m.in_features, m.out_features) for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in UNET_TARGETS)]
    return full, targets


def payload_shapes(spec: dict, full: dict, targets: list) -> list[tuple[str, tuple[int, ...]]]:
    if spec["kind"] == "full":
        return list(full.items())
    r = spec["rank"]
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, fan_in, fan_out in targets:
        out += [(f"{name}.lora_A.weight", (r, fan_in)), (f"{name}.lora_B.weight", (fan_out, r))]
    return out


def numel(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    n = 0
    for _, s in shapes:
        k = 1
        for d in s:
            k *= d
        n += k
    return n


# ----------------------------------------------------------------------------- the actors


class Endpoint:
    """One process of the sync: rank 0 is the learner, ranks 1..N the receivers ("samplers"). Each
    holds one model copy: a dict of tensors loaded in place, the way `load_trainable_state_dict`
    copies into parameters."""

    def __init__(self, rank: int, device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.rank = rank
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.state: dict[str, torch.Tensor] = {}
        self.buckets: list[list[str]] = []
        self.pg_ready = False
        self._rss_before = 0

    # -- setup
    def address(self) -> tuple[str, int]:
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def init_process_group(self, addr: str, port: int, world: int, backend: str, timeout_s: float) -> bool:
        import datetime

        import torch.distributed as dist

        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        # One tiny collective so that a broken group fails here, not inside the first timed sync.
        x = torch.ones(1, device=self.device)
        dist.all_reduce(x)
        self.pg_ready = float(x.item()) == world
        return self.pg_ready

    def build(self, shapes: list, dtype: str, bucket_bytes: int) -> int:
        """Allocates this copy; the learner fills it with per-tensor values, receivers with zeros."""
        self.free()
        dt = DTYPES[dtype]
        with torch.no_grad():
            for i, (name, shape) in enumerate(shapes):
                t = torch.empty(shape, dtype=dt, device=self.device)
                t.fill_(((i % 97) + 1) * 1e-3 if self.rank == 0 else 0.0)
                self.state[name] = t
        self.buckets = _buckets(self.state, bucket_bytes)
        self._sync_device()
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def free(self) -> None:
        self.state = {}
        self.buckets = []
        measure.release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- versions and checks
    def bump(self, version: int) -> None:
        """The learner's new policy version: a marker in the first element of every tensor."""
        m = _marker(version)
        with torch.no_grad():
            for t in self.state.values():
                t.view(-1)[0] = m
        self._sync_device()

    def holds(self, version: int) -> int:
        """How many tensors carry `version`'s marker (all of them after a complete sync)."""
        m = _marker(version)
        firsts = torch.stack([t.view(-1)[0].float() for t in self.state.values()])
        return int((firsts == m).sum().item())

    def fingerprint(self) -> float:
        return float(sum(t.double().sum().item() for t in self.state.values()))

    # -- memory
    def mark(self) -> None:
        measure.release_freed_memory()
        self._rss_before = measure.rss_bytes()
        measure.reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self._cuda_before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> dict:
        out = {"peak_rss": measure.peak_rss_bytes(), "rss_before": self._rss_before}
        if self.device.type == "cuda":
            out["cuda_extra"] = torch.cuda.max_memory_allocated() - self._cuda_before
        return out

    # -- object store (the platform's path)
    def sync_object_store(self, receivers: list, timeout_s: float) -> float:
        """Snapshot -> one ray.put -> every receiver gets and loads it; returns the seconds the learner
        was blocked (snapshot + put)."""
        import ray

        t0 = time.perf_counter()
        packet = {k: v.detach().to("cpu", copy=True) for k, v in self.state.items()}
        ref = ray.put(packet)
        del packet
        blocked = time.perf_counter() - t0
        ray.get([r.load_from_store.remote([ref]) for r in receivers], timeout=timeout_s)
        return blocked

    def load_from_store(self, refs: list) -> None:
        import ray

        packet = ray.get(refs[0])
        with torch.no_grad():
            for k, t in self.state.items():
                t.copy_(packet[k])
        del packet
        self._sync_device()

    # -- torch.distributed broadcast
    def broadcast(self) -> None:
        import torch.distributed as dist

        with torch.no_grad():
            for names in self.buckets:
                if len(names) == 1:  # large tensor: straight into / out of the model tensor
                    dist.broadcast(self.state[names[0]], src=0)
                    continue
                ts = [self.state[n] for n in names]
                if self.rank == 0:
                    flat = torch.cat([t.reshape(-1) for t in ts])
                else:
                    flat = torch.empty(sum(t.numel() for t in ts), dtype=ts[0].dtype, device=self.device)
                dist.broadcast(flat, src=0)
                if self.rank != 0:
                    offset = 0
                    for t in ts:
                        t.copy_(flat[offset:offset + t.numel()].view_as(t))
                        offset += t.numel()
        self._sync_device()

    # -- Ray Direct Transport
    def weights(self) -> dict[str, torch.Tensor]:
        """The live weight tensors; called with .options(tensor_transport=...), Ray keeps them on this
        actor and sends them to whichever actor receives the returned ref."""
        self._sync_device()
        return self.state

    def load_tensors(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, t in self.state.items():
                t.copy_(weights[k])
        self._sync_device()

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _marker(version: int) -> float:
    # Integers up to 256 are exact in bf16: cycle through 1..250.
    return float(version % 250 + 1)


def _buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Consecutive same-dtype tensors under `bucket_bytes` grouped up to `bucket_bytes`; larger ones alone."""
    out: list[list[str]] = []
    cur: list[str] = []
    cur_bytes = 0
    for name, t in state.items():
        b = t.numel() * t.element_size()
        if bucket_bytes <= 0 or b >= bucket_bytes:
            out.append([name])
            continue
        if cur and (cur_bytes + b > bucket_bytes or state[cur[0]].dtype != t.dtype):
            out.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += b
    if cur:
        out.append(cur)
    return out


# ----------------------------------------------------------------------------- step time


def tiny_step_s(steps: int = 5, warmup: int = 2) -> tuple[float, str]:
    """Median seconds of `Trainer.train_step` on configs/tiny/mapo.yaml (this process, its threads)."""
    from diffalign.config import load_config
    from diffalign.train.driver import build_trainer

    with tempfile.TemporaryDirectory(prefix="diffalign-ws-step-") as tmp:
        cfg = load_config(REPO / "configs" / "tiny" / "mapo.yaml",
                          [f"train.output_dir={tmp}", "tracking.mlflow=false", "train.progress=false",
                           "train.eval_every=0"])
        trainer = build_trainer(cfg)
        for _ in range(warmup):
            trainer.train_step()
        times = [measure.timed(trainer.train_step, "cpu") for _ in range(steps)]
        if getattr(trainer, "release", None):
            trainer.release()
    src = (f"measured here: median of {steps} Trainer.train_step of configs/tiny/mapo.yaml "
           f"(build_trainer, batch {cfg.optim.batch_size} pairs, full fine-tune, {torch.get_num_threads()} "
           "torch thread(s))")
    return statistics.median(times), src


def sd15_step_s() -> tuple[float, str]:
    try:
        res = json.loads(SD15_STEP_FILE.read_text())
        row = next(r for r in res["rows"] if r["variant"] == "mapo")
        return row["median_ms"] / 1000.0, (
            f"results/{SD15_STEP_FILE.name}: MaPO step, SD1.5-size UNet, bf16 autocast, gradient "
            f"checkpointing, {res['spec']['batch']} pairs, {res['machine'].get('gpu', 'GPU')} median "
            f"({res['date']})")
    except (OSError, KeyError, StopIteration, ValueError):
        return SD15_STEP_FALLBACK_S, ("the MaPO SD1.5 H100 step of results/step_time-sd15-h100.json "
                                      "(bf16, grad checkpointing, 8 pairs), 392 ms")


# ----------------------------------------------------------------------------- memory check


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_bytes_needed(transport: str, nbytes: int, receivers: int, device: str) -> int:
    """Host memory one payload needs with `transport` (model copies + what the sync adds at its peak)."""
    copies = nbytes * (1 + receivers) if device == "cpu" else 0
    # object store: during the put the learner holds the snapshot, the pickled bytes (torch tensors are
    # pickled in band by default) and the stored copy; then every receiver deserialises its own copy.
    # Seen on CPU at SD1.5 fp32 size: the learner's resident set reached 12.2 GB for a 3.4 GB payload.
    extra = {"object_store": nbytes * (3 + receivers),
             "broadcast": 0, "rdt": nbytes * receivers if device == "cpu" else 0, "rdt_ipc": 0}[transport]
    return copies + extra


# ----------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace, max_bytes: int) -> None:
        import ray

        self.args, self.ray = args, ray
        self.n = args.receivers
        self.threads = args.threads or (1 if args.device == "cpu" else 4)
        self.timeout = args.sync_timeout_s
        self.max_bytes = max_bytes
        self.actors: list = []
        self.setup_s: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.ready: list[str] = []
        self.tmp = tempfile.mkdtemp(prefix="ws-ray-", dir="/tmp")  # short: Ray's socket paths are limited

    def start(self) -> None:
        """This run's own Ray instance (own temp dir), the actors, and each transport's setup."""
        ray, args, max_bytes = self.ray, self.args, self.max_bytes
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        store = int(max(256 * MIB, 1.3 * max_bytes + 128 * MIB))
        pythonpath = os.pathsep.join([str(BENCH), str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])
        t0 = time.perf_counter()
        ray.init(num_cpus=max(self.n + 1, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True,
                 object_store_memory=store, _temp_dir=self.tmp,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(self.threads), "PYTHONPATH": pythonpath,
                                           "TOKENIZERS_PARALLELISM": "false"}})
        # ray.init installs its own SIGTERM handler; ours makes a time limit run `close()` (the temp dir).
        signal.signal(signal.SIGTERM, _terminate)
        ngpu = torch.cuda.device_count() if args.device == "cuda" else 0
        self.ngpu = ngpu
        # Several ranks may share one GPU (rdt_ipc, object_store); nccl needs a GPU per rank.
        gpus = min(1.0, ngpu / (self.n + 1)) if ngpu else 0
        cls = ray.remote(num_cpus=0.01, num_gpus=gpus, enable_tensor_transport=True)(Endpoint)
        self.actors = [cls.remote(rank, args.device, self.threads) for rank in range(self.n + 1)]
        self.learner, self.receivers = self.actors[0], self.actors[1:]
        self._get([a.address.remote() for a in self.actors], "the actors to start")
        self.setup_s["ray_and_actors"] = time.perf_counter() - t0
        for t in args.transport_list:
            reason = self._setup(t)
            if reason:
                self.skipped[t] = reason
                print(f"[weight_sync] skipping {t}: {reason}", flush=True)
            else:
                self.ready.append(t)

    def _get(self, refs: Any, what: str) -> Any:
        try:
            return self.ray.get(refs, timeout=self.timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"waited {self.timeout:.0f} s for {what} (--sync-timeout-s)") from None

    def _setup(self, transport: str) -> str | None:
        """Prepares a transport; returns why it cannot run here, or None."""
        cuda = self.args.device == "cuda"
        world = self.n + 1
        t0 = time.perf_counter()
        try:
            if transport == "rdt_ipc" and not cuda:
                return "cuda_ipc is a CUDA transport (run with --device cuda)"
            if transport in ("broadcast", "rdt") and cuda and self.ngpu < world:
                return (f"nccl needs one GPU per rank: {world} ranks (learner + {self.n} receivers), "
                        f"{self.ngpu} GPU(s) visible")
            if transport in ("rdt", "rdt_ipc"):
                try:
                    from ray.experimental.rdt.util import normalize_and_validate_tensor_transport
                except ImportError as e:
                    return f"Ray {self.ray.__version__} has no Ray Direct Transport ({e})"
                backend = {"rdt": "nccl" if cuda else "gloo", "rdt_ipc": "cuda_ipc"}[transport]
                normalize_and_validate_tensor_transport(backend)
            if transport == "broadcast":
                addr, port = self._get(self.learner.address.remote(), "the learner's address")
                backend = "nccl" if cuda else "gloo"
                ok = self._get([a.init_process_group.remote(addr, port, world, backend, self.timeout)
                                for a in self.actors], f"the {backend} process group of {world} ranks")
                if not all(ok):
                    return f"the {backend} process group's test all_reduce gave a wrong sum"
            if transport == "rdt":
                from ray.experimental.collective import create_collective_group

                create_collective_group(self.actors, backend="nccl" if cuda else "gloo")
        except Exception as e:  # noqa: BLE001 - any failure to set up means: skip it, say why
            return f"setup failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self.setup_s[transport] = time.perf_counter() - t0
        return None

    # -- one sync
    def sync(self, transport: str, version: int) -> dict:
        """Syncs `version` with `transport`; returns its seconds (end to end, learner blocked) and memory."""
        self._get(self.learner.bump.remote(version), "the learner's version bump")
        self._get([a.mark.remote() for a in self.actors], "the memory marks")
        blocked = None
        t0 = time.perf_counter()
        if transport == "object_store":
            blocked = self._get(self.learner.sync_object_store.remote(self.receivers, self.timeout),
                                "an object-store sync")
        elif transport == "broadcast":
            self._get([a.broadcast.remote() for a in self.actors], "a broadcast sync")
        else:
            cuda = self.args.device == "cuda"
            backend = {"rdt": "nccl" if cuda else "gloo", "rdt_ipc": "cuda_ipc"}[transport]
            ref = self.learner.weights.options(tensor_transport=backend).remote()
            self._get([r.load_tensors.remote(ref) for r in self.receivers], f"an RDT ({backend}) sync")
            del ref
        total = time.perf_counter() - t0
        mem = self._get([a.peak.remote() for a in self.actors], "the memory peaks")
        held = self._get([r.holds.remote(version) for r in self.receivers], "the version check")
        return {"s": total, "blocked_s": blocked if blocked is not None else total, "mem": mem, "held": held}

    def run_payload(self, size: str, spec: dict, shapes: list, rounds: int,
                    version0: int) -> tuple[list, int]:
        args = self.args
        bucket = int(args.bucket_mb * MIB)
        sizes = self._get([a.build.remote(shapes, spec["dtype"], bucket) for a in self.actors],
                          f"{spec['name']} copies to be allocated")
        nbytes = sizes[0]
        n_tensors = len(shapes)
        avail = mem_available()  # the object store path uses host memory on CUDA too
        names = []
        rows = {}
        for t in self.ready:
            base = {"size": size, "payload": spec["name"], "kind": spec["kind"], "lora_rank": spec["rank"],
                    "dtype": spec["dtype"], "params": numel(shapes), "tensors": n_tensors, "bytes": nbytes,
                    "transport": t, "receivers": self.n}
            need = host_bytes_needed(t, nbytes, self.n, args.device)
            # The copies themselves are already allocated; what is still needed is the sync's extra.
            extra = need - (nbytes * (1 + self.n) if args.device == "cpu" else 0)
            if avail is not None and extra > 0.85 * avail:
                base["skipped"] = (f"needs ~{extra / 2**30:.1f} GiB more host memory during a sync, "
                                   f"{avail / 2**30:.1f} GiB available")
                print(f"[weight_sync] {size} {spec['name']} {t}: skipped: {base['skipped']}", flush=True)
            else:
                names.append(t)
            rows[t] = base
        times: dict[str, list[dict]] = {t: [] for t in names}
        errors: dict[str, str] = {}
        version = version0
        for r in range(args.warmup + rounds):
            k = r % max(1, len(names))
            for t in names[k:] + names[:k]:
                if t in errors:
                    continue
                version += 1
                try:
                    res = self.sync(t, version)
                except Exception as e:  # noqa: BLE001 - a failing transport is reported, the rest go on
                    errors[t] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    print(f"[weight_sync] {size} {spec['name']} {t} failed: {errors[t]}", flush=True)
                    continue
                if min(res["held"]) != n_tensors:
                    errors[t] = (f"a receiver holds {min(res['held'])} of {n_tensors} tensors of "
                                 f"version {version}")
                    continue
                if r >= args.warmup:
                    times[t].append(res)
        # Full check, once per transport after its timed rounds (untimed): one more sync, then every
        # receiver's whole copy against the learner's (same values summed in the same order: exact).
        final_equal: dict[str, bool] = {}
        for t in names:
            if t in errors:
                continue
            version += 1
            try:
                self.sync(t, version)
            except Exception as e:  # noqa: BLE001
                first = str(e).splitlines()[0] if str(e) else ""
                errors[t] = f"{type(e).__name__} in the final check: {first}"
                continue
            ref_fp = self._get(self.learner.fingerprint.remote(), "the learner's fingerprint")
            fps = self._get([rc.fingerprint.remote() for rc in self.receivers], "the receivers' fingerprints")
            final_equal[t] = all(f == ref_fp for f in fps)
        out = []
        for t, base in rows.items():
            row = dict(base)
            if t in errors:
                row["error"] = errors[t]
            res = times.get(t, [])
            if res:
                s = [x["s"] for x in res]
                blocked = [x["blocked_s"] for x in res]
                q1, q3 = measure.iqr_ms(s)
                learner = [x["mem"][0] for x in res]
                recv = [m for x in res for m in x["mem"][1:]]
                row.update(
                    rounds=len(res), median_ms=measure.median_ms(s), min_ms=1000 * min(s), q1_ms=q1, q3_ms=q3,
                    learner_blocked_median_ms=measure.median_ms(blocked),
                    gb_per_s=nbytes * self.n / statistics.median(s) / 1e9,
                    learner_peak_rss_mib=max(m["peak_rss"] for m in learner) / MIB,
                    learner_sync_extra_mib=max(m["peak_rss"] - m["rss_before"] for m in learner) / MIB,
                    receiver_sync_extra_mib=max(m["peak_rss"] - m["rss_before"] for m in recv) / MIB,
                    verified_every_round=True)
                if args.device == "cuda":
                    row["learner_cuda_extra_mib"] = max(m.get("cuda_extra", 0) for m in learner) / MIB
                    row["receiver_cuda_extra_mib"] = max(m.get("cuda_extra", 0) for m in recv) / MIB
            out.append(row)
        for row in out:
            if row["transport"] in final_equal:
                row["final_weights_equal"] = final_equal[row["transport"]]
        self._get([a.free.remote() for a in self.actors], "the copies to be freed")
        return out, version

    def close(self) -> None:
        try:
            if "rdt" in self.ready:
                from ray.experimental.collective import destroy_all_collective_groups

                destroy_all_collective_groups()
        except Exception:  # noqa: BLE001 - best effort before shutdown
            pass
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if self.ray.is_initialized():
            self.ray.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


def share(row: dict, step_s: float) -> None:
    if "median_ms" in row:
        sync_s = row["median_ms"] / 1000
        row["share_of_step"] = sync_s / (step_s + sync_s)
        b = row["learner_blocked_median_ms"] / 1000
        row["blocked_share_of_step"] = b / (step_s + b)


def ratios(rows: list[dict]) -> list[dict]:
    """Within one run: each transport against the object store, per payload; bf16 / fp32 bytes."""
    out = []
    by = {(r["size"], r["payload"], r["transport"]): r for r in rows if "median_ms" in r}
    for (size, payload, t), r in by.items():
        base = by.get((size, payload, "object_store"))
        if t != "object_store" and base:
            out.append({"size": size, "payload": payload, "transport": t,
                        "time_over_object_store": r["median_ms"] / base["median_ms"]})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    measure.set_threads(args.threads, "cpu")
    t_start = time.perf_counter()
    # A time limit (`timeout` sends SIGTERM) still shuts down this run's Ray instance and actors.
    signal.signal(signal.SIGTERM, _terminate)

    plans = []
    for size in args.sizes:
        full, targets = unet_shapes(size)
        for spec in args.payload_specs:
            shapes = payload_shapes(spec, full, targets)
            nbytes = numel(shapes) * (4 if spec["dtype"] == "fp32" else 2)
            plans.append((size, spec, shapes, nbytes))
    step = {}
    for size in args.sizes:
        if args.step_s is not None:
            step[size] = (args.step_s, args.step_source or "given with --step-s")
        elif size == "tiny":
            step[size] = tiny_step_s()
        else:
            step[size] = sd15_step_s()
        print(f"[weight_sync] step time {size}: {step[size][0] * 1000:.1f} ms ({step[size][1]})", flush=True)

    # Payloads whose model copies alone do not fit are skipped before anything is allocated.
    rows: list[dict] = []
    avail = mem_available() if args.device == "cpu" else None
    runnable = []
    for size, spec, shapes, nbytes in plans:
        copies = nbytes * (1 + args.receivers)
        if avail is not None and args.device == "cpu" and copies > 0.85 * avail:
            reason = (f"{1 + args.receivers} copies need {copies / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB "
                      "available (try fewer --receivers)")
            rows.append({"size": size, "payload": spec["name"], "bytes": nbytes, "skipped": reason})
            print(f"[weight_sync] {size} {spec['name']}: skipped: {reason}", flush=True)
        else:
            runnable.append((size, spec, shapes, nbytes))

    bench = Bench(args, max((p[3] for p in runnable), default=MIB))
    try:
        bench.start()
        version = 0
        for size, spec, shapes, nbytes in runnable:
            rounds = args.rounds or (20 if size == "tiny" else 5)
            t0 = time.perf_counter()
            try:
                got, version = bench.run_payload(size, spec, shapes, rounds, version)
            except Exception as e:  # noqa: BLE001 - an actor lost (e.g. to Ray's OOM killer) ends the run
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                rows.append({"size": size, "payload": spec["name"], "bytes": nbytes,
                             "error": f"{type(e).__name__}: {first}; the remaining payloads were not run"})
                print(f"[weight_sync] {size} {spec['name']}: {rows[-1]['error']}", flush=True)
                break
            for r in got:
                share(r, step[size][0])
            rows += got
            done = ", ".join(f"{r['transport']} {r['median_ms']:.1f} ms" for r in got if "median_ms" in r)
            print(f"[weight_sync] {size} {spec['name']} ({nbytes / MIB:.1f} MiB): {done} "
                  f"[{time.perf_counter() - t0:.1f} s]", flush=True)
            write(args, bench, rows, step, t_start, partial=True)  # a time-boxed run keeps what it finished
    finally:
        bench.close()
    write(args, bench, rows, step, t_start, partial=False)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def write(args: argparse.Namespace, bench: Bench, rows: list[dict], step: dict, t_start: float,
          partial: bool) -> None:
    import ray

    cols = [("size", "size"), ("payload", "payload"), ("mib", "MiB", 2), ("transport", "transport"),
            ("median_ms", "median ms", 1), ("min_ms", "min ms", 1),
            ("learner_blocked_median_ms", "learner blocked ms", 1), ("gb_per_s", "GB/s delivered", 2),
            ("share_pct", "% of step", 1), ("learner_peak_rss_mib", "learner peak RSS MiB", 0),
            ("learner_sync_extra_mib", "learner +MiB", 0), ("receiver_sync_extra_mib", "receiver +MiB", 0)]
    if args.device == "cuda":
        cols += [("learner_cuda_extra_mib", "learner +GPU MiB", 0),
                 ("receiver_cuda_extra_mib", "receiver +GPU MiB", 0)]
    table_rows = []
    for r in rows:
        t = dict(r, mib=r["bytes"] / MIB)
        if "share_of_step" in r:
            t["share_pct"] = 100 * r["share_of_step"]
        if "median_ms" not in r:
            t["transport"] = f"{r.get('transport', 'all')}: {r.get('error') or r.get('skipped')}"
        table_rows.append(t)
    rat = ratios(rows)
    pg = "gloo" if args.device == "cpu" else "nccl"
    md = [f"{args.receivers} receiver actor(s) + 1 learner actor on {args.device.upper()}, "
          f"{args.rounds or 'tiny 20 / sd15 5'} rounds after {args.warmup} warm-up, transports interleaved "
          f"(order rotating per round); torch threads per process {bench.threads}; Ray {ray.__version__}, "
          f"torch {torch.__version__}; broadcast over {pg}, buckets of {args.bucket_mb:g} MiB.", "",
          measure.markdown_table(table_rows, cols), "",
          "- median / min: from the start of a sync until every receiver has loaded the new version; "
          "learner blocked: snapshot + `ray.put` for the object store (the learner may train on while "
          "receivers fetch), the whole sync for the others. GB/s delivered: payload x receivers / median.",
          "- % of step: sync / (step + sync), step times: " +
          "; ".join(f"{s}: {v[0] * 1000:.1f} ms ({v[1]})" for s, v in step.items()) + ".",
          "- Every sync was checked on every receiver (a version marker in every tensor); after the timed "
          "rounds one more sync per transport, then the receivers' whole copies equal the learner's: " +
          ", ".join(f"{r['size']} {r['payload']} {r['transport']}: {r['final_weights_equal']}"
                    for r in rows if "final_weights_equal" in r) + "."]
    if rat:
        md += ["", "| size | payload | transport | time / object store |", "|---|---|---|---|"]
        md += [f"| {x['size']} | {x['payload']} | {x['transport']} | {x['time_over_object_store']:.2f} |"
               for x in rat]
    if bench.skipped:
        md += ["", "Skipped transports: " + "; ".join(f"{k}: {v}" for k, v in bench.skipped.items()) + "."]
    md = "\n".join(md)
    if not partial:
        print(md, flush=True)
    payload = {"sizes": args.sizes, "receivers": args.receivers, "rounds": args.rounds, "warmup": args.warmup,
               "bucket_mb": args.bucket_mb, "transports": args.transport_list, "ready": bench.ready,
               "skipped_transports": bench.skipped,
               "step": {s: {"s": v[0], "source": v[1]} for s, v in step.items()},
               "rows": rows, "ratios": rat, "setup_s": bench.setup_s, "ray": ray.__version__,
               "threads": bench.threads, "wall_s": time.perf_counter() - t_start, "partial": partial}
    paths = measure.write_results("weight_sync", args.device, payload, md, args.out_dir,
                                  title="Weight sync: learner -> receiver actors")
    if not partial:
        print(f"wrote {paths[0]} and {paths[1]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
