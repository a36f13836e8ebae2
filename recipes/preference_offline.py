"""Offline preference training on a pair dataset (synthetic, Pick-a-Pic v2 parquet / HF on disk,
JSONL/CSV) with any objective (sft, dpo, mapo, xdpo) and reference strategy.

    python recipes/preference_offline.py --config configs/tiny/dpo_refupdate.yaml
    python recipes/preference_offline.py --config configs/sd15/dpo.yaml --set data.path=/data/pickapic
    ray job submit -- python recipes/preference_offline.py --config configs/tiny/dpo.yaml \
        --set ray.enabled=true

With data.mismatch_probe set (a CLIP or DINOv2 path), the reference-mismatch probe runs and prints first.
"""

from __future__ import annotations

import json

from _common import parse_args


def main() -> None:
    args, cfg = parse_args(__doc__.splitlines()[0], "configs/tiny/dpo_refupdate.yaml")
    if cfg.ray.enabled:  # N Ray Train learners, each running the same driver
        from diffalign.actors.learner import train_with_ray
        from diffalign.train.mismatch_check import check_reference_mismatch
        from diffalign.train.setup import build_datasets

        # Here, before any learner starts (the one-process run probes too, logging it to MLflow).
        check_reference_mismatch(cfg, build_datasets(cfg)[0] if cfg.data.mismatch_probe else None)
        summary = train_with_ray(cfg)
    else:  # one process
        from diffalign.train.driver import run

        summary = run(cfg)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2, default=str))


if __name__ == "__main__":
    main()
