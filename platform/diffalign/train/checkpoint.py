"""Checkpoints with exact resume: trainable weights (safetensors), optimizer, LR schedule, step,
RNG states, reference policy and guard state. A run stopped at step k and resumed reaches the
same weights at step 2k as an uninterrupted run (bitwise on CPU).

A checkpoint also holds the config it was trained with (`config.yaml`), which a resume is checked
against (`diffalign.train.run_state.check_resume`). A save that fails leaves no partial folder and
the previous checkpoints as they were; a full disk is reported as `DiskFull`, with the size needed."""

from __future__ import annotations

import contextlib
import errno
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"
CONFIG_FILE = "config.yaml"
# What torch's and sqlite's writers say when a write fails; on a full disk these are the symptom.
_WRITE_FAILURES = ("basic_ios::clear", "unexpected pos", "PytorchStreamWriter failed", "file write failed",
                   "No space left on device", "StorageFull", "database or disk is full")


class DiskFull(OSError):
    """A save that failed for lack of space: where, and about how much it needed."""

    def __init__(self, path: str | Path, needed_bytes: int | None = None) -> None:
        self.path, self.needed_bytes = Path(path), needed_bytes
        needed = f", needed ~{_mb(needed_bytes)} MB" if needed_bytes is not None else ""
        free = free_bytes(self.path)
        have = f" ({_mb(free)} MB free)" if free is not None else ""
        super().__init__(errno.ENOSPC, f"no space left on device at {self.path}{needed}{have}")

    def __str__(self) -> str:
        return self.strerror


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}" if n < 10 * 2**20 else f"{n / 2**20:.0f}"


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem of `path` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def nbytes(obj) -> int:
    """The tensor / array bytes in a (nested) state: what saving it needs, about."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def is_disk_full(exc: BaseException, path: str | Path, needed_bytes: int | None = None) -> bool:
    """ENOSPC / EDQUOT, or a writer's failure (torch, safetensors, sqlite) while the disk is full."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "database or disk is full" in text:
        return True
    if any(marker in text for marker in _WRITE_FAILURES):
        free = free_bytes(path)
        return free is not None and free < max(needed_bytes or 0, 2**20)
    return False


@contextlib.contextmanager
def disk_full_as_error(path: str | Path, needed_bytes: Callable[[], int]) -> Iterator[None]:
    """Re-raises a failed write of a full disk as DiskFull(path, needed_bytes())."""
    try:
        yield
    except Exception as e:
        if isinstance(e, DiskFull):
            raise
        needed = needed_bytes()
        if is_disk_full(e, path, needed):
            raise DiskFull(path, needed) from e
        raise


def rng_state(generator: torch.Generator | None = None) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if generator is not None:
        state["generator"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict,
                    keep: int = 2, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Writes `<directory>/checkpoint-<step>/` atomically (tmp dir + rename) and prunes old ones.
    `write_extra(folder)` adds files (the config). A failed write removes the tmp dir and leaves every
    earlier checkpoint; on a full disk it raises DiskFull."""
    directory = Path(directory)
    final = directory / f"{PREFIX}{step}"
    tmp = directory / f".tmp-{PREFIX}{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with disk_full_as_error(tmp, lambda: nbytes(weights) + nbytes(state)):
            tmp.mkdir(parents=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()},
                      str(tmp / "weights.safetensors"))
            torch.save(state, tmp / "state.pt")
            if write_extra is not None:
                write_extra(tmp)
    except BaseException:  # a signal too: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.exists():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(directory: str | Path) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not (path / "weights.safetensors").exists():
        raise FileNotFoundError(f"not a diffalign checkpoint (no weights.safetensors): {path}")
    return load_file(str(path / "weights.safetensors")), torch.load(path / "state.pt", weights_only=False)
