"""Reward-model score on fixed prompts and seeds during training, as a Trainer callback.

At step 0 (the baseline), every `train.score_every` steps and at the last step, the current policy
generates one image per (prompt, seed) from the same prompts and seeds each time, so successive
scores are seed-matched and their curve is comparable. Each configured scorer (loaded once) adds
`score/<name>`, the mean over the images, to that step's metrics, so every later callback (MLflow,
Ray Train reports) logs it and the run summary holds the last values. The step-0 baseline has no
step metrics: it goes straight to the MLflow tracker found among the trainer's callbacks. Each
evaluation also writes an image grid (rows = prompts, columns = seeds) to
`<output_dir>/score/step_NNNNNN.png` (and the run's `score/` MLflow artifacts) and a line to
`<output_dir>/score/scores.jsonl`.

Sampling draws from its own seeded generators and restores the global RNG afterwards, so training
(noise, timesteps, dropout) is the same with scoring on or off. Only rank 0 scores, and it scores
the live weights (not the EMA copy, when `train.ema_decay` is set).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from diffalign.config import RunConfig
from diffalign.data.synthetic import PROMPTS
from diffalign.eval.base import Scorer
from diffalign.eval.base_model import default_guidance, default_steps
from diffalign.eval.scorers import build_scorers, score_all
from diffalign.models.precision import autocast, mixed_precision_dtype
from diffalign.models.sampling import generate_images, image_grid
from diffalign.specs import load_prompts, parse_scorers, parse_seeds
from diffalign.tracking import attached_tracker

if TYPE_CHECKING:  # the type name only: importing the loop would pull in the whole training stack
    from diffalign.train.loop import Trainer

log = logging.getLogger(__name__)
GENERATE_BATCH = 8


class RewardEvaluator:
    """Place it before the tracker among the callbacks. `scorers`: already built scorers by name,
    instead of loading `cfg.tracking.scorers`."""

    def __init__(self, cfg: RunConfig, scorers: Mapping[str, Scorer] | None = None) -> None:
        self.cfg = cfg
        self.every = cfg.train.score_every
        if self.every < 1:
            raise ValueError(f"train.score_every must be >= 1 to score during training, got {self.every}")
        self.seeds = parse_seeds(cfg.tracking.score_seeds)
        self.spec = dict(scorers) if scorers is not None else parse_scorers(cfg.tracking.scorers or "")
        self.scorers: dict[str, Scorer] = {}
        self.prompts: list[str] = []
        self.out_dir = Path(cfg.train.output_dir) / "score"
        self.last_step: int | None = None
        # Not yet in MLflow: grids, and scores of evaluations outside a step (step 0, a resumed end).
        # Kept until a tracker is attached, since the Ray learner's opens after this on_start.
        self.unlogged_grids: list[Path] = []
        self.unlogged_metrics: list[tuple[int, dict[str, float]]] = []

    # --- Trainer callback hooks
    def on_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        # Loaded here, not per evaluation; a bad checkpoint fails before the first step.
        self.scorers = build_scorers(self.spec, trainer.device, references=None)
        self.prompts = self._fixed_prompts(trainer)
        log.info("reward score every %d steps: %s on %d prompts x seeds %s", self.every,
                 ", ".join(self.scorers), len(self.prompts), self.seeds)
        if trainer.step == 0:
            self.unlogged_metrics.append((0, self.evaluate(trainer)))
            self._flush(trainer)

    def on_step(self, trainer: Trainer, metrics: dict) -> None:
        if not trainer.is_main:
            return
        if trainer.step % self.every == 0 or trainer.step == self.cfg.train.max_steps:
            metrics.update(self._evaluate_or_warn(trainer))  # the tracker logs them with this step's metrics
        self._flush(trainer)

    def on_end(self, trainer: Trainer, summary: dict) -> None:
        if not (trainer.is_main and self.scorers):
            return
        # A run resumed at its last step has had no on_step: score the final weights once.
        if self.last_step != trainer.step and (scores := self._evaluate_or_warn(trainer)):
            summary.update(scores)
            self.unlogged_metrics.append((trainer.step, scores))
        self._flush(trainer)

    def _evaluate_or_warn(self, trainer: Trainer) -> dict[str, float]:
        try:
            return self.evaluate(trainer)
        except Exception:  # a failed evaluation must not end a long run (or lose its weights); say why
            log.exception("reward score at step %d failed", trainer.step)
            return {}

    # --- evaluation
    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Scores the current policy on the fixed (prompt, seed) items; writes the grid."""
        prompts = [p for p in self.prompts for _ in self.seeds]
        seeds = [s for _ in self.prompts for s in self.seeds]
        images = self._generate(trainer, prompts, seeds)
        scores = score_all(self.scorers, images, prompts)
        metrics = {f"score/{name}": sum(v) / len(v) for name, v in scores.items()}
        grid = image_grid(images, cols=len(self.seeds), scale=max(1, 128 // trainer.setup.bundle.resolution))
        self._save(trainer.step, grid, metrics)
        self.last_step = trainer.step
        return metrics

    def _generate(self, trainer: Trainer, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        bundle, device = trainer.setup.bundle, trainer.device
        modules = trainer.setup.trainable_modules
        modes = [m.training for m in modules]
        cuda = device.type == "cuda"
        rng_devices = [torch.cuda.current_device() if device.index is None else device.index] if cuda else []
        # Training keeps the UNet in float32 under autocast on a GPU; sample the same way (on the CPU: none).
        dtype = mixed_precision_dtype(self.cfg.model.mixed_precision) if cuda else None
        with torch.random.fork_rng(devices=rng_devices), autocast(device, dtype):
            for m in modules:
                m.eval()
            try:
                return generate_images(
                    bundle.pipeline(bundle.unet), prompts, seeds,
                    steps=default_steps(self.cfg, self.cfg.tracking.score_steps),
                    guidance_scale=default_guidance(self.cfg, None), resolution=bundle.resolution,
                    batch_size=GENERATE_BATCH, progress=False,
                )
            finally:
                for m, was in zip(modules, modes):
                    m.train(was)

    def _fixed_prompts(self, trainer: Trainer) -> list[str]:
        t, d = self.cfg.tracking, self.cfg.data
        if t.score_prompts:
            return load_prompts(t.score_prompts, limit=t.score_num_prompts)
        if trainer.heldout is not None:
            held = [p for batch, _ in trainer.heldout.batches for p in batch.prompts]
            return list(dict.fromkeys(held))[: t.score_num_prompts]
        if d.kind == "folder" and d.prompt:
            return [d.prompt]
        return list(PROMPTS[: t.score_num_prompts])

    # --- output
    def _save(self, step: int, grid: Image.Image, metrics: dict[str, float]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{step:06d}.png"
        grid.save(path)
        with (self.out_dir / "scores.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.unlogged_grids.append(path)

    def _flush(self, trainer: Trainer) -> None:
        tracker = attached_tracker(trainer)
        if tracker is None:
            return
        for step, metrics in self.unlogged_metrics:
            tracker.log_metrics(metrics, step=step)
        for path in self.unlogged_grids:
            tracker.mlflow.log_artifact(str(path), "score")
        self.unlogged_metrics, self.unlogged_grids = [], []
