"""The reference-mismatch probe (MaPO, Figure 2) run before offline training, when configured.

It tells which objective fits the data before any step is spent: a large distance between the base
model's samples and the dataset's chosen images means a reference-anchored objective (Diffusion-DPO)
pulls against the data, and MaPO is recommended.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffalign.config import RunConfig

if TYPE_CHECKING:
    from diffalign.tracking import MlflowTracker

log = logging.getLogger(__name__)

SKIPPED = ("reference-mismatch probe skipped; set data.mismatch_probe=<CLIP or DINOv2 path or hub id> "
           "(and data.mismatch_probe_n) to measure how far the chosen images are from the base model")
METRICS = ("mean_distance", "floor_distance", "excess_over_floor", "centroid_distance")


def check_reference_mismatch(cfg: RunConfig, dataset: Sequence[dict[str, Any]] | None,
                             device: str | torch.device | None = None,
                             tracker: MlflowTracker | None = None) -> dict[str, Any] | None:
    """Runs the probe on the first `data.mismatch_probe_n` pairs of `dataset` when `data.mismatch_probe`
    names an embedder; prints the value and its note, writes `<output_dir>/mismatch.json` and logs
    `mismatch.*` metrics and params to `tracker` (an MlflowTracker). Returns None when not configured."""
    d = cfg.data
    if not d.mismatch_probe:
        log.info(SKIPPED)
        return None
    from diffalign.eval.probe import mismatch_probe

    result = mismatch_probe(cfg, dataset, d.mismatch_probe, n=d.mismatch_probe_n, device=device,
                            progress=cfg.train.progress)
    result["embedder"] = d.mismatch_probe
    floor = f", base-vs-base floor {result['floor_distance']:.4f}" if "floor_distance" in result else ""
    print(f"reference mismatch: {result['mean_distance']:.4f} mean cosine distance over {result['n_base']} "
          f"pairs{floor}\n  {result['note']}", flush=True)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mismatch.json").write_text(json.dumps(result, indent=2))
    if tracker is not None:
        tracker.log_metrics({f"mismatch.{k}": result[k] for k in METRICS if k in result}, step=0)
        tracker.mlflow.log_params({"mismatch.embedder": d.mismatch_probe, "mismatch.n": result["n_base"],
                                   "mismatch.note": result["note"][:500]})
        tracker.log_json(result, "mismatch.json")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the probe's base model copy is gone; give its memory back before training
    return result
