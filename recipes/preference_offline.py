r"""Offline preference training on a pair dataset (synthetic, Pick-a-Pic v2 parquet / HF on disk,
JSONL/CSV) with any objective (sft, dpo, mapo, xdpo) and reference strategy.

    python recipes/preference_offline.py --config configs/tiny/dpo_refupdate.yaml
    python recipes/preference_offline.py --config configs/sd15/dpo.yaml --set data.path=/data/pickapic
    ray job submit -- python recipes/preference_offline.py --config configs/tiny/dpo.yaml \
        --set ray.enabled=true

With data.mismatch_probe set (a CLIP or DINOv2 path), the reference-mismatch probe runs and prints first.

Rerunning the same command resumes the run in train.output_dir (a finished one: nothing to do); a
changed result-changing field is refused, naming it. Ctrl-C / SIGTERM save a checkpoint and exit 130 /
143; the same command resumes. Exit 2: the config (or its resume) was refused; 75: another run holds
train.output_dir.
"""

from __future__ import annotations

import json
import sys

from _closing import print_closing_block
from _common import parse_args


def main() -> None:
    args, cfg = parse_args(__doc__.splitlines()[0], "configs/tiny/dpo_refupdate.yaml")
    from diffalign.train.run_state import RunRefused

    try:
        if cfg.ray.enabled:  # N Ray Train learners, each running the same driver
            from diffalign.actors.learner import train_with_ray
            from diffalign.train.mismatch_check import check_reference_mismatch
            from diffalign.train.setup import build_datasets

            # Here, before any learner starts (the one-process run probes too, logging it to MLflow).
            check_reference_mismatch(cfg, build_datasets(cfg)[0] if cfg.data.mismatch_probe else None)
            summary = train_with_ray(cfg)
        else:  # one process
            from diffalign.train.driver import run

            summary = run(cfg)  # a signal: RunInterrupted, a SystemExit(130 / 143) after its checkpoint
    except RunRefused as e:  # nothing was started: the folder is in use, or the resume would mix configs
        print(f"not started: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2, default=str))
    print_closing_block(cfg, summary)  # weights, how to load them, how to look at the run


if __name__ == "__main__":
    main()
