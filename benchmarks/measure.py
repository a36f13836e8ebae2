"""Measurement for the benchmarks: threads, timing, memory, the machine, result tables and files."""

from __future__ import annotations

import gc
import json
import os
import platform as _stdlib_platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- timing and memory


def set_threads(threads: int | None, device: str) -> None:
    """CPU runs default to one intra-op thread: on a small shared machine OpenMP threads that wait
    on each other under oversubscription make step times erratic (seen: 20x slower)."""
    if threads is None and torch.device(device).type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device) -> float:
    """Seconds one call of `fn` takes, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def iqr_ms(seconds: list[float]) -> tuple[float, float]:
    if len(seconds) < 4:
        return 1000.0 * min(seconds), 1000.0 * max(seconds)
    q = statistics.quantiles(seconds, n=4)
    return 1000.0 * q[0], 1000.0 * q[2]


def free_device_memory(device: str | torch.device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    """Collects garbage and hands freed heap pages back to the OS (glibc malloc_trim), so that RSS
    measured afterwards does not include memory a later allocation would silently reuse."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Resets the kernel's resident-set high-water mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """High-water mark of the resident set since the last reset (VmHWM), else since the start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_child(argv: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Runs `python <argv>` and parses the last stdout line that is a JSON object."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"child exited {proc.returncode}: " + " | ".join(tail)}


# ----------------------------------------------------------------------------- machine and results


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _stdlib_platform.processor() or "unknown"


def machine(device: str) -> dict:
    import diffusers

    info = {
        "python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "host": _stdlib_platform.node(),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def device_tag(device: str) -> str:
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    m = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", name)
    return m.group(1).lower() if m else "cuda"


def describe_machine(info: dict) -> str:
    lines = [f"- CPU: {info['cpu']} ({info['cpu_count']} logical cores visible, torch threads "
             f"{info['torch_threads']})"]
    if "gpu" in info:
        lines.append(f"- GPU: {info['gpu']} ({info['gpu_memory_gib']} GiB), CUDA {info['cuda']}, "
                     f"cuDNN {info['cudnn']}")
    lines.append(f"- Python {info['python']}, torch {info['torch']}, diffusers {info['diffusers']}")
    return "\n".join(lines)


def fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(rows: list[dict], columns: list[tuple]) -> str:
    """`columns`: (key, header) or (key, header, digits) tuples; missing values print as an em dash."""
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c[0]), *c[2:]) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def command_line() -> str:
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parent.parent)
    return " ".join(["python", script, *sys.argv[1:]])


def write_results(name: str, device: str, payload: dict, markdown: str, out_dir: str | Path | None = None,
                  title: str | None = None) -> tuple[Path, Path]:
    """Writes <out_dir>/<name>-<device>.json and .md (the table, the machine and the command)."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    tag = device_tag(device)
    info = machine(device)
    payload = {"benchmark": name, "device": tag, "machine": info, "command": command_line(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **payload}
    stem = f"{name}-{tag}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    text = [f"# {title or name} ({tag})", "", markdown.rstrip(), "", "## Machine", describe_machine(info), "",
            "## Command", "```", payload["command"], "```", ""]
    md_path.write_text("\n".join(text))
    return json_path, md_path
