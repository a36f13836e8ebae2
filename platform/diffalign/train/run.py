"""Offline training end to end in one process: trainer + MLflow + final weights on disk."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from diffalign.config import RunConfig, save_config
from diffalign.models.lora import save_lora
from diffalign.train.loop import Trainer
from diffalign.train.mismatch_check import check_reference_mismatch
from diffalign.train.setup import build_datasets

log = logging.getLogger(__name__)


def save_final_weights(trainer: Trainer, out_dir: Path) -> Path:
    """LoRA -> diffusers LoRA file (`pipe.load_lora_weights`); full -> a diffusers UNet folder."""
    cfg, bundle = trainer.cfg, trainer.setup.bundle
    if trainer.ema is not None:
        trainer.load_trainable_weights(trainer.final_weights())
    if cfg.model.finetune == "lora":
        return save_lora(bundle, out_dir / "lora", train_text_encoder=cfg.model.train_text_encoder)
    bundle.unet.save_pretrained(str(out_dir / "unet"))
    return out_dir / "unet"


def run_offline(
    cfg: RunConfig, callbacks: list | None = None, device: str | None = None, **trainer_kw
) -> dict:
    out_dir = Path(cfg.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    callbacks = list(callbacks or [])
    tracker = None
    if cfg.tracking.mlflow:
        from diffalign.tracking import MlflowTracker

        tracker = MlflowTracker(cfg)
    if cfg.train.score_every:
        from diffalign.train.reward_eval import RewardEvaluator

        # Before the tracker, so the score/* metrics it adds are logged at the same step.
        callbacks.append(RewardEvaluator(cfg))
    if tracker is not None:
        callbacks.append(tracker)
    status = "FAILED"
    try:
        data = trainer_kw.get("train_data")
        if cfg.data.mismatch_probe and data is None:  # built once: probed here, trained on below
            data, trainer_kw["heldout_data"] = build_datasets(cfg)
            trainer_kw["train_data"] = data
        check_reference_mismatch(cfg, data, device, tracker)
        trainer = Trainer(cfg, callbacks=callbacks, device=device, **trainer_kw)
        summary = trainer.fit()
        weights = save_final_weights(trainer, out_dir)
        summary["final_step"] = trainer.step
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if tracker is not None:
            tracker.log_artifacts(weights, f"weights/{weights.name}")
            summary["mlflow_run_id"] = tracker.run_id
        status = "FINISHED"
        log.info("done: %s", {k: round(v, 4) for k, v in summary.items() if isinstance(v, float)})
        return summary
    finally:
        if tracker is not None:
            tracker.close(status)
