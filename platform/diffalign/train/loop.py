"""The single-process training loop (no Ray): the Ray learner runs this same loop per worker.

AdamW, gradient accumulation, LR schedule, optional EMA, stability guards with rollback,
periodic checkpoints with exact resume, held-out accuracy, sample grids, a progress bar and a
metrics dict per optimizer step handed to callbacks (MLflow, Ray Train reporting).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.config import RunConfig, save_config
from diffalign.data.collate import collate_pairs
from diffalign.models.sampling import generate, image_grid
from diffalign.models.weights import load_trainable_state_dict, trainable_state_dict
from diffalign.train.cache import CachedPairs
from diffalign.train.checkpoint import (
    CONFIG_FILE,
    PREFIX,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from diffalign.train.data_order import batch_order
from diffalign.train.diagnostics import TimestepBins
from diffalign.train.guards import OK, ROLLBACK, StabilityGuard
from diffalign.train.heldout import HeldoutEvaluator
from diffalign.train.protocols import BatchSource, Callback, Engine
from diffalign.train.read_ahead import ReadAhead, read_items
from diffalign.train.setup import Setup
from diffalign.train.step import make_batch

log = logging.getLogger(__name__)
PROGRESS_KEYS = ("loss", "implicit_acc", "margin_mean", "grad_norm")


class TrainingDiverged(RuntimeError):
    """Raised when the guards cannot bring a run back (too many rollbacks)."""


class TrainingStopped(Exception):
    """`fit` stopped early on request (`Trainer.stop_requested`, set by a signal handler): at `step`,
    with rank 0's checkpoint of that step (None on other ranks)."""

    def __init__(self, step: int, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped at step {step} (signal {signum})")
        self.step, self.signum, self.checkpoint = step, signum, checkpoint


class Trainer:
    """The loop over built parts. `diffalign.train.driver.build_trainer` builds them from a config
    and a `Runtime` (device, rank, engine, reference, data, callbacks): the one place that does."""

    def __init__(self, cfg: RunConfig, setup: Setup, engine: Engine, train_data, heldout_data=None,
                 batch_source: BatchSource | None = None, callbacks: Sequence[Callback] = (), rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu",
                 checkpoint_dir: str | Path | None = None, data_issues=None) -> None:
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, torch.device(device)
        self.setup, self.engine, self.train_data = setup, engine, train_data
        # Bad-input account of the readers (ties, unreadable images, ...), for the run record.
        self.data_issues = data_issues
        self.callbacks = list(callbacks)
        # batch_source(items, micro_step) -> collated batch; online MaPO adds on-policy rejected samples here.
        self.batch_source = batch_source or (lambda items, micro_step: collate_pairs(items))
        g = cfg.guard
        self.guard = StabilityGuard(
            g.max_bad_steps, g.spike_sigmas, g.spike_window, g.spike_min_history, g.enabled
        )
        self.bins = TimestepBins(self.setup.bundle.num_train_timesteps)
        self.order = batch_order(train_data, cfg.optim.batch_size, cfg.train.seed, rank, world_size,
                                 cfg.data.shuffle_blocks)
        # Decoding is what background readers hide; cached latents need none.
        workers = 0 if isinstance(train_data, CachedPairs) else cfg.data.num_workers
        self.reader = ReadAhead(
            lambda k: self.order.positions(k), lambda pos: read_items(self.train_data, pos), workers
        )
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
        self.heldout = (
            HeldoutEvaluator(self.setup, heldout_data, device=self.device)
            if heldout_data is not None and self.is_main and cfg.train.eval_every > 0
            else None
        )
        self.checkpoint_dir = Path(checkpoint_dir or Path(cfg.train.output_dir) / "checkpoints")
        self.step = 0
        self.ema = trainable_state_dict(self.setup.bundle.unet) if cfg.train.ema_decay else None
        self.last_metrics: dict[str, float] = {}
        self.events: list[dict] = []
        self.release = None  # set by the builder: frees what the data holds (sampler pools)
        # A signal number: fit stops after the current step, saves a checkpoint, raises TrainingStopped.
        self.stop_requested: int | None = None
        # Rank 0 saves a checkpoint of the last step even when none was due (the driver's run: so a
        # rerun of a finished run finds it done, and a longer run resumes from it).
        self.save_at_end = False

    def close(self) -> None:
        """Stops the reader threads and releases the data's resources (idempotent)."""
        self.reader.close()
        release, self.release = self.release, None
        if release is not None:
            release()

    def emit(self, event: str, *args) -> None:
        """Calls `event` on every callback that defines it, in order."""
        for cb in self.callbacks:
            handler = getattr(cb, event, None)
            if handler is not None:
                handler(self, *args)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ state

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, module in enumerate(self.setup.trainable_modules):
            prefix = "" if i == 0 else f"text_encoder_{i}."
            out.update({prefix + k: v for k, v in trainable_state_dict(module).items()})
        return out

    def load_trainable_weights(self, weights: dict[str, torch.Tensor]) -> None:
        for i, module in enumerate(self.setup.trainable_modules):
            prefix = "" if i == 0 else f"text_encoder_{i}."
            part = {
                k[len(prefix) :]: v
                for k, v in weights.items()
                if (k.startswith(prefix) if prefix else not k.startswith("text_encoder_"))
            }
            load_trainable_state_dict(module, part)

    def state(self) -> dict:
        return {
            "step": self.step,
            "engine": self.engine.state_dict(),
            "rng": rng_state(self.generator),
            "reference": self.setup.reference.state_dict(),
            "guard": self.guard.state_dict(),
            "ema": self.ema,
            "events": self.events,
        }

    def save(self, directory: str | Path | None = None) -> Path:
        path = save_checkpoint(
            directory or self.checkpoint_dir,
            self.step,
            self.trainable_weights(),
            self.state(),
            keep=self.cfg.train.keep_checkpoints,
            write_extra=lambda folder: save_config(self.cfg, folder / CONFIG_FILE),
        )
        self.emit("on_checkpoint", path)
        return path

    def checkpoint_now(self) -> Path | None:
        """Rank 0: a checkpoint of this step (saved unless the newest one is of it); None elsewhere."""
        if not self.is_main:
            return None
        ckpt = latest_checkpoint(self.checkpoint_dir)
        return ckpt if ckpt is not None and ckpt.name == f"{PREFIX}{self.step}" else self.save()

    def restore(self, path: str | Path, rollback: bool = False) -> None:
        weights, state = load_checkpoint(path)
        self.load_trainable_weights(weights)
        lr_factor = self.engine.lr_factor
        self.engine.load_state_dict(state["engine"])
        self.setup.reference.load_state_dict(state["reference"])
        self.ema = state.get("ema")
        self.step = int(state["step"])
        if rollback:
            # Keep the RNG moving (a new draw of noise), keep the counters and the lowered LR.
            self.engine.set_lr_factor(lr_factor)
            self.guard.load_state_dict(state["guard"], keep_counters=True)
        else:
            set_rng_state(state["rng"], self.generator)
            self.guard.load_state_dict(state["guard"])
            self.events = state.get("events", [])

    # ------------------------------------------------------------------ steps

    def _micro_batch(self, micro_step: int):
        items = self.reader.get(micro_step)
        raw = self.batch_source(items, micro_step)
        return make_batch(raw, self.setup.prompt_encoder, self.setup.latent_encoder, self.device)

    def train_step(self) -> dict[str, float]:
        """One optimizer step (grad_accum micro-batches); returns its metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        accum = cfg.optim.grad_accum
        self.engine.zero_grad()
        loss_sum, metrics_acc, probe = 0.0, {}, None
        for micro in range(accum):
            batch = self._micro_batch(self.step * accum + micro)
            res = self.setup.step(self.engine.forward_module, batch, self.generator)
            loss = res.loss
            for cb in self.callbacks:  # may replace the loss the guards and metrics see
                if hasattr(cb, "on_before_backward"):
                    loss = cb.on_before_backward(self, loss)
            self.engine.backward(loss / accum)
            loss_sum += float(loss.detach()) / accum
            for k, v in res.out.metrics.items():
                metrics_acc[k] = metrics_acc.get(k, 0.0) + v / accum
            self.bins.update(res.timesteps, res.out.margin)
            probe = res.probe
        self.emit("on_after_backward", self.engine.params)
        # The global norm is non-finite iff some gradient is: one reduction instead of a check per tensor.
        grad_norm = self.engine.grad_norm_and_clip()
        verdict = self.guard.check(loss_sum, math.isfinite(grad_norm), grad_norm)
        if verdict != OK:
            self.engine.zero_grad()
            self._guard_event(verdict)
            return {}
        self.engine.step()
        self.step += 1
        self._update_ema()
        # Every rank calls it: periodic_threshold pools its drift probes over the ranks here.
        ref_metrics = self.setup.reference.on_step(self.step, probe, world_size=self.world_size)
        dt = time.perf_counter() - t0
        pairs = cfg.optim.batch_size * accum * self.world_size
        metrics = {
            "loss": loss_sum,
            **metrics_acc,
            **ref_metrics,
            "grad_norm": grad_norm,
            "lr": self.engine.lr(),
            "pairs_per_s": pairs / dt,
            "step_time_s": dt,
            "guard/skipped_steps": float(self.guard.skipped),
            "guard/rollbacks": float(self.guard.rollbacks),
        }
        return metrics

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.train.ema_decay
        for name, p in self.setup.bundle.unet.named_parameters():
            if name in self.ema:
                self.ema[name].mul_(d).add_(p.detach().cpu(), alpha=1 - d)

    def _guard_event(self, verdict: str) -> None:
        event = {"step": self.step, "kind": verdict, "reason": self.guard.last_reason}
        if verdict == ROLLBACK:
            if self.guard.rollbacks >= self.cfg.guard.max_rollbacks:
                raise TrainingDiverged(
                    f"step {self.step}: {self.guard.last_reason}; "
                    f"{self.guard.rollbacks} rollbacks already, giving up"
                )
            ckpt = latest_checkpoint(self.checkpoint_dir)
            if ckpt is None:
                raise TrainingDiverged(
                    f"step {self.step}: {self.guard.last_reason} and no checkpoint to roll back to"
                )
            new_factor = self.engine.lr_factor * self.cfg.guard.lr_factor
            self.engine.lr_factor = new_factor
            self.restore(ckpt, rollback=True)
            self.guard.after_rollback()
            event.update(restored=str(ckpt), restored_step=self.step, lr_factor=new_factor)
            log.warning("rollback: %s -> restored %s, lr x%.3g", event["reason"], ckpt.name, new_factor)
        else:
            log.warning("skipped step %d: %s", self.step + 1, self.guard.last_reason)
        self.events.append(event)
        self.emit("on_event", event)

    # ------------------------------------------------------------------ eval and samples

    def evaluate(self) -> dict[str, float]:
        return self.heldout.evaluate() if self.heldout is not None else {}

    def sample_images(self, prompts: list[str] | None = None, seeds: list[int] | None = None):
        t = self.cfg.tracking
        from diffalign.data.synthetic import PROMPTS

        prompts = prompts or list(PROMPTS[: t.num_sample_prompts])
        seeds = seeds or list(range(len(prompts)))
        images = generate(self.setup.bundle, self.setup.bundle.unet, prompts, seeds, steps=t.sample_steps)
        return image_grid(images, scale=max(1, 128 // self.setup.bundle.resolution))

    # ------------------------------------------------------------------ run

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        if cfg.train.resume and self.step == 0 and (ckpt := latest_checkpoint(self.checkpoint_dir)):
            self.restore(ckpt)
            log.info("resumed from %s at step %d", ckpt, self.step)
        if self.is_main and cfg.guard.enabled and latest_checkpoint(self.checkpoint_dir) is None:
            self.save()  # a rollback target exists from the start
        self.emit("on_start")
        bar = tqdm(
            total=cfg.train.max_steps,
            initial=self.step,
            desc=f"{cfg.objective.name}",
            disable=not (self.is_main and cfg.train.progress),
            dynamic_ncols=True,
        )
        while self.step < cfg.train.max_steps and self.stop_requested is None:
            before = self.step
            metrics = self.train_step()
            if not metrics:
                bar.n = self.step
                bar.refresh()
                continue
            bar.update(self.step - before)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                metrics.update(self.bins.metrics())
            if self.heldout is not None and (
                self.step % cfg.train.eval_every == 0 or self.step == cfg.train.max_steps
            ):
                metrics.update(self.evaluate())
            self.last_metrics = metrics
            self.emit("on_step", metrics)
            # After the callbacks: they may add metrics worth watching (reward scores).
            bar.set_postfix(
                {k: f"{v:.3g}" for k, v in metrics.items() if k in PROGRESS_KEYS or k.startswith("score/")}
            )
            if self.is_main and self.step % cfg.train.checkpoint_every == 0:
                self.save()
        bar.close()
        if self.stop_requested is not None:
            self.reader.close()
            raise TrainingStopped(self.step, self.stop_requested, self.checkpoint_now())
        if self.is_main and (self.save_at_end or latest_checkpoint(self.checkpoint_dir) is not None):
            self.checkpoint_now()
        summary = dict(self.last_metrics)
        if self.heldout is not None and not any(k.startswith("heldout/") for k in summary):
            summary.update(self.evaluate())
        self.reader.close()
        self.emit("on_end", summary)
        return summary

    def final_weights(self) -> dict[str, torch.Tensor]:
        return dict(self.ema) if self.ema is not None else trainable_state_dict(self.setup.bundle.unet)
