"""Runs the Ray Train learner with DeepSpeed ZeRO-2 for real on one GPU (tiny model) and with plain
DDP for comparison; writes step counts, final metrics and wall times as JSON.

    python benchmarks/gpu_learner.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    import torch
    from diffalign.actors.learner import train_with_ray
    from diffalign.config import load_config

    rows = []
    for backend in ("deepspeed", "ddp"):
        cfg = load_config(
            "configs/tiny/mapo.yaml",
            [
                f"train.output_dir=/tmp/gpu-learner-{backend}",
                f"train.max_steps={a.steps}",
                "train.checkpoint_every=10",
                "train.progress=false",
                "tracking.mlflow=false",
                f"ray.backend={backend}",
                "ray.zero_stage=2",
                "ray.use_gpu=true",
                "ray.num_learners=1",
                "model.mixed_precision=bf16",
                "train.eval_every=10",
            ],
        )
        t0 = time.perf_counter()
        res = train_with_ray(cfg)
        rows.append(
            {
                "backend": backend,
                "zero_stage": 2 if backend == "deepspeed" else None,
                "steps": res.get("step"),
                "wall_s": round(time.perf_counter() - t0, 1),
                "loss": res.get("metrics", {}).get("loss"),
                "heldout_implicit_acc": res.get("metrics", {}).get("heldout/implicit_acc"),
                "checkpoint": str(res.get("checkpoint")),
            }
        )
        print(rows[-1], flush=True)
    info = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "rows": rows,
        "command": "python benchmarks/gpu_learner.py",
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gpu_learner-h100.json").write_text(json.dumps(info, indent=2, default=str))


if __name__ == "__main__":
    main()
