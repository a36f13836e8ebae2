"""Loading scorer and embedder checkpoints with transformers ``from_pretrained``: errors name what was
being loaded, and checkpoints released in another format are refused with what is expected instead."""

from __future__ import annotations

import os
from typing import Any

from diffalign.specs import CHECKPOINT_SUFFIXES


def load_pretrained(cls: Any, path: str, what: str, **kw: Any) -> Any:
    """``cls.from_pretrained(path)``; a failure names ``what`` and the path."""
    try:
        return cls.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise OSError(f"{what}: could not load {cls.__name__} from {path!r}: {e}") from e


def has_processor(path: str) -> bool:
    """Whether the local directory ``path`` holds processor files of its own."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("preprocessor_config.json", "processor_config.json")
    )


def reject_raw_checkpoint(path: str, what: str, expected: str) -> None:
    """Fails on an original (open_clip / BLIP ``.pt``) release, which is no transformers checkpoint."""
    raw = None
    if os.path.isfile(path) and path.endswith(CHECKPOINT_SUFFIXES):
        raw = path
    elif os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        found = sorted(f for f in os.listdir(path) if f.endswith(CHECKPOINT_SUFFIXES))
        if found:
            raw = os.path.join(path, found[0])
    if raw is not None:
        raise ValueError(
            f"{what}: {raw!r} looks like an original (non-transformers) checkpoint, which is not loaded "
            f"here. Expected a directory holding {expected}."
        )
