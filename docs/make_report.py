"""Makes docs/report.png: a tiny DPO run with three consecutive injected NaN losses at step 9 that
trigger a rollback, tracked in MLflow and rendered by diffalign.report.

    python docs/make_report.py
"""

from __future__ import annotations

import shutil

import torch
from diffalign.config import load_config
from diffalign.report import render_report
from diffalign.tracking import tracking_uri
from diffalign.train.driver import run


class InjectNaN:
    """NaN loss on `count` consecutive attempts from step `start` (a skipped step is retried)."""

    def __init__(self, start: int, count: int) -> None:
        self.start, self.left = start, count

    def on_before_backward(self, trainer, loss: torch.Tensor) -> torch.Tensor:
        step = trainer.step + 1
        if step >= self.start and self.left > 0:
            self.left -= 1
            return loss * float("nan")
        return loss


def main() -> None:
    out = "runs/docs-report"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(
        "configs/tiny/dpo_refupdate.yaml",
        [
            f"train.output_dir={out}",
            "train.max_steps=24",
            "train.checkpoint_every=4",
            "train.eval_every=4",
            "train.sample_every=8",
            "train.progress=false",
            "guard.max_bad_steps=3",
        ],
    )
    summary = run(cfg, callbacks=[InjectNaN(start=9, count=3)])
    print(render_report(summary["mlflow_run_id"], tracking_uri(cfg), "docs/report.png", "docs/report.html"))


if __name__ == "__main__":
    main()
